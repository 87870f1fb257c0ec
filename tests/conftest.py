"""Shared fixtures: real data from ../shared (skipped with a reason when absent) and small bundles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", REPO.parent / "shared" / "data"))
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    """The real MVTec-style magnetic tile category from ../shared/data (never copied into the repo)."""
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {MAGNETIC_TILE} (set PROTOAD_SHARED_DATA)")
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def small_category(tmp_path_factory, magnetic_tile) -> Path:
    """A small MVTec-style category of real images: 40 train/good, a few test images per type, with masks.

    Built from symlinks, so nothing is copied.
    """
    root = tmp_path_factory.mktemp("mt_small")
    train = sorted((magnetic_tile / "train" / "good").iterdir())[:40]
    (root / "train" / "good").mkdir(parents=True)
    for p in train:
        (root / "train" / "good" / p.name).symlink_to(p)
    for defect, count in (("good", 4), ("crack", 3), ("blowhole", 3)):
        (root / "test" / defect).mkdir(parents=True)
        for p in sorted((magnetic_tile / "test" / defect).iterdir())[:count]:
            (root / "test" / defect / p.name).symlink_to(p)
            if defect != "good":
                gt = root / "ground_truth" / defect
                gt.mkdir(parents=True, exist_ok=True)
                mask = magnetic_tile / "ground_truth" / defect / f"{p.stem}_mask.png"
                (gt / mask.name).symlink_to(mask)
    return root


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory, small_category) -> Path:
    """A bundle built with the offline backbone on ``small_category``'s
    40 real training images (about a minute on 2 cores, built once per pytest run)."""
    from protoad_export.build.pipeline import BuildConfig, build
    from protoad_export.data.images import Preprocessing

    out = tmp_path_factory.mktemp("engines")
    # The authors' geometry (crop 224) keeps the suite fast; the crops differ in size: a tensor input.
    config = BuildConfig(backbone="efficientnet_lite0", batch_size=8, input="tensor", preprocessing=Preprocessing(mode="crop"),
                         max_prototypes=10_000)  # the paper's rule: its tests check it
    result = build(small_category, "small", out, config, log=None, progress=False)
    return result.bundle_dir


def write_image(path: Path, size=(64, 48), mode="RGB", seed=0) -> Path:
    """A small textured test image in any PIL mode."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
