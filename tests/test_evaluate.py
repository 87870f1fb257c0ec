"""``eval``: metrics per defect type, masks through the engine's geometry, kNN baseline, JSON and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from protoad_export.errors import InputError
from protoad_export.data.datasets import load_test_set
from protoad_export.data.images import Preprocessing, load_mask
from protoad_export.evaluation.evaluate import evaluate_bundle, format_table
from protoad_export.clustering.neighbours import nearest_similarity
from protoad_export.evaluation.knn import KnnBaseline, bank_images
from protoad_export.runtime import preprocess_paths


@pytest.fixture(scope="module")
def knn_report(small_bundle, small_category, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    # An 8-image bank keeps the exact search to seconds; bank_images() picks them evenly by name.
    return evaluate_bundle(small_bundle, small_category, baseline="knn", baseline_train_images=8, out_dir=out), out


def test_report_has_metrics_per_defect_and_overall(knn_report):
    report, out = knn_report
    for name in ("protoad", "knn"):
        m = report["methods"][name]["metrics"]
        assert set(m["per_defect"]) == {"crack", "blowhole"}
        assert m["overall"]["images"] == 10 and m["overall"]["defective"] == 6
        assert m["per_defect"]["crack"]["images"] == 4 + 3  # crack vs the good images
        for row in [m["overall"], *m["per_defect"].values()]:
            for key in ("image_auroc", "pixel_auroc", "pro"):
                assert 0.0 <= row[key] <= 1.0
        assert report["methods"][name]["images_per_second"] > 0
    assert report["map_resolution"] == [224, 224]
    counts = report["test_images"]
    assert (counts["total"], counts["good"], counts["per_defect"]) == (10, 4, {"blowhole": 3, "crack": 3})
    # Two of these cracks lie outside the 224 centre crop: their masks are empty after preprocessing.
    assert all("/crack/" in p for p in counts["image_level_only"])
    assert m["overall"]["pixel_images"] == 10 - len(counts["image_level_only"])


def test_per_image_scores_reproduce_the_image_auroc(knn_report):
    from sklearn.metrics import roc_auc_score

    report, _ = knn_report
    rows = report["image_scores"]
    assert len(rows) == 10 and sum(r["defect"] == "good" for r in rows) == 4
    assert all(r["image"].startswith("test/" + r["defect"] + "/") for r in rows)
    labels = [r["defect"] != "good" for r in rows]
    for name in ("protoad", "knn"):
        auroc = roc_auc_score(labels, [r[name] for r in rows])
        assert auroc == pytest.approx(report["methods"][name]["metrics"]["overall"]["image_auroc"], abs=1e-6)
    diffs = report["methods"]["protoad"]["image_auroc_minus_knn"]
    assert set(diffs) == {"overall", "crack", "blowhole"}
    for key, d in diffs.items():
        m = [report["methods"][n]["metrics"] for n in ("protoad", "knn")]
        got = [x["overall"] if key == "overall" else x["per_defect"][key] for x in m]
        assert d["difference"] == pytest.approx(got[0]["image_auroc"] - got[1]["image_auroc"], abs=1e-9)
        assert d["low"] <= d["difference"] <= d["high"]
    intervals = format_table(report).split("paired bootstrap interval: ")[1]
    assert intervals.startswith("blowhole ") and "; crack " in intervals and "; overall " in intervals


def test_json_and_plots_are_written(knn_report):
    report, out = knn_report
    assert json.loads((out / "evaluation.json").read_text()) == json.loads(json.dumps(report))
    for name in ("roc.png", "histogram.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 200
    table = format_table(report)
    assert "overall" in table and "crack" in table and "knn" in table


def test_knn_bank_is_every_patch_of_the_fitting_images(knn_report, small_bundle):
    report, _ = knn_report
    knn = report["methods"]["knn"]
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    assert knn["bank_images"] == 8 < manifest["train"]["images"] and knn["bank_subsampled"]
    assert knn["bank_patches"] == 8 * 56 * 56 and knn["dim"] == 176
    fit = bank_images(manifest)
    assert len(fit) == manifest["train"]["images"] and not {p.name for p in fit} & set(manifest["holdout"]["images"])
    assert report["methods"]["protoad"]["prototypes"] == manifest["prototypes"]["count"] < knn["bank_patches"]


def test_knn_scores_a_bank_image_as_normal(small_bundle):
    from protoad_export.bundle import read_manifest

    manifest = read_manifest(small_bundle)
    bank = bank_images(manifest, 2)
    assert len(bank) == 2 and not {p.name for p in bank} & set(manifest["holdout"]["images"])
    knn = KnnBaseline(small_bundle, manifest, bank)
    maps, scores = knn.predict(preprocess_paths(bank[:1], manifest))
    assert maps.shape == (1, 224, 224)
    assert scores[0] < 2e-3  # its own patches are in the bank (up to FP16 storage)


def test_masks_follow_the_engine_geometry(small_bundle, small_category, tmp_path):
    from protoad_export.bundle import read_manifest

    prep = Preprocessing.from_manifest(read_manifest(small_bundle))
    test = load_test_set(small_category, prep)
    i = next(k for k, s in enumerate(test.samples) if s.mask_path is not None)
    assert np.array_equal(test.masks[i], prep.mask_array(load_mask(test.samples[i].mask_path)))
    assert not test.masks[test.labels == 0].any()

    # A defective image without a mask counts at image level only.
    cat = tmp_path / "cat"
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    for sub in ("train", "test"):
        (cat / sub).symlink_to(small_category / sub)
    for m in sorted((small_category / "ground_truth" / "crack").iterdir())[1:]:
        (cat / "ground_truth" / "crack" / m.name).symlink_to(m)
    (cat / "ground_truth" / "blowhole").symlink_to(small_category / "ground_truth" / "blowhole")
    before = {s.path.name for s, ok in zip(test.samples, test.pixel_ok) if not ok}
    removed = sorted((small_category / "ground_truth" / "crack").iterdir())[0].name.replace("_mask.png", "")
    test = load_test_set(cat, prep)
    after = {s.path.name for s, ok in zip(test.samples, test.pixel_ok) if not ok}
    assert {n.rsplit(".", 1)[0] for n in after} == {n.rsplit(".", 1)[0] for n in before} | {removed}
    assert test.labels.sum() == 6


def test_eval_cli_writes_json_and_rejects_bad_input(small_bundle, small_category, tmp_path):
    from protoad_export.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(small_bundle), str(small_category), "--out", str(tmp_path / "ev"),
                                  "--json", str(tmp_path / "r.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["methods"]) == {"protoad"} and report["methods"]["protoad"]["backend"] == "onnxruntime"

    result = runner.invoke(main, ["eval", str(small_bundle), str(tmp_path / "nowhere"), "--quiet"])
    assert result.exit_code == 2 and result.output.startswith("error:") and "Traceback" not in result.output
    with pytest.raises(InputError, match="baseline"):
        evaluate_bundle(small_bundle, small_category, baseline="faiss")


@pytest.mark.parametrize("blocks", [(None, None), (7, 5), (1000, 3)])
def test_knn_search_is_exact_in_any_tiling(blocks):
    import torch

    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(2500, 16, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(1100, 16, generator=gen), dim=1)
    got = nearest_similarity(queries, bank, *blocks)
    # Same maxima up to the rounding of differently blocked products.
    torch.testing.assert_close(got, (queries @ bank.T).max(dim=1).values, rtol=0, atol=1e-6)
