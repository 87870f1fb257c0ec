"""Two-stage prototype search (model/search.py) against the flat conv at FINCH's ~163k level.

One process: efficientnet_lite0 letterbox-224 features of every train/good image, FINCH keeping
its levels, the finest level under ``--max-fine`` as the fine prototypes (re-normalised cluster
means, as the build makes them), a coarser level (``--coarse-offsets``: 1 = the next level) as the
coarse ones, its clusters capped at ``--max-children`` (``split_clusters``; 0 = uncapped).

Per (coarse level, ``top``): the share of test patches whose best prototype the two-stage search
misses and image / pixel AUROC, both from the network's own search and tail run in torch on the
test features of ``--eval-images`` test images evenly spread over the sorted set (the flat
search's exact patch scores of all 582 would take the better part of an hour on 2 cores); ONNX
Runtime FP32 speed (batch 1, ``--speed-images`` test images after one warm-up image) of the whole
exported network, flat and two-stage (``--speed-tops``).

    flock /tmp/protoad-cpu.lock python benchmarks/two_stage.py --data ../shared/data/magnetic_tile \\
        --out benchmarks/results/two_stage.json --cache /tmp/two_stage_cache
    python benchmarks/two_stage.py --table benchmarks/results/two_stage.json   # Markdown of a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from protoad_export.clustering.finch import cluster_means, finch
from protoad_export.contract import InputContract
from protoad_export.data.datasets import load_test_set, training_images
from protoad_export.data.images import Preprocessing, load_image
from protoad_export.evaluation.evaluate import score_metrics
from protoad_export.export.onnx import export_onnx
from protoad_export.model.backbones import get_spec, load_backbone
from protoad_export.model.features import FeatureExtractor, PatchFeatures, extract_features
from protoad_export.model.network import ProtoADNetwork, ScoreTail, patch_grid
from protoad_export.model.search import TwoStage, TwoStageSearch, parents_from_levels, split_clusters, unit_rows


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def features_and_levels(data: Path, cache: Path, pf: PatchFeatures, prep: Preprocessing) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """Train features (FP16 memmap) and FINCH's per-level labels, reused from ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    timing = {}
    if not (cache / "train.npy").exists():
        t0 = time.perf_counter()
        extract_features(FeatureExtractor(pf, prep), training_images(data), prep, cache / "train.npy", batch_size=16, progress=False)
        timing["features_seconds"] = round(time.perf_counter() - t0, 1)
    x = np.load(cache / "train.npy", mmap_mode="r")
    if not (cache / "levels.npz").exists():
        t0 = time.perf_counter()
        res = finch(np.asarray(x), stop_below=1000, keep_levels=True, log=log)
        np.savez(cache / "levels.npz", *[lv.astype(np.int32) for lv in res.levels])
        (cache / "levels.json").write_text(json.dumps({"sizes": res.partition_sizes, "finch_seconds": time.perf_counter() - t0}))
    with np.load(cache / "levels.npz") as z:
        levels = [z[f"arr_{i}"] for i in range(len(z.files))]
    timing.update(json.loads((cache / "levels.json").read_text()))
    return x, levels, timing


def flat_search(unit: torch.Tensor, fine: torch.Tensor, rows: int = 4096, tile: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """[P, C] unit features -> (max cos - 1, argmax) over all fine prototypes, in [rows, tile] blocks."""
    best = torch.full((len(unit),), -2.0)
    arg = torch.zeros(len(unit), dtype=torch.int64)
    for r in range(0, len(unit), rows):
        u = unit[r : r + rows]
        for s in range(0, len(fine), tile):
            v, j = (u @ fine[s : s + tile].T).max(dim=1)
            better = v > best[r : r + rows]
            best[r : r + rows] = torch.where(better, v, best[r : r + rows])
            arg[r : r + rows] = torch.where(better, j + s, arg[r : r + rows])
    return best - 1.0, arg


def two_stage_scores(search: TwoStageSearch, unit: torch.Tensor, flat_best: torch.Tensor, flat_arg: torch.Tensor,
                     parent: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    """The two-stage search's max cos - 1 per patch [P], cheaply: stage 1 for every patch; where the
    best prototype's cluster is a candidate, the flat result (the search is exact there); the
    whole search only on the other patches."""
    out = flat_best.clone()
    with torch.no_grad():
        for s in range(0, len(unit), rows):
            x = torch.nn.functional.pad(unit[s : s + rows], (0, 1), value=1.0)[None]
            cand = search.candidates(x)[0]
            hit = (cand == parent[flat_arg[s : s + rows], None]).any(dim=1)
            miss = torch.nonzero(~hit).flatten() + s
            for b in range(0, len(miss), 512):  # [512, 1, top * M, C + 1] gathered per step
                part = miss[b : b + 512]
                out[part] = search(unit[part][:, :, None, None]).reshape(-1)
    return out


def onnx_speed(net: ProtoADNetwork, batches: list[np.ndarray], tmp: Path) -> dict:
    import onnxruntime as ort

    t0 = time.perf_counter()
    path = export_onnx(net, tmp / "model.onnx", InputContract("tensor", net.size))
    export_s = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.log_severity_level = 3
    inference = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inference.run(["score"], {"image": batches[0]})  # warm-up
    t0 = time.perf_counter()
    scores = [inference.run(["score"], {"image": b})[0] for b in batches[1:]]
    secs = time.perf_counter() - t0
    os.unlink(path)
    return {"images_per_second": round(len(scores) / secs, 3), "export_seconds": round(export_s, 1),
            "onnx_scores": np.concatenate(scores).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the magnetic tile category")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the results")
    parser.add_argument("--cache", type=Path, help="folder keeping features and FINCH levels between runs")
    parser.add_argument("--max-fine", type=int, default=200_000)
    parser.add_argument("--coarse-offsets", default="1,2", help="coarse levels, counted from the fine one")
    parser.add_argument("--max-children", type=int, default=64, help="cap on a coarse cluster's children (0: none)")
    parser.add_argument("--tops", default="4,16,64")
    parser.add_argument("--speed-tops", default="4,16,64", help="tops timed in ONNX Runtime (per coarse level)")
    parser.add_argument("--eval-images", type=int, default=97, help="test images for misses and AUROC (0: all)")
    parser.add_argument("--speed-images", type=int, default=13, help="test images timed (the first is the warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()

    backbone = load_backbone("efficientnet_lite0")
    prep = get_spec("efficientnet_lite0").preprocessing(Preprocessing(mode="letterbox"))
    grid = patch_grid(prep.crop, backbone.spec.strides[0])
    pf = PatchFeatures(backbone.module, "bilinear", grid).eval()
    with tempfile.TemporaryDirectory(prefix="two-stage-") as tmpdir:
        cache = args.cache or Path(tmpdir) / "cache"
        x, levels, timing = features_and_levels(args.data, cache, pf, prep)
        sizes = [int(lv.max()) + 1 for lv in levels]
        log(f"FINCH levels: {sizes}")
        f = min(i for i, s in enumerate(sizes) if s < args.max_fine)
        fine = unit_rows(cluster_means(x, levels[f], sizes[f]))
        fine_t = torch.from_numpy(fine)
        log(f"fine level {f}: {len(fine):,} prototypes")

        test = load_test_set(args.data, prep, limit=args.eval_images or None)
        extractor = FeatureExtractor(pf, prep).eval()
        with torch.no_grad():
            paths = [s.path for s in test.samples]
            test_feats = torch.cat([extractor(torch.from_numpy(_decode(paths[i : i + 16], prep)))
                                    for i in range(0, len(paths), 16)])  # [N, C, h, w] unit
        n, c, h, w = test_feats.shape
        unit = test_feats.permute(0, 2, 3, 1).reshape(-1, c)
        t0 = time.perf_counter()
        flat_best, flat_arg = flat_search(unit, fine_t)
        flat_torch_s = time.perf_counter() - t0
        log(f"flat search of {n} test images: {flat_torch_s:.0f} s")
        tail = ScoreTail(prep.crop)

        def metrics(shifted: torch.Tensor) -> dict:
            with torch.no_grad():
                maps, scores = tail(-shifted.reshape(n, 1, h, w))
            m = score_metrics(test, scores.numpy(), maps[:, 0].numpy())["overall"]
            return {k: round(float(m[k]), 5) for k in ("image_auroc", "pixel_auroc")}

        rows = [{"search": "flat", "fine": len(fine), **metrics(flat_best), "flops_per_image": 2 * len(fine) * c * h * w}]
        speed_batches = [_decode([p], prep) for p in
                         [s.path for s in load_test_set(args.data, prep, limit=args.speed_images).samples]]
        tops = [int(t) for t in args.tops.split(",")]
        speed_tops = {int(t) for t in args.speed_tops.split(",") if t}
        for off in (int(o) for o in args.coarse_offsets.split(",")):
            if f + off >= len(levels):
                continue
            parent = parents_from_levels(levels[f], levels[f + off])
            natural = int(np.bincount(parent).max())
            coarse = unit_rows(cluster_means(fine, parent, int(parent.max()) + 1))
            if args.max_children:
                parent, coarse = split_clusters(fine, parent, args.max_children)
            for top in tops:
                search = TwoStageSearch(fine, parent, coarse, top=top).eval()
                t0 = time.perf_counter()
                got = two_stage_scores(search, unit, flat_best, flat_arg, torch.from_numpy(parent))
                torch_s = time.perf_counter() - t0
                with torch.no_grad():  # the shortcut against the module itself on the first image
                    whole = search(test_feats[:1]).reshape(-1)
                assert torch.allclose(whole, got[: h * w], atol=1e-5), float((whole - got[: h * w]).abs().max())
                missed = got < flat_best - 1e-5
                row = {"search": "two-stage", "fine": len(fine), "coarse_level": f + off, "coarse_level_clusters": sizes[f + off],
                       "largest_cluster": natural, "coarse": len(coarse), "max_children": search.max_children, "top": top,
                       "gathered_rows": search.gathered_rows, "missed_patch_share": round(float(missed.float().mean()), 6),
                       "mean_score_error_missed": round(float((flat_best - got)[missed].mean()), 6) if missed.any() else 0.0,
                       **metrics(got), "flops_per_image": search.flops_per_patch() * h * w,
                       "gathered_bytes_per_image_fp16": search.gathered_rows * (c + 1) * 2 * h * w,
                       "torch_search_seconds": round(torch_s, 1)}
                rows.append(row)
                log(json.dumps(row))
        flat_net = ProtoADNetwork(pf, fine, prep, "fp32").eval()
        rows[0] |= onnx_speed(flat_net, speed_batches, Path(tmpdir))
        log(f"flat ONNX Runtime: {rows[0]['images_per_second']} images/s")
        del flat_net
        flat_scores = np.array(rows[0]["onnx_scores"])
        for row in rows[1:]:
            if row["top"] not in speed_tops:
                continue
            parent = parents_from_levels(levels[f], levels[row["coarse_level"]])
            coarse = unit_rows(cluster_means(fine, parent, int(parent.max()) + 1))
            if args.max_children:
                parent, coarse = split_clusters(fine, parent, args.max_children)
            net = ProtoADNetwork(pf, fine, prep, "fp32", two_stage=TwoStage(parent, coarse, row["top"])).eval()
            row |= onnx_speed(net, speed_batches, Path(tmpdir))
            row["speedup"] = round(row["images_per_second"] / rows[0]["images_per_second"], 2)
            row["max_image_score_difference_vs_flat"] = float(np.abs(np.array(row["onnx_scores"]) - flat_scores).max())
            log(f"coarse level {row['coarse_level']}, top {row['top']}: {row['images_per_second']} images/s ({row['speedup']}x)")
            del net
            args.out.write_text(json.dumps(_result(args, rows, sizes, f, timing, n, t_start), indent=1))
    args.out.write_text(json.dumps(_result(args, rows, sizes, f, timing, n, t_start), indent=1))
    log(f"wrote {args.out}")


def _decode(paths: list[Path], prep: Preprocessing) -> np.ndarray:
    """A batch [B, 3, S, S] of [0, 1] RGB images through the bundle's geometry."""
    return np.stack([prep.image_array(load_image(p)) for p in paths])


def _result(args, rows, sizes, f, timing, n_eval, t_start) -> dict:
    import subprocess

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, {model}, {os.cpu_count()} cores",
            "command": "python benchmarks/two_stage.py " + " ".join(sys.argv[1:]), "finch_level_sizes": sizes,
            "fine_level": f, "eval_images": n_eval, "speed_images": args.speed_images - 1, "timing": timing,
            "seconds": round(time.perf_counter() - t_start, 1), "rows": rows}


def table(result: dict) -> str:
    """Markdown of a finished run's rows."""
    head = ["search", "coarse level (clusters)", "coarse after cap", "M", "top", "rows per patch", "GFLOP/image",
            "missed patches %", "image AUROC %", "pixel AUROC %", "ORT FP32 images/s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        two = r["search"] == "two-stage"
        cells = [f"flat, {r['fine']:,} prototypes" if not two else "two-stage",
                 f"{r['coarse_level']} ({r['coarse_level_clusters']:,}; largest {r['largest_cluster']})" if two else "",
                 f"{r['coarse']:,}" if two else "", str(r["max_children"]) if two else "", str(r["top"]) if two else "",
                 str(r["gathered_rows"]) if two else f"{r['fine']:,}", f"{r['flops_per_image'] / 1e9:.1f}",
                 f"{100 * r['missed_patch_share']:.3f}" if two else "0", f"{100 * r['image_auroc']:.2f}",
                 f"{100 * r['pixel_auroc']:.2f}", f"{r['images_per_second']:.2f}" if "images_per_second" in r else "-",
                 f"{r['speedup']:.2f}x" if "speedup" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
