"""The synthetic dataset generator and a tiny end-to-end demo run."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from scipy import ndimage

from protoad_export.data.synthetic import DEFECTS, DatasetSpec, make_dataset
from protoad_export.demo import run_demo
from protoad_export.data.datasets import category_test_set, training_images

SPEC = DatasetSpec(train=4, test_good=2, test_per_defect=2, width=96, height=64)


def test_dataset_layout_and_masks(tmp_path):
    root = make_dataset(tmp_path / "parts", seed=1, spec=SPEC)
    assert len(training_images(root)) == 4
    samples = category_test_set(root)  # every defective image has its mask
    assert sorted({s.defect for s in samples}) == sorted(["good", *DEFECTS])
    for s in samples:
        with Image.open(s.path) as img:
            assert img.size == (96, 64) and img.mode == "RGB"  # non-square on purpose
            gray = np.asarray(img.convert("L"), dtype=np.float64)
        if s.mask_path is None:
            continue
        with Image.open(s.mask_path) as m:
            assert m.size == img.size and m.mode == "L"
            mask = np.asarray(m) > 127
        assert set(np.unique(np.asarray(Image.open(s.mask_path)))) <= {0, 255} and mask.any()
        # The defect is visible where the mask says: it differs from the ring around it.
        ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1)
        assert abs(gray[mask].mean() - gray[ring].mean()) > 15


def test_dataset_is_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", seed=3, spec=SPEC)
    b = make_dataset(tmp_path / "b", seed=3, spec=SPEC)
    c = make_dataset(tmp_path / "c", seed=4, spec=SPEC)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_demo_runs_end_to_end_with_tiny_settings(tmp_path):
    spec = DatasetSpec(train=7, test_good=2, test_per_defect=1, width=80, height=60)
    result = run_demo(tmp_path / "demo", spec=spec, crop=48, log=lambda _m: None, progress=False)
    manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
    assert manifest["threshold"]["method"] == "frr" and manifest["holdout"]["count"] == 1
    report = json.loads((result.evaluation / "evaluation.json").read_text())
    assert set(report["methods"]) == {"protoad", "knn"}
    assert set(report["methods"]["protoad"]["metrics"]["per_defect"]) == set(DEFECTS)
    rows = (result.predictions / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 + len(DEFECTS)
    assert len(list((result.predictions / "heatmaps").glob("*.png"))) == 5
