"""``predict``: output files opened and checked against the scores and the threshold."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from protoad_export.bundle import add_files_to_manifest
from protoad_export.errors import InputError
from protoad_export.predict import HEATMAP_SCALE, colorize, predict


@pytest.fixture(scope="module")
def bundle_with_threshold(small_bundle, tmp_path_factory):
    """A copy of the shared engine (never modified) with a threshold in its manifest."""
    engine = tmp_path_factory.mktemp("pred") / "engine"
    shutil.copytree(small_bundle, engine)
    return engine


@pytest.fixture(scope="module")
def predicted(bundle_with_threshold, small_category, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred_out")
    # Midway between the hold-out score and the top test score, so both decisions occur.
    from protoad_export.runtime import load, predict_paths

    paths = sorted((small_category / "test").glob("*/*.jpg"))
    scores = predict_paths(load(bundle_with_threshold), paths).scores
    threshold = float(np.median(scores))
    add_files_to_manifest(bundle_with_threshold, [], {"threshold": {"value": threshold, "method": "manual"}})
    results = predict(bundle_with_threshold, [small_category / "test" / "good", str(small_category / "test" / "c*" / "*.jpg"),
                                              small_category / "test" / "blowhole"], out)
    return results, out, threshold


def test_every_image_gets_consistent_outputs(predicted):
    results, out, threshold = predicted
    assert len(results) == 10 and {r.decision for r in results} == {"good", "defective"}
    for r in results:
        assert r.decision == ("defective" if r.score > threshold else "good")
        with Image.open(out / r.heatmap) as h, Image.open(out / r.overlay) as o, Image.open(out / r.mask) as m, \
                Image.open(r.path) as original:
            # In the image's own pixels (a camera frame's), not the model's 224 x 224.
            assert h.size == o.size == m.size == original.size == (r.width, r.height)
            assert h.mode == o.mode == "RGB" and m.mode == "L"
            mask = np.asarray(m)
        assert set(np.unique(mask)) <= {0, 255}
        # The score is the map's maximum, so a defective decision always comes with mask pixels.
        assert mask.any() == (r.decision == "defective")
        left, top, right, bottom = r.inspected_box
        assert not mask[:top].any() and not mask[bottom:].any()  # the centre crop's uninspected ends
        assert r.defect_pixels == pytest.approx((mask[top:bottom, left:right] > 0).mean())


def test_csv_and_json_tables(predicted):
    results, out, threshold = predicted
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == [r.path for r in results]
    assert all(float(r["score"]) == pytest.approx(x.score) for r, x in zip(rows, results))
    meta = json.loads((out / "results.json").read_text())
    assert meta["threshold"] == threshold and meta["heatmap_scale"] == [0.0, HEATMAP_SCALE * threshold]
    assert sum(meta["counts"].values()) == 10 and "own pixels" in meta["resolution"]
    assert not list(out.rglob(".*.tmp"))


def test_heatmap_scale_is_fixed_not_per_image():
    low = np.full((4, 4), 0.1, np.float32)
    high = np.full((4, 4), 0.3, np.float32)
    assert not np.array_equal(colorize(low, 0.4), colorize(high, 0.4))  # min-max scaling would equalise them
    assert np.array_equal(colorize(np.full((2, 2), 5.0), 0.4), colorize(np.full((2, 2), 0.4), 0.4))  # clipped


def test_unreadable_images_and_duplicate_names(bundle_with_threshold, small_category, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    good = sorted((small_category / "test" / "good").iterdir())[0]
    (a / "x.png").symlink_to(good)
    (b / "x.png").symlink_to(good)
    (b / "broken.png").write_bytes(b"not a png")
    results = predict(bundle_with_threshold, [a, b], tmp_path / "out", threshold=0.5)
    by_name = {r.path: r for r in results}
    assert by_name[str(b / "broken.png")].decision == "error"
    assert {r.heatmap for r in results if r.heatmap} == {"heatmaps/a_x.png", "heatmaps/b_x.png"}
    with pytest.raises(InputError, match="could be read"):
        predict(bundle_with_threshold, [b / "broken.png"], tmp_path / "out2", threshold=0.5)


def test_no_threshold_is_a_clear_error(small_bundle, small_category, tmp_path):
    from protoad_export.cli import main

    result = CliRunner().invoke(main, ["predict", str(small_bundle), str(small_category / "test" / "good"),
                                       "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2 and "calibrate" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["predict", str(small_bundle), str(small_category / "test" / "good"),
                                       "--out", str(tmp_path / "o"), "--threshold", "0.3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "results.csv").is_file() and "4 images" in result.output
