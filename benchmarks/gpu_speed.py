"""PyTorch speed of the ProtoAD network on a GPU, without a build: random backbone weights and random
unit prototypes (speed depends on shapes, not values), so no data, features or FINCH are needed.

``speed``: throughput and latency percentiles of FP32, FP16 and FP16 + torch.compile (CUDA graphs)
per backbone and batch size. ``chunks``: the FP16 prototype conv in chunks of each size (0 = one
conv) at a large prototype count. Every finished measurement is written to ``--json`` at once
(atomic replace), so a run cut short keeps what it measured; a measurement that would start after
``--deadline`` (Unix time) is recorded as skipped instead.

    python benchmarks/gpu_speed.py speed --json speed.json --backbones efficientnet_lite0,wide_resnet50_2 --batches 1,8,32
    python benchmarks/gpu_speed.py chunks --json chunks.json --prototypes 163283 --chunks 0,1024,4096,16384
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# The paper stops FINCH below 10,000 clusters ("set the threshold to 10,000"); the magnetic tile
# letterbox build kept 9,144 (benchmarks/RESULTS.md), the count used here by default.
PAPER_PROTOTYPES = 9144


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _network(backbone: str, prototypes: int, precision: str, chunk: int, crop: int):
    import torch

    from protoad_export.model.backbones import RANDOM_WEIGHTS, load_backbone
    from protoad_export.model.features import PatchFeatures
    from protoad_export.data.images import Preprocessing
    from protoad_export.model.network import ProtoADNetwork, patch_grid

    loaded = load_backbone(backbone, RANDOM_WEIGHTS)
    prep = loaded.spec.preprocessing(Preprocessing(resize=crop, crop=crop, mode="squash"))
    features = PatchFeatures(loaded.module, "bilinear", patch_grid(crop, loaded.spec.strides[0])).eval()
    with torch.no_grad():
        channels = features(torch.zeros(1, 3, crop, crop)).shape[1]
    protos = np.random.default_rng(0).standard_normal((prototypes, channels)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    return ProtoADNetwork(features, protos, prep, precision, chunk=chunk or prototypes).eval().cuda()


def _time(net, batch: int, crop: int, warmup: int, min_seconds: float, max_iterations: int) -> dict:
    """Per-iteration latency by CUDA events on the current stream; throughput over the whole loop."""
    import torch

    x = torch.rand(batch, 3, crop, crop, device="cuda")
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(warmup):
            net(x)
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        times = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < min_seconds and len(times) < max_iterations):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            net(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        total = time.perf_counter() - start
    ms = np.asarray(times)
    return {"batch": batch, "iterations": len(times), "warmup_seconds": round(warmup_s, 2),
            "latency_ms": {"mean": float(ms.mean()), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
                           "p99": float(np.percentile(ms, 99)), "min": float(ms.min())},
            "images_per_second": batch * len(times) / total,
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("speed", "chunks"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--backbones", default="efficientnet_lite0,wide_resnet50_2")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--variants", default="fp32,fp16,fp16-compile")
    parser.add_argument("--prototypes", type=int, default=PAPER_PROTOTYPES)
    parser.add_argument("--chunks", default="0,1024,4096,16384")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement (at least 5 iterations)")
    parser.add_argument("--max-iterations", type=int, default=200)
    parser.add_argument("--deadline", type=float, default=None, help="Unix time after which no measurement starts")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU")
    payload = {"mode": args.mode, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "crop": args.crop, "rows": []}
    batches = [int(b) for b in args.batches.split(",")]
    if args.mode == "speed":
        configs = [(bb, v, args.prototypes, 0) for bb in args.backbones.split(",") for v in args.variants.split(",")]
    else:
        configs = [(bb, "fp16", args.prototypes, int(c)) for bb in args.backbones.split(",") for c in args.chunks.split(",")]
    for backbone, variant, prototypes, chunk in configs:
        precision = "fp32" if variant == "fp32" else "fp16"
        base = {"backbone": backbone, "variant": variant, "prototypes": prototypes,
                "chunk": chunk or min(prototypes, 1024) if args.mode == "speed" else chunk or prototypes}
        if args.deadline and time.time() > args.deadline:
            payload["rows"] += [base | {"batch": b, "skipped": "time budget"} for b in batches]
            _write(args.json, payload)
            continue
        try:
            net = _network(backbone, prototypes, precision, 1024 if args.mode == "speed" else chunk, args.crop)
            if variant == "fp16-compile":
                net = torch.compile(net, mode="reduce-overhead", dynamic=False)
        except Exception as exc:  # noqa: BLE001  (report and go on: one failure must not lose the rest)
            payload["rows"].append(base | {"error": f"{type(exc).__name__}: {exc}"[:300]})
            _write(args.json, payload)
            continue
        for batch in batches:
            if args.deadline and time.time() > args.deadline:
                payload["rows"].append(base | {"batch": batch, "skipped": "time budget"})
            else:
                torch.cuda.reset_peak_memory_stats()
                try:
                    payload["rows"].append(base | _time(net, batch, args.crop, args.warmup, args.seconds, args.max_iterations))
                except Exception as exc:  # noqa: BLE001
                    payload["rows"].append(base | {"batch": batch, "error": f"{type(exc).__name__}: {exc}"[:300]})
            _write(args.json, payload)
            row = payload["rows"][-1]
            print(json.dumps(row), flush=True)
        del net
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
