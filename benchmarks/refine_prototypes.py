"""Does moving FINCH's prototypes help? Lloyd steps of spherical k-means on an engine's prototypes.

Each step assigns every training patch of the engine to its most similar prototype (exact, in the
kNN baseline's cache-sized tiles) and replaces each prototype by the re-normalised mean of its
patches (empty ones stay). That minimises the training patches' mean ProtoAD score
(1 - max cosine), which is printed before and after. The refined prototypes are scored on the
test set like ``TiledPrototypes`` (the network's formula) and compared with the engine's own
evaluation report when one is given. An experiment, not a build option: results/knn_comparison.md, "Tried and not kept".

    flock /tmp/protoad-bench.lock python benchmarks/refine_prototypes.py DIR/engines/letterbox762_p50000 \
        --steps 1 --features FEATS.npy --out refine_40k.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from protoad_export.bundle import load_array, read_manifest
from protoad_export.evaluation.evaluate import CPU_TILE, NearestPatchScorer, bank_images, load_test_set, run_predictor, score_metrics
from protoad_export.model.features import extract_features
from protoad_export.clustering.finch import cluster_means

DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "magnetic_tile"


def nearest_prototype(features: np.ndarray, protos: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of every FP16 feature row's most similar prototype, in cache-sized tiles."""
    labels = np.empty(len(features), np.int64)
    sims = np.empty(len(features), np.float32)
    for s in range(0, len(features), 1 << 16):
        q = torch.from_numpy(np.asarray(features[s : s + (1 << 16)], np.float32))
        q /= q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for a in range(0, len(q), CPU_TILE):
            rows = q[a : a + CPU_TILE]
            best = torch.full((len(rows),), -torch.inf)
            arg = torch.zeros(len(rows), dtype=torch.int64)
            for b in range(0, len(protos), CPU_TILE):
                sim = rows @ protos[b : b + CPU_TILE].T
                better = torch.nonzero(sim.amax(dim=1) > best)[:, 0]  # indices only where it improves
                if len(better):
                    best[better], top = sim[better].max(dim=1)
                    arg[better] = top + b
            labels[s + a : s + a + len(rows)], sims[s + a : s + a + len(rows)] = arg.numpy(), best.numpy()
    return labels, sims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--features", type=Path, required=True,
                        help="FP16 .npy of the engine's fitting images' features (hold-out excluded; made if missing)")
    parser.add_argument("--report", type=Path, help="the engine's evaluation report (eval_magnetic_tile.py) to compare with")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    manifest = read_manifest(args.engine)
    scorer = NearestPatchScorer(args.engine, manifest)
    if not args.features.exists():  # a cache: written whole, then renamed, so a killed run leaves none
        part = args.features.with_suffix(".part.npy")
        extract_features(scorer.extractor, bank_images(manifest), scorer.prep, part,
                         batch_size=8, progress=False)
        os.replace(part, args.features)
    features = np.load(args.features, mmap_mode="r")
    protos = np.asarray(load_array(args.engine, manifest, manifest["prototypes"]["file"]), np.float32)
    steps = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        labels, sims = nearest_prototype(features, torch.from_numpy(protos))
        means = cluster_means(features, labels, len(protos))
        empty = np.bincount(labels, minlength=len(protos)) == 0
        means[empty] = protos[empty]
        protos = (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        steps.append({"train_mean_score_before": float(np.mean(1 - sims)), "empty": int(empty.sum()),
                      "seconds": round(time.perf_counter() - t0, 1)})
        print(f"step {step}: {steps[-1]}", flush=True)
    after = float(np.mean(1 - nearest_prototype(features, torch.from_numpy(protos))[1]))
    print(f"train mean score after: {after:.5f}", flush=True)
    scorer.bank = torch.from_numpy(protos)
    test = load_test_set(DATA, scorer.prep)
    maps, scores, secs = run_predictor(scorer, manifest, [t.path for t in test.samples], 8, False, "refined")
    metrics = score_metrics(test, scores, maps)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/refine_prototypes.py " + " ".join(sys.argv[1:]),
              "prototypes": len(protos), "steps": steps, "train_mean_score_after": after, "metrics": metrics,
              "image_scores": [float(v) for v in scores]}
    if args.report:
        result["engine_metrics"] = json.loads(args.report.read_text())["methods"]["protoad"]["metrics"]
    args.out.write_text(json.dumps(result, indent=1))
    for name, m in [("engine", result.get("engine_metrics")), ("refined", metrics)]:
        if m:
            o = m["overall"]
            print(f"{name}: image AUROC {100 * o['image_auroc']:.2f}, pixel AUROC {100 * o['pixel_auroc']:.2f}, "
                  f"PRO {100 * o['pro']:.2f}; per type " + ", ".join(f"{d} {100 * v['image_auroc']:.1f}" for d, v in m["per_defect"].items()))


if __name__ == "__main__":
    main()
