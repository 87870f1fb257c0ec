"""Preprocessing in the graph: parity with the Python path on real data, and its share of the time.

1. Parity. The magnetic tile crops differ in size, so they are first made into camera frames of one
   size (each image and mask squashed to --frame WxH: what a fixed camera would deliver), in a
   temporary folder outside the project. A ``frames`` bundle is built on them (efficientnet_lite0),
   then every test map is computed twice: ONNX Runtime on the uint8 frames (the graph resizes) and
   the PyTorch FP32 network on the Python path's tensors (``Preprocessing.image_array``). Reported:
   the largest and mean map and score differences, and image AUROC / pixel AUROC / PRO of both.
2. Cost. For two camera sizes the bundle's network is exported twice, behind the frame input and
   on preprocessed tensors, and both run in ONNX Runtime in this process, alternating; the frame
   input's share is 1 - t(tensor) / t(frames).

    python benchmarks/frames_parity.py --data ../shared/data/magnetic_tile --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from protoad_export.build import BuildConfig, build
from protoad_export.contract import InputContract
from protoad_export.data.datasets import load_test_set
from protoad_export.data.images import Preprocessing, load_image
from protoad_export.evaluation.evaluate import score_metrics
from protoad_export.runtime import load, predict_paths


def reframe(src: Path, dst: Path, size: tuple[int, int]) -> Path:
    """Copy an MVTec-style category with every image and mask resized to ``size`` (W, H)."""
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp"):
            continue
        out = (dst / path.relative_to(src)).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in path.parts:
            Image.open(path).convert("L").resize(size, Image.NEAREST).save(out)
        else:
            load_image(path).resize(size, Image.BILINEAR).save(out)
    return dst


def parity(bundle, data: Path) -> dict:
    import torch

    manifest = bundle.manifest
    prep = Preprocessing.from_manifest(manifest)
    test = load_test_set(data, prep)
    paths = [s.path for s in test.samples]
    t0 = time.perf_counter()
    graph = predict_paths(load(bundle.bundle_dir, "onnxruntime"), paths, batch_size=8)
    graph_s = time.perf_counter() - t0
    maps, scores = [], []
    with torch.no_grad():
        for i in range(0, len(paths), 8):
            x = torch.from_numpy(np.stack([prep.image_array(load_image(p)) for p in paths[i : i + 8]]))
            m, s = bundle.network.network(x)
            maps.append(m[:, 0].numpy())
            scores.append(s.numpy())
    maps, scores = np.concatenate(maps), np.concatenate(scores)
    diff = np.abs(graph.maps - maps)
    return {
        "images": len(paths), "frame": manifest["input"]["shape"][1:], "resize_mode": prep.mode,
        "prototypes": manifest["prototypes"]["count"],
        "map_max_abs_diff": float(diff.max()), "map_mean_abs_diff": float(diff.mean()),
        "score_max_abs_diff": float(np.abs(graph.scores - scores).max()),
        "in_graph": score_metrics(test, graph.scores, graph.maps)["overall"],
        "python_path": score_metrics(test, scores, maps)["overall"],
        "in_graph_seconds": round(graph_s, 1),
    }


def cost(bundle, frames: list[tuple[int, int, str]], batch: int, repeats: int) -> list[dict]:
    import onnxruntime as ort

    from protoad_export.export.onnx import export_onnx
    from protoad_export.model.frames import FrameInput, FrameNetwork

    prep = Preprocessing.from_manifest(bundle.manifest)
    network = bundle.network.network
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tensor_file = export_onnx(network, Path(tmp) / "tensor.onnx", InputContract("tensor", prep.crop))
        tensor = ort.InferenceSession(str(tensor_file), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        x = rng.random((batch, 3, prep.crop, prep.crop), dtype=np.float32)
        for width, height, order in frames:
            contract = InputContract("frames", prep.crop, width, height, order)
            path = export_onnx(FrameNetwork(FrameInput(prep, width, height, order), network), Path(tmp) / "f.onnx", contract)
            inference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            f = rng.integers(0, 256, contract.shape(batch), dtype=np.uint8)
            runs = {"frames": (inference, {"frames": f}), "tensor": (tensor, {"image": x})}
            times = {k: [] for k in runs}
            for name, (sess, feed) in runs.items():
                sess.run(None, feed)  # warm-up
            for _ in range(repeats):  # alternating, so that a slow minute hurts both alike
                for name, (sess, feed) in runs.items():
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times[name].append(time.perf_counter() - t0)
            med = {k: float(np.median(v)) for k, v in times.items()}
            out.append({"frame": f"{width}x{height} {order}", "batch": batch,
                        "frames_ms_per_image": round(1e3 * med["frames"] / batch, 2),
                        "tensor_ms_per_image": round(1e3 * med["tensor"] / batch, 2),
                        "preprocessing_share": round(1 - med["tensor"] / med["frames"], 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-style category")
    parser.add_argument("--frame", default="288x400", help="camera frame WxH the category is re-framed to")
    parser.add_argument("--resize-mode", default="letterbox")
    parser.add_argument("--camera-sizes", default="1280x1024:rgb,2448x2048:gray")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    size = tuple(int(v) for v in args.frame.split("x"))
    cameras = [(int(s.split("x")[0]), int(s.split("x")[1].split(":")[0]), s.split(":")[1]) for s in args.camera_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="protoad-frames-") as tmp:
        data = reframe(args.data, Path(tmp) / "data", size)
        prep = Preprocessing(mode=args.resize_mode)
        t0 = time.perf_counter()
        bundle = build(data, "frames", Path(tmp) / "bundles", BuildConfig(backbone="efficientnet_lite0", preprocessing=prep,
                                                                          holdout=0.0), log=None, progress=False)
        build_s = time.perf_counter() - t0
        report = {"parity": parity(bundle, data), "cost": cost(bundle, cameras, args.batch, args.repeats)}
    report["build_seconds"] = round(build_s, 1)
    report["command"] = "python benchmarks/frames_parity.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    report["machine"] = {"processor": platform.processor(), "cpu": _cpu()}
    report["commit"] = commit  # the code this run loaded, not what was checked out when it ended
    report["date"] = time.strftime("%Y-%m-%d")
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx2"))]
    return f"{name}, {len([l for l in info.splitlines() if l.startswith('processor')])} cores, {' '.join(wanted)}"


if __name__ == "__main__":
    main()
