"""Large prototype sets in ONNX Runtime: one 1x1 conv vs the conv split into chunks (network.PROTOTYPE_CHUNK).

For one bundle, the network is rebuilt with each chunk size (``0`` = one conv over all
prototypes, the graph before chunking), exported to FP32 ONNX and run by ONNX Runtime (CPU) on the
first ``--images`` test images, each configuration in a fresh process so that its peak RSS is its
own. Reported: export seconds, prototype convs in the graph, images/s after one warm-up batch, peak RSS, and
the largest score difference to the first configuration (the chunks only reorder a max, so it
should be float rounding of the conv, ~1e-7). ``--torch-device cuda`` times the PyTorch network
instead (FP16 on a GPU, where TensorRT will run the graph; ``benchmarks/gpu_bench.sh``), with
peak GPU memory in place of RSS.

    flock /tmp/protoad-bench.lock python benchmarks/prototype_chunks.py BUNDLE --chunks 0,256,512,1024,2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "magnetic_tile"


def measure(bundle_dir: Path, data: Path, chunk: int, images: int, batch: int, scores_out: Path,
            torch_device: str | None = None) -> dict:
    """One configuration, in this process: export and ONNX Runtime (or the torch network on
    ``torch_device``), time, peak memory."""
    import onnxruntime as ort

    from protoad_export.bundle import load_array, read_manifest
    from protoad_export.contract import InputContract
    from protoad_export.data.datasets import load_test_set
    from protoad_export.data.images import Preprocessing
    from protoad_export.export.onnx import export_onnx
    from protoad_export.model.network import ProtoADNetwork
    from protoad_export.runtime import preprocess_paths
    from protoad_export.runtime.pytorch import build_torch_network

    manifest = read_manifest(bundle_dir)
    reference = build_torch_network(bundle_dir, manifest, "fp32")
    protos = np.asarray(load_array(bundle_dir, manifest, manifest["prototypes"]["file"]), dtype=np.float32)
    precision = "fp16" if torch_device and torch_device.startswith("cuda") else "fp32"
    net = ProtoADNetwork(reference.patch_features, protos, Preprocessing.from_manifest(manifest), precision,
                         chunk=chunk or len(protos)).eval()
    del reference
    paths = [t.path for t in load_test_set(data, Preprocessing.from_manifest(manifest)).samples[:images]]
    batches = [preprocess_paths(paths[i : i + batch], manifest) for i in range(0, len(paths), batch)]
    row = {"chunk": chunk or len(protos), "prototypes": len(protos), "batch": batch, "images": len(paths)}
    if torch_device:
        return row | _time_torch(net, batches, torch_device, scores_out)
    with tempfile.TemporaryDirectory(prefix="protoad-chunks-") as tmp:
        t0 = time.perf_counter()
        export_onnx(net, Path(tmp) / "model.onnx", InputContract("tensor", net.size))
        export_s = time.perf_counter() - t0
        convs = net.chunks
        del net
        options = ort.SessionOptions()
        options.log_severity_level = 3
        inference = ort.InferenceSession(str(Path(tmp) / "model.onnx"), options, providers=["CPUExecutionProvider"])
        inference.run(["score"], {"image": batches[0]})  # warm-up (allocations, kernels)
        t0 = time.perf_counter()
        scores = np.concatenate([inference.run(["score"], {"image": b})[0] for b in batches])
        secs = time.perf_counter() - t0
    np.save(scores_out, scores)
    return row | {"backend": "onnxruntime cpu fp32", "convs": convs, "export_seconds": round(export_s, 1),
                  "images_per_second": round(len(paths) / secs, 3),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _time_torch(net, batches: list[np.ndarray], device: str, scores_out: Path) -> dict:
    import torch

    net = net.to(device)
    cuda = device.startswith("cuda")
    with torch.no_grad():
        net(torch.from_numpy(batches[0]).to(device))  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        inputs = [torch.from_numpy(b).to(device) for b in batches]
        scores = [net(x)[1] for x in inputs]
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    np.save(scores_out, torch.cat(scores).float().cpu().numpy())
    out = {"backend": f"torch {device} {net.precision}", "convs": net.chunks, "export_seconds": None,
           "images_per_second": round(sum(len(b) for b in batches) / secs, 3),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if cuda:
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--chunks", default="0,16384", help="comma-separated chunk sizes; 0 = one conv")
    parser.add_argument("--data", type=Path, default=DATA, help="MVTec-style category whose test images are run")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON of the rows")
    parser.add_argument("--torch-device", help="time the torch network on this device (e.g. cuda) instead of ONNX Runtime")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one chunk size here
    parser.add_argument("--scores", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.engine, args.data, args.one, args.images, args.batch, args.scores, args.torch_device)))
        return
    rows, first = [], None
    with tempfile.TemporaryDirectory(prefix="protoad-chunks-") as tmp:
        for chunk in (int(c) for c in args.chunks.split(",")):
            scores = Path(tmp) / f"scores_{chunk}.npy"
            cmd = [sys.executable, __file__, str(args.engine), "--one", str(chunk), "--data", str(args.data), "--images", str(args.images),
                   "--batch", str(args.batch), "--scores", str(scores)] + (["--torch-device", args.torch_device] if args.torch_device else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"chunk": chunk, "failed": (done.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
                s = np.load(scores)
                first = s if first is None else first
                row["max_score_difference"] = float(np.abs(s - first).max())
                rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.engine.name}, batch {args.batch}\n\n| chunk | backend | prototype convs | images/s | peak RSS MiB | peak GPU MiB | export s | max score diff vs first |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['chunk']:,} | failed: {r['failed']} | | | | | | |")
        else:
            print(f"| {r['chunk']:,} | {r['backend']} | {r['convs']} | {r['images_per_second']:.2f} | {r['peak_rss_mib']:,.0f} | "
                  f"{r.get('peak_gpu_mib', '-')} | {r['export_seconds'] or '-'} | {r['max_score_difference']:.1e} |")
    if args.out:
        args.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                        "command": "python benchmarks/prototype_chunks.py " + " ".join(sys.argv[1:]),
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
