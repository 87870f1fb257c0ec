"""FINCH at product-line scale: this project's FINCH against ``finch-clust`` 0.2.3 on real features.

Run (heavy: hold the shared lock so runs do not overlap)::

    flock /tmp/protoad-bench.lock python benchmarks/finch_scaling.py --out benchmarks/results/finch.md

Features of the magnetic tile train set (762 images, efficientnet_lite0) and test set (582 images)
are extracted once into ``--cache``. For each N a seeded uniform sample of train rows (the rule of
``--max-train-patches``) is clustered by both implementations, each in its own subprocess so that
peak RSS is per method. Reported: seconds, peak RSS, partition sizes, first-neighbour recall on
a 20k subset against exact search, and the image AUROC of the prototypes (10,000 stop rule) on the
test set, scored exactly as ``ProtoADNetwork`` scores (1 - max cos, bilinear upsample, blur, max).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "magnetic_tile"


def extract(backbone: str, paths: list[Path], out: Path, weights: str | None = None) -> np.ndarray:
    """Cached FP16 patch features of ``paths`` (the build's own extractor)."""
    from protoad_export.backbones import load_backbone
    from protoad_export.features import FeatureExtractor, PatchFeatures, extract_features
    from protoad_export.images import Preprocessing
    from protoad_export.network import patch_grid

    if not out.exists():
        prep = Preprocessing()
        bb = load_backbone(backbone, weights)
        grid = patch_grid(prep.crop, bb.spec.strides[0])
        tmp = out.with_suffix(".part.npy")
        t0 = time.perf_counter()
        ex = extract_features(FeatureExtractor(PatchFeatures(bb.module, "bilinear", grid), prep), paths, prep, tmp,
                              batch_size=16, progress=False)
        assert not ex.skipped
        del ex
        os.replace(tmp, out)
        print(f"extracted {len(paths)} images -> {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return np.load(out, mmap_mode="r")


def cache_features(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from protoad_export.images import category_test_set, training_images

    cache.mkdir(parents=True, exist_ok=True)
    train = extract("efficientnet_lite0", training_images(DATA), cache / "train_effnet.npy")
    tests = category_test_set(DATA)
    test = extract("efficientnet_lite0", [t.path for t in tests], cache / "test_effnet.npy")
    labels = np.array([t.label for t in tests])
    return train, test, labels


if __name__ == "__main__" and sys.argv[1:2] == ["--cache-only"]:
    cache_features(Path(sys.argv[2]))
    sys.exit(0)
