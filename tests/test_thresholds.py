"""Hold-out split, threshold rules and calibration (hand cases; one check on a real engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from protoad_export.bundle import read_manifest, write_manifest
from protoad_export.build.pipeline import BuildConfig
from protoad_export.errors import ArtifactError, InputError
from protoad_export.contract import manifest_threshold
from protoad_export.data.datasets import evenly_spaced
from protoad_export.build.holdout import split_holdout
from protoad_export.evaluation.thresholds import calibrate, f1_threshold, frr_threshold


def test_split_holdout_is_deterministic_disjoint_and_spread():
    paths = [f"{i:03d}.png" for i in range(100)]
    fit, held = split_holdout(paths, 0.1, 5)
    assert len(held) == 10 and len(fit) == 90
    assert set(fit).isdisjoint(held) and sorted(fit + held) == paths
    assert held == [paths[5 + 10 * i] for i in range(10)]  # centres of ten equal slices
    assert split_holdout(paths, 0.1, 5) == (fit, held)


def test_split_holdout_small_sets_keep_enough_for_fitting():
    assert split_holdout(list(range(12)), 0.1, 5)[1] == [6]  # a positive share holds out at least one
    assert split_holdout(list(range(5)), 0.1, 5) == (list(range(5)), [])  # never below min_fit
    assert split_holdout(list(range(7)), 0.9, 5)[1] == [1, 5]
    assert split_holdout(list(range(20)), 0.0, 5) == (list(range(20)), [])


def test_evenly_spaced():
    assert evenly_spaced(list(range(10)), 2) == [2, 7]
    assert evenly_spaced(list(range(3)), 5) == [0, 1, 2]
    assert evenly_spaced(list(range(3)), 0) == []


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5, "0.1", True])
def test_build_config_rejects_bad_holdout(share):
    with pytest.raises(InputError, match="holdout"):
        BuildConfig(backbone="efficientnet_lite0", holdout=share)


def test_frr_threshold_on_known_scores():
    scores = np.random.default_rng(0).permutation(np.arange(1, 101, dtype=float))
    t = frr_threshold(scores, 0.01)
    assert t.value == 99.0 and t.details["empirical_frr"] == 0.01 and t.details["resolved"]
    t = frr_threshold(scores, 0.05)
    assert t.value == 95.0 and np.mean(scores > t.value) == 0.05
    t = frr_threshold(scores, 0.013)  # 1.3 rejects allowed -> 1
    assert t.value == 99.0
    assert frr_threshold(scores, 0.0).value == 100.0
    assert 0.01 < t.details["frr_upper_95"] < 0.06


def test_frr_threshold_with_few_scores_uses_the_maximum_and_says_so():
    t = frr_threshold([0.3, 0.1, 0.2], 0.01)
    assert t.value == 0.3
    assert t.details["empirical_frr"] == 0.0 and t.details["resolved"] is False
    assert t.details["frr_upper_95"] > 0.6  # three scores prove little


def test_frr_threshold_bad_input():
    with pytest.raises(InputError, match="no normal hold-out"):
        frr_threshold([], 0.01)
    with pytest.raises(InputError, match="target FRR"):
        frr_threshold([1.0, 2.0], 1.0)
    with pytest.raises(InputError, match="NaN"):
        frr_threshold([1.0, np.nan], 0.1)


def test_f1_threshold_hand_case():
    # Sorted: 0.1 g, 0.2 g, 0.3 d, 0.35 g, 0.5 d, 0.6 d. Cut at 0.25: TP 3, FP 1 -> F1 6/7;
    # cut at 0.425: TP 2, FN 1 -> F1 4/5; so 0.25 wins.
    t = f1_threshold([0, 0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.35, 0.5, 0.6])
    assert t.value == pytest.approx(0.25)
    assert t.details["f1"] == pytest.approx(6 / 7)
    assert t.details["precision"] == pytest.approx(0.75) and t.details["recall"] == 1.0


def test_f1_threshold_ties_prefer_the_higher_threshold_and_separable_case():
    t = f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert t.value == pytest.approx(0.5) and t.details["f1"] == 1.0
    with pytest.raises(InputError, match="both"):
        f1_threshold([1, 1], [0.1, 0.2])


def _fake_engine(tmp_path, holdout):
    """A bundle with a manifest of the schema read_manifest checks, and no files."""
    engine = tmp_path / "engine"
    engine.mkdir()
    write_manifest(engine, {
        "tool": "protoad-export", "holdout": holdout, "files": {}, "align": "bilinear",
        "backbone": {"name": "efficientnet_lite0", "weights": "random", "weights_sha256": None},
        "preprocessing": {"resize": 80, "crop": 64, "mode": "crop", "mean": [0.5] * 3, "std": [0.5] * 3},
        "input": {"shape": ["batch", 3, 64, 64]}, "onnx": {"fp32": {"file": "model.fp32.onnx"}},
        "prototypes": {"file": "prototypes.npy", "count": 2, "dim": 176},
        "train": {"data": str(tmp_path), "grid": [16, 16]},
    })
    return engine


def test_calibrate_stores_the_threshold_in_the_manifest(tmp_path):
    scores = list(np.linspace(0.1, 0.3, 200))
    engine = _fake_engine(tmp_path, {"scores": scores, "network": "torch fp32", "count": 200})
    t = calibrate(engine, target_frr=0.02)
    manifest = read_manifest(engine)
    assert manifest_threshold(manifest) == t.value == scores[195]
    assert manifest["threshold"]["method"] == "frr"
    assert manifest["threshold"]["rule"] == "defective if score > threshold"
    assert not list(engine.glob(".*tmp"))  # written through a temporary file and a rename


def test_calibrate_without_holdout_is_a_clear_error(tmp_path):
    engine = _fake_engine(tmp_path, {"scores": [], "count": 0})
    with pytest.raises(ArtifactError, match="no hold-out scores"):
        calibrate(engine)
    from protoad_export.cli import main

    result = CliRunner().invoke(main, ["calibrate", str(engine)])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_holdout_is_recorded_and_scored_by_build(small_bundle, small_category):
    m = read_manifest(small_bundle)
    h = m["holdout"]
    names = sorted(p.name for p in (small_category / "train" / "good").iterdir())
    fit, held = split_holdout(names, 0.1, 5)
    assert h["share"] == 0.1 and h["count"] == len(held) == round(0.1 * len(names)) and h["images"] == held
    assert m["train"]["images"] == len(fit)  # the held-out images were not fitted
    assert len(h["scores"]) == len(held) and h["mean"] == pytest.approx(np.mean(h["scores"]))
    assert h["quantiles"]["1.0"] == pytest.approx(max(h["scores"])) and h["std"] > 0
    # The recorded score is what the FP32 torch network gives for that image.
    from protoad_export.runtime import load, predict_paths

    preds = predict_paths(load(small_bundle, "torch"), [small_category / "train" / "good" / h["images"][0]])
    assert preds.scores[0] == pytest.approx(h["scores"][0], rel=1e-4)


def test_calibrate_cli_with_data_chooses_f1(small_bundle, small_category, tmp_path):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(small_bundle, engine)
    from protoad_export.cli import main

    result = CliRunner().invoke(main, ["calibrate", str(engine), "--data", str(small_category), "--quiet"])
    assert result.exit_code == 0, result.output
    m = json.loads((engine / "manifest.json").read_text())
    assert m["threshold"]["method"] == "f1" and 0 < m["threshold"]["details"]["f1"] <= 1
    assert "F1" in result.output


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0.0, -0.2, True, "0.3", None])
def test_every_threshold_must_be_finite_and_positive(value):
    """A NaN threshold passes every part (score > NaN is never true); inf, 0 or less decide nothing."""
    from protoad_export.evaluation.thresholds import check_threshold

    with pytest.raises(InputError, match=r"--threshold: the threshold must be a finite positive number"):
        check_threshold(value, "--threshold")
    with pytest.raises(ArtifactError, match=r"e/manifest.json: the threshold must be a finite positive number .*: re-run calibrate"):
        manifest_threshold({"threshold": {"value": value}}, "e")
    assert check_threshold(0.25, "--threshold") == manifest_threshold({"threshold": {"value": 0.25}}) == 0.25
