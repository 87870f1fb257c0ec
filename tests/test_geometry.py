"""``resize_mode="auto"``: the model input chosen from the training images' sizes (data/geometry.py)."""

from __future__ import annotations

import numpy as np
import pytest

from protoad_export.data.geometry import choose_geometry
from protoad_export.data.images import Preprocessing

AUTO = Preprocessing(mode="auto")  # resize 256, crop 224: the backbones' usual input


def test_square_camera_frames_get_the_authors_crop():
    prep, record = choose_geometry(AUTO, [(1024, 1000)] * 10)
    assert prep == Preprocessing(resize=256, crop=224, mode="crop")
    assert record["requested"] == "auto" and "centre crop" in record["reason"]
    assert record["chosen"] == prep.to_dict()


def test_elongated_camera_frames_keep_their_aspect_ratio():
    prep, record = choose_geometry(AUTO, [(2000, 800)] * 4)  # 1:2.5
    assert (prep.mode, prep.input_size) == ("squash", (560, 224))
    prep, _ = choose_geometry(AUTO, [(800, 2000)] * 4)  # the same part, portrait
    assert prep.input_size == (224, 560)
    # Sides are multiples of the stage-3 stride: 1:1.7 gives 380.8 -> 384.
    assert choose_geometry(AUTO, [(1700, 1000)])[0].input_size == (384, 224)
    assert "aspect ratio kept" in record["reason"]


def test_crops_of_one_orientation_are_letterboxed_at_their_median_aspect():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(w / a)) for w, a in zip(rng.integers(300, 600, 40), rng.uniform(1.8, 2.2, 40))]
    prep, record = choose_geometry(AUTO, sizes)
    assert prep.mode == "letterbox" and prep.input_size[1] == 224 and 400 <= prep.input_size[0] <= 496
    assert prep.input_size[0] % 16 == 0
    assert record["sizes"] > 1 and "landscape" in record["reason"]


def test_square_crops_of_many_sizes_are_resized_whole_into_the_usual_square():
    # Square cuts of the magnetic tiles: the whole square scored above the authors' crop (RESULTS 4).
    prep, record = choose_geometry(AUTO, [(s, s) for s in range(120, 400, 7)])
    assert prep == Preprocessing(mode="letterbox") and "sizes, about square (median 1:1.00)" in record["reason"]


def test_crops_of_both_orientations_are_letterboxed_into_the_usual_square():
    # Like the magnetic tiles: both orientations, median elongation about 1.4.
    sizes = [(357, 255)] * 10 + [(255, 357)] * 10 + [(300, 300)] * 3
    prep, record = choose_geometry(AUTO, sizes)
    assert prep == Preprocessing(mode="letterbox") and "both orientations" in record["reason"]


def test_a_chosen_mode_is_kept_and_auto_never_reaches_a_geometry():
    fixed = Preprocessing(mode="letterbox")
    assert choose_geometry(fixed, [(10, 500)]) == (fixed, {"requested": "letterbox"})
    with pytest.raises(ValueError, match="resolved by the build"):
        AUTO.geometry(100, 100)
    # No readable header: letterbox (the build then names the unreadable files).
    assert choose_geometry(AUTO, [])[0] == Preprocessing(mode="letterbox")
