"""Does ``--max-prototypes auto`` keep the right FINCH level? Every level's test scores beside its criterion.

Takes a bundle built with ``--max-prototypes auto`` (its backbone, geometry, fitting images and
hold-out), repeats the build's FINCH on the same fitting images keeping every level, recomputes
the level table on the same held-out patches, and scores the test set with each level's prototypes
of at most ``--cap`` and, with ``--fill N``, the partition of N clusters a build's ``auto`` keeps
where N is its cap and no level within it qualifies (the network's formula, ``1 - max cos`` -> upsample -> blur -> max, searched in the
kNN baseline's cache-sized tiles: the ONNX graph's numbers without its similarity tensor). With
``--bank`` the exact kNN bank of the fitting images is scored too (slow: every patch).

    python benchmarks/level_choice.py BUNDLE --data ../shared/data/magnetic_tile --out levels.json
    python benchmarks/level_choice.py --table levels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from protoad_export.build.pipeline import _inside_patches
from protoad_export.bundle import read_manifest
from protoad_export.clustering.finch import cluster_means, finch, merge_to_count
from protoad_export.clustering.levels import (AUTO_SAMPLE_PATCHES, add_cap_partition, level_table, sample_patches,
                                             unit_prototypes)
from protoad_export.data.datasets import load_test_set, training_images
from protoad_export.data.images import Preprocessing
from protoad_export.evaluation.evaluate import score_metrics
from protoad_export.evaluation.knn import KnnBaseline, bank_images
from protoad_export.model.features import FeatureExtractor, extract_features
from protoad_export.runtime import predict_paths
from protoad_export.runtime.pytorch import build_torch_network

METRICS = ("image_auroc", "pixel_auroc", "pro")


def _features(bundle: Path, manifest: dict, paths: list[Path], out: Path, desc: str):
    net = build_torch_network(bundle, manifest, "fp32")
    protoad = getattr(net, "network", net)
    prep = Preprocessing.from_manifest(manifest)
    return extract_features(FeatureExtractor(protoad.patch_features, prep), paths, prep, out, batch_size=8,
                            progress=False, desc=desc)


def _score(bundle: Path, manifest: dict, data: Path, limit: int | None, bank: np.ndarray | None, paths=()) -> dict:
    scorer = KnnBaseline(bundle, manifest, list(paths), bank=bank)
    test = load_test_set(data, scorer.preprocessing, limit=limit)
    t0 = time.perf_counter()
    pred = predict_paths(scorer, [s.path for s in test.samples], 8)
    secs = time.perf_counter() - t0
    return {"metrics": score_metrics(test, pred.scores, pred.maps), "images": len(test.samples),
            "images_per_second": round(len(test.samples) / secs, 3)}


def run(args) -> dict:
    manifest = read_manifest(args.bundle)
    selection = manifest["prototypes"].get("selection", {})
    if selection.get("rule") != "auto":
        sys.exit(f"error: {args.bundle} was not built with --max-prototypes auto")
    fitting = bank_images(manifest)
    names = set(manifest["holdout"]["images"])
    held_out = [p for p in training_images(manifest["train"]["data"]) if p.name in names]
    prep = Preprocessing.from_manifest(manifest)
    with tempfile.TemporaryDirectory(prefix="protoad-levels-", dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        feats = _features(args.bundle, manifest, fitting, Path(tmp) / "f.npy", "features")
        result = finch(feats.array, stop_below=None, keep_levels=True)
        finch_s = time.perf_counter() - t0
        held = _features(args.bundle, manifest, held_out, Path(tmp) / "h.npy", "hold-out")
        inside = np.concatenate([_inside_patches(prep, p, held.grid) for p in held.used])
        patches = sample_patches(held.array[np.flatnonzero(inside)], AUTO_SAMPLE_PATCHES)
        grid = tuple(feats.grid)
        normalized = manifest["prototypes"]["normalized"]
        rows = level_table(result.level_means, patches, normalize=normalized, grid=grid,
                           cap=args.cap, margin=selection["margin"])
        filled = {}
        for n in args.fill:
            # As the build does where its cap n binds: the finest level within n, the next finer merged to n.
            finer = next(r.level for r in rows if not r.to_cap and r.prototypes <= n) - 1
            if finer < 0:
                continue
            merged, k = merge_to_count(*result.level_links[finer], n)
            sizes = np.bincount(result.levels[finer], minlength=len(result.level_means[finer]))
            filled[k] = cluster_means(result.level_means[finer], merged, k, weights=sizes)
            add_cap_partition(rows, filled[k], patches, normalize=normalized, grid=grid, level=finer, keep=False)
    out_rows = []
    for row in rows:
        entry = row.to_dict()
        if row.within_cap and row.prototypes >= 2:
            means = filled[row.prototypes] if row.to_cap else result.level_means[row.level]
            protos = unit_prototypes(means, normalized)
            entry.update(_score(args.bundle, manifest, args.data, args.test_limit, protos))
            print(json.dumps({k: entry[k] for k in ("name", "prototypes", "excess")}),
                  {k: round(entry["metrics"]["overall"][k], 4) for k in METRICS}, flush=True)
        out_rows.append(entry)
    bank = None
    if args.bank:
        bank = _score(args.bundle, manifest, args.data, args.test_limit, None, fitting)
        bank["patches"] = int(feats.array.shape[0])
        print("bank", {k: round(bank["metrics"]["overall"][k], 4) for k in METRICS}, flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, {model}, {os.cpu_count()} cores",
            "command": "python benchmarks/level_choice.py " + " ".join(sys.argv[1:]),
            "bundle_prototypes": manifest["prototypes"]["count"], "preprocessing": manifest["preprocessing"],
            "fitting_images": len(fitting), "held_out_images": len(held_out), "finch_seconds": round(finch_s, 1),
            "rows": out_rows, "bank": bank}


def table(run: dict) -> str:
    """Markdown: per level, the criterion beside the test metrics (and the bank's, if scored)."""
    defects = sorted(next(r for r in run["rows"] if "metrics" in r)["metrics"]["per_defect"])
    head = ["level", "prototypes", "excess %", "kept", "image AUROC", "pixel AUROC", "PRO",
            *[f"{d} image AUROC" for d in defects], "conv GFLOP/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in run["rows"]:
        if "metrics" not in r:
            continue
        o = r["metrics"]["overall"]
        lines.append(f"| {r.get('name', r['level'])} | {r['prototypes']:,} | {100 * r['excess']:.1f} | {'yes' if r['chosen'] else ''} | "
                     + " | ".join(f"{100 * o[k]:.1f}" for k in METRICS) + " | "
                     + " | ".join(f"{100 * r['metrics']['per_defect'][d]['image_auroc']:.1f}" for d in defects)
                     + f" | {r['conv_gflops']:.0f} |")
    if run.get("bank"):
        o, b = run["bank"]["metrics"]["overall"], run["bank"]
        lines.append(f"| bank | {b['patches']:,} | 0 | | " + " | ".join(f"{100 * o[k]:.1f}" for k in METRICS) + " | "
                     + " | ".join(f"{100 * b['metrics']['per_defect'][d]['image_auroc']:.1f}" for d in defects) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, nargs="?")
    parser.add_argument("--data", type=Path, help="the MVTec-style category with test/ and ground_truth/")
    parser.add_argument("--out", type=Path, help="JSON report")
    parser.add_argument("--cap", type=int, default=400_000, help="score levels under this many prototypes")
    parser.add_argument("--fill", type=lambda s: [int(v) for v in s.split(",")], default=[],
                        help="comma-separated caps: also score the partition of that many clusters (see above)")
    parser.add_argument("--test-limit", type=int, default=None, help="score this many test images, evenly spread (default: all)")
    parser.add_argument("--bank", action="store_true", help="also score the exact kNN bank of the fitting images")
    parser.add_argument("--tmp", default=None, help="folder for the temporary features")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the Markdown table of a finished run")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.bundle is None or args.data is None or args.out is None:
        parser.error("BUNDLE, --data and --out are needed")
    report = run(args)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
