"""ProtoAD vs the exact kNN memory bank on magnetic tile (efficientnet_lite0), like for like.

For each bank size M (``--bank-images``), M training images evenly spaced by sorted name
(``thresholds.evenly_spaced``) make a category of symlinks (the real test set and masks). ProtoAD
engines are built on exactly those images with no hold-out, once per prototype budget
(``--max-prototypes``: FINCH stops at the first partition below it), and the kNN baseline's bank
is every patch of the same M images: both see the same training patches and differ only in
prototypes vs. the exact bank. All use ``--resize-mode`` (letterbox by default: the best mode on
these non-square parts, RESULTS.md section 3), re-normalised prototypes, ONNX Runtime FP32, and
all 582 test images; pixel metrics leave the letterbox padding out.

Exact kNN costs 2 * 3136 * M * 3136 * 176 FLOPs per test image: about 15 minutes for M = 64 on
2 cores; the full bank (762 images) would take hours, which is why M is capped here.

    flock /tmp/protoad-bench.lock python benchmarks/eval_magnetic_tile.py --out /tmp/protoad-bench
    python benchmarks/eval_magnetic_tile.py --out /tmp/protoad-bench --table   # Markdown of a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from protoad_export.builder import BuildConfig, build
from protoad_export.evaluate import evaluate_engine
from protoad_export.images import Preprocessing, training_images
from protoad_export.thresholds import evenly_spaced

DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "magnetic_tile"
METRICS = ("image_auroc", "pixel_auroc", "pro")


def subset_category(root: Path, out: Path, train: list[Path]) -> Path:
    """An MVTec-style category of symlinks: the given train images, the full test set and masks."""
    (out / "train" / "good").mkdir(parents=True, exist_ok=True)
    for p in train:
        link = out / "train" / "good" / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    for sub in ("test", "ground_truth"):
        if not (out / sub).exists():
            (out / sub).symlink_to(root / sub)
    return out


def engine(data: Path, name: str, out: Path, config: BuildConfig) -> tuple[Path, float]:
    path = out / "engines" / name
    if (path / "manifest.json").is_file():
        print(f"reusing {path}", flush=True)
        return path, float("nan")
    t0 = time.perf_counter()
    built = build(data, name, out / "engines", config, log=print, progress=False)
    return built.engine_dir, time.perf_counter() - t0


def run(args) -> dict:
    train = training_images(DATA)
    rows = []
    for m in args.bank_images:
        cat = subset_category(DATA, args.out / f"cat{m}", evenly_spaced(train, m))
        seen: dict[int, dict] = {}
        for i, budget in enumerate(args.max_prototypes):
            config = BuildConfig(backbone="efficientnet_lite0", batch_size=8, holdout=0.0, max_prototypes=budget,
                                 preprocessing=Preprocessing(mode=args.resize_mode))
            path, build_s = engine(cat, f"{args.resize_mode}{m}_p{budget}", args.out, config)
            baseline = "knn" if i == 0 else None  # the bank does not depend on the budget
            rep = evaluate_engine(path, DATA, baseline=baseline, progress=False, out_dir=args.out / f"eval_{m}_{budget}")
            (args.out / f"eval_{m}_{budget}.json").write_text(json.dumps(rep, indent=1))
            ours = rep["methods"]["protoad"]
            if ours["prototypes"] in seen:  # same FINCH partition as a smaller budget
                print(f"M={m}: budget {budget} gives the same {ours['prototypes']} prototypes", flush=True)
                continue
            seen[ours["prototypes"]] = ours
            rows.append({"bank_images": m, "method": "protoad", "max_prototypes": budget, "build_seconds": build_s, **ours})
            if baseline:
                rows.append({"bank_images": m, "method": "knn", **rep["methods"]["knn"]})
            print(json.dumps(rows[-1])[:400], flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, {model}, {os.cpu_count()} cores", "resize_mode": args.resize_mode,
            "command": "python benchmarks/eval_magnetic_tile.py " + " ".join(args.argv), "rows": rows}


def table(run: dict) -> str:
    """Markdown: overall metrics and per-type image AUROC, each ProtoAD row's gap to its bank's kNN."""
    rows = run["rows"]
    knn = {r["bank_images"]: r for r in rows if r["method"] == "knn"}
    defects = sorted(rows[0]["metrics"]["per_defect"])
    head = ["bank images", "method", "prototypes / bank patches", "image AUROC %", "pixel AUROC %", "PRO %",
            *[f"{d} image AUROC %" for d in defects], "images/s", "size MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(r, value, ref):
        text = f"{100 * value:.1f}"
        return text if ref is None or r is ref else f"{text} ({100 * (value - ref):+.1f})"

    for r in rows:
        ref = knn.get(r["bank_images"])
        size = r.get("prototypes_mib_fp32", r.get("bank_mib_fp32"))
        count = f"{r['prototypes']:,}" if r["method"] == "protoad" else f"{r['bank_patches']:,}"
        name = "kNN (exact bank)" if r["method"] == "knn" else f"ProtoAD, --max-prototypes {r['max_prototypes']}"
        o = r["metrics"]["overall"]
        vals = [cell(r, o[k], ref and ref["metrics"]["overall"][k]) for k in METRICS]
        per = [cell(r, r["metrics"]["per_defect"][d]["image_auroc"], ref and ref["metrics"]["per_defect"][d]["image_auroc"])
               for d in defects]
        lines.append(f"| {r['bank_images']} | {name} | {count} | " + " | ".join(vals + per)
                     + f" | {r['images_per_second']:.1f} | {size:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/protoad-bench"))
    parser.add_argument("--bank-images", default="16,64", help="comma-separated bank sizes (training images)")
    parser.add_argument("--max-prototypes", default="10000,50000", help="comma-separated FINCH budgets; the first is the paper's")
    parser.add_argument("--resize-mode", default="letterbox", choices=("crop", "squash", "letterbox"))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out/run.json")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads((args.out / "run.json").read_text())))
        return
    args.argv = sys.argv[1:]
    args.bank_images = [int(v) for v in args.bank_images.split(",")]
    args.max_prototypes = [int(v) for v in args.max_prototypes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "run.json").write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
