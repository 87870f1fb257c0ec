"""Tests for protoad_export.evaluation.metrics: hand-worked cases and brute-force references."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from protoad_export.errors import InputError
from protoad_export.evaluation.metrics import (
    Metrics,
    evaluate,
    image_auroc,
    paired_auroc_difference,
    pixel_auroc,
    pro_curve,
    pro_score,
    resize_mask,
)

# --------------------------------------------------------------------------------------------
# Brute-force references, written independently of the implementation


def _label_8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions of one 2-D mask by breadth-first flood fill."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or seen[r0, c0]:
                continue
            seen[r0, c0] = True
            queue, region = deque([(r0, c0)]), []
            while queue:
                r, c = queue.popleft()
                region.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                            seen[rr, cc] = True
                            queue.append((rr, cc))
            regions.append(region)
    return regions


def _brute_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[list[float], list[float]]:
    regions = [
        (i, np.array(region)) for i, mask in enumerate(masks) for region in _label_8(mask)
    ]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= t
        fprs.append(np.count_nonzero(predicted & normal) / np.count_nonzero(normal))
        overlaps = [predicted[i][rc[:, 0], rc[:, 1]].mean() for i, rc in regions]
        pros.append(float(np.mean(overlaps)))
    return fprs, pros


def _brute_partial_area(fprs: list[float], pros: list[float], max_fpr: float) -> float:
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if x0 >= max_fpr:
            break
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_cut) / 2
            break
    return area


def _brute_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _random_case(seed: int, n: int = 3, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Blob-shaped regions, one defect-free image, and quantised scores so that ties occur."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.8)
    masks[0] = False
    if not masks.any():
        masks[1, 3:5, 3:6] = True
    maps = np.round(0.6 * masks + rng.random((n, size, size)), 1)
    return masks, maps


# --------------------------------------------------------------------------------------------
# PRO: hand-worked cases


def _one_region_half_covered() -> tuple[np.ndarray, np.ndarray]:
    # 10x10 image, one 4x5 region (20 px) and 80 normal pixels.
    # Region: 10 px at 0.9, 10 px at 0.2. Normal: 8 px at 0.5, 72 px at 0.0.
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 2:7] = True
    score = np.zeros((10, 10))
    region = np.argwhere(mask)
    score[tuple(region[:10].T)] = 0.9
    score[tuple(region[10:].T)] = 0.2
    score[9, :8] = 0.5
    return mask, score


def test_pro_one_region_half_covered() -> None:
    # t=0.9: PRO 10/20 = 0.5, FPR 0;  t=0.5: PRO 0.5, FPR 8/80 = 0.1;
    # t=0.2: PRO 1.0, FPR 0.1;        t=0.0: (1, 1).
    # Area on [0, 0.3]: 0.1 * 0.5 + 0.2 * 1.0 = 0.25, so PRO score = 0.25 / 0.3 = 5/6.
    mask, score = _one_region_half_covered()
    fpr, pro = pro_curve(mask[None], score[None])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.1, 0.1, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 0.5, 1.0, 1.0])
    assert pro_score(mask[None], score[None]) == pytest.approx(5 / 6, abs=1e-12)


def test_pro_is_mean_of_region_overlaps_not_pixel_overlap() -> None:
    # Image 0: small 2x2 region, fully detected. Image 1: large 10x10 region, half detected.
    # Image 2: defect-free. At t = 1: PRO = (1 + 0.5) / 2 = 0.75, whereas the pixel overlap would be
    # (4 + 50) / 104 = 0.519. FPR(1) = 0. Curve: (0,0) -> (0,0.75) -> (1,1);
    # at FPR 0.3 the curve is 0.75 + 0.25 * 0.3 = 0.825, area = 0.3 * (0.75 + 0.825) / 2 = 0.23625,
    # so the score is 0.23625 / 0.3 = 0.7875.
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 5:7, 5:7] = True
    masks[1, 5:15, 5:15] = True
    maps = np.zeros((3, 20, 20))
    maps[0, 5:7, 5:7] = 1.0
    maps[1, 5:10, 5:15] = 1.0

    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.75, 1.0])
    assert pro_score(masks, maps) == pytest.approx(0.7875, abs=1e-12)


def test_pro_uses_8_connectivity() -> None:
    # Diagonal pair (0,0),(1,1) is ONE region under 8-connectivity; plus a separate 2-px region.
    # Only (0,0) scores high: 8-connected PRO = (1/2 + 0) / 2 = 0.25 (4-connected would be 1/3).
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    mask[5, 5:7] = True
    score = np.zeros((8, 8))
    score[0, 0] = 1.0
    fpr, pro = pro_curve(mask[None], score[None])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 1.0])


def test_regions_do_not_connect_across_images() -> None:
    # Same pixel lit in two images: two regions, not one 3-D component.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, 1, 1] = True
    masks[1, 1, 2] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1] = 1.0
    # Region overlaps 1 and 0 -> PRO(1) = 0.5 (one 3-D component would give 1/3).
    _, pro = pro_curve(masks, maps)
    assert pro[1] == pytest.approx(0.5)


def test_defect_free_images_count_as_normal_pixels() -> None:
    # Image 0: 4-px region perfectly detected, 12 normal px at 0. Image 1: no defect, 16 normal px,
    # 4 of which score 1. FPR(1) = 4 / 28.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    maps = np.zeros((2, 4, 4))
    maps[0, :2, :2] = 1.0
    maps[1, 0, :] = 1.0
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 4 / 28, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0, 1.0])


def test_perfect_map() -> None:
    masks, _ = _random_case(1, n=4, size=16)
    maps = masks.astype(np.float32) * 0.7 + 0.1
    assert pro_score(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(1.0)
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0, 1.0])


def test_inverted_map() -> None:
    masks, _ = _random_case(2, n=4, size=16)
    maps = 1.0 - masks.astype(np.float64)
    # Every normal pixel switches on before any defect pixel: PRO is 0 until FPR 1.
    assert pro_score(masks, maps) == pytest.approx(0.0, abs=1e-12)
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(0.0)


def test_constant_map_ties() -> None:
    masks, _ = _random_case(3)
    maps = np.full(masks.shape, 0.42)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5)
    fpr, pro = pro_curve(masks, maps)
    # All pixels switch together: one step from (0,0) to (1,1), nothing in between.
    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_array_equal(pro, [0.0, 1.0])
    # Interpolated at 0.3 the diagonal gives 0.3; area 0.3 * 0.3 / 2 = 0.045; / 0.3 = 0.15.
    assert pro_score(masks, maps) == pytest.approx(0.15, abs=1e-12)
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(0.5, abs=1e-12)


def test_pro_curve_monotone_and_ends() -> None:
    masks, maps = _random_case(4, n=4, size=20)
    fpr, pro = pro_curve(masks, maps)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(pro) >= -1e-12)
    assert len(fpr) == len(np.unique(maps)) + 1


# --------------------------------------------------------------------------------------------
# PRO: brute-force reference


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_pro_matches_brute_force(seed: int, max_fpr: float) -> None:
    masks, maps = _random_case(seed)
    ref_fpr, ref_pro = _brute_pro_curve(masks, maps)

    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, rtol=0, atol=1e-12)

    expected = _brute_partial_area(ref_fpr, ref_pro, max_fpr) / max_fpr
    assert pro_score(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)


def test_pro_brute_force_with_float_scores_without_ties() -> None:
    rng = np.random.default_rng(99)
    masks, _ = _random_case(99)
    maps = rng.random(masks.shape) + masks
    ref_fpr, ref_pro = _brute_pro_curve(masks, maps)
    expected = _brute_partial_area(ref_fpr, ref_pro, 0.3) / 0.3
    assert pro_score(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pro_max_fpr_on_a_curve_vertex() -> None:
    # The FPR grid is k / 80, so 0.1 and 0.3 fall on vertices: no interpolation needed there.
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, :2, :] = True  # 20 px region, 80 normal px
    maps = np.arange(100, dtype=float).reshape(1, 10, 10)[:, ::-1, :].copy()
    ref_fpr, ref_pro = _brute_pro_curve(masks, maps)
    for max_fpr in (0.1, 0.3):
        expected = _brute_partial_area(ref_fpr, ref_pro, max_fpr) / max_fpr
        assert pro_score(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-12)
    # The region holds the 20 highest scores: perfect detection.
    assert pro_score(masks, maps) == pytest.approx(1.0)


def test_pro_num_thresholds() -> None:
    masks, maps = _random_case(5, n=4, size=24)
    maps = maps + np.random.default_rng(5).random(maps.shape) * 1e-3  # distinct scores
    exact = pro_score(masks, maps)
    # With at least P + 1 quantiles every pixel score is a threshold: the curve is the exact one.
    assert pro_score(masks, maps, num_thresholds=maps.size + 1) == pytest.approx(exact, abs=1e-12)
    approx = pro_score(masks, maps, num_thresholds=200)
    assert approx == pytest.approx(exact, abs=0.02)
    assert 0.0 <= pro_score(masks, maps, num_thresholds=2) <= 1.0


def test_pro_num_thresholds_hand_worked() -> None:
    # Scores: 72 px at 0.0, 10 at 0.2, 8 at 0.5, 10 at 0.9 (see _one_region_half_covered).
    mask, score = _one_region_half_covered()
    # 3 quantiles q = 0, 0.5, 1 (inverted CDF; CDF(0.0) = 0.72) -> thresholds {0.0, 0.9}.
    # Curve (0,0) -> (0,0.5) -> (1,1); at FPR 0.3 it is 0.65; area 0.3 * (0.5 + 0.65) / 2 = 0.1725,
    # score 0.1725 / 0.3 = 0.575.
    assert pro_score(mask[None], score[None], num_thresholds=3) == pytest.approx(0.575, abs=1e-12)
    # 5 quantiles q = 0, .25, .5, .75, 1 -> {0.0, 0.2, 0.9} (CDF(0.2) = 0.82).
    # Curve (0,0) -> (0,0.5) -> (0.1,1) -> (1,1); area 0.1 * 0.75 + 0.2 * 1 = 0.275, / 0.3 = 11/12.
    assert pro_score(mask[None], score[None], num_thresholds=5) == pytest.approx(11 / 12, abs=1e-12)


def test_pro_num_thresholds_constant_map() -> None:
    masks, _ = _random_case(6)
    maps = np.ones(masks.shape)
    assert pro_score(masks, maps, num_thresholds=50) == pytest.approx(0.15, abs=1e-12)


def test_pro_errors() -> None:
    masks, maps = _random_case(7)
    with pytest.raises(InputError, match="region"):
        pro_score(np.zeros_like(masks), maps)
    with pytest.raises(InputError, match="normal"):
        pro_score(np.ones_like(masks), maps)
    with pytest.raises(InputError, match="max_fpr"):
        pro_score(masks, maps, max_fpr=0.0)
    with pytest.raises(InputError, match="max_fpr"):
        pro_score(masks, maps, max_fpr=1.5)
    with pytest.raises(InputError, match="num_thresholds"):
        pro_score(masks, maps, num_thresholds=1)
    with pytest.raises(InputError, match="resize_mask"):
        pro_score(masks[:, :6], maps)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        pro_score(masks, bad)


def test_pro_large_input_is_fast() -> None:
    # 40 x 224 x 224 = 2M pixels; the exact curve is one sort, so this takes well under a second.
    rng = np.random.default_rng(0)
    maps = rng.random((40, 224, 224), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[::2, 50:90, 60:120] = True
    score = pro_score(masks, maps)
    # Random scores: PRO(t) tracks FPR(t), so the area is about max_fpr / 2, normalised 0.15.
    assert score == pytest.approx(0.15, abs=0.01)


# --------------------------------------------------------------------------------------------
# AUROC


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=30).filter(
        lambda pairs: len({label for label, _ in pairs}) == 2
    )
)
def test_image_auroc_matches_mann_whitney(pairs: list[tuple[bool, int]]) -> None:
    labels = np.array([int(label) for label, _ in pairs])
    scores = np.array([score for _, score in pairs], dtype=float)  # small integers: many ties
    assert image_auroc(labels, scores) == pytest.approx(_brute_auroc(labels, scores), abs=1e-12)


def test_image_auroc_hand_cases() -> None:
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    # Pairs (pos, neg): (0.5, 0.5) tie = 0.5, (0.5, 0.1) = 1, (0.9, *) = 2 -> 3.5 / 4.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.5, 0.1, 0.5, 0.9])) == 0.875
    assert image_auroc([False, True], [3, 7]) == 1.0


def test_image_auroc_errors() -> None:
    with pytest.raises(InputError, match="both normal"):
        image_auroc(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(InputError, match="both normal"):
        image_auroc(np.array([0, 0]), np.array([0.1, 0.2]))
    with pytest.raises(InputError, match="3 labels but 2"):
        image_auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(InputError, match="0 .normal. or 1"):
        image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(InputError, match="NaN"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))


def test_pixel_auroc_matches_mann_whitney() -> None:
    masks, maps = _random_case(8, n=2, size=8)
    expected = _brute_auroc(masks.ravel().astype(int), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_errors() -> None:
    maps = np.zeros((2, 4, 4))
    with pytest.raises(InputError, match="defective and normal"):
        pixel_auroc(np.zeros((2, 4, 4), dtype=bool), maps)
    with pytest.raises(InputError, match="shape"):
        pixel_auroc(np.zeros((2, 5, 4), dtype=bool), maps)


# --------------------------------------------------------------------------------------------
# Mask resizing


def test_resize_mask_uint8_antialiased_edge() -> None:
    # A 0/255 mask whose edge is anti-aliased to 100 (mostly background) and 200 (mostly defect).
    src = np.array(
        [
            [0, 100, 200, 255],
            [0, 100, 200, 255],
            [0, 0, 100, 200],
        ],
        dtype=np.uint8,
    )
    out = resize_mask(src, (6, 8))  # exactly 2x: each source pixel becomes a 2x2 block
    assert out.dtype == bool and out.shape == (6, 8)
    expected = np.repeat(np.repeat(src > 127, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(out, expected)
    assert not out[0, 2] and out[0, 4]  # 100 -> False, 200 -> True


def test_resize_mask_used_against_a_map_of_another_size() -> None:
    # 8x8 uint8 mask, 4x4 map: downsampling by 2 takes source pixel floor((i + 0.5) * 2) = 2i + 1.
    src = np.zeros((8, 8), dtype=np.uint8)
    src[1::2, 1::2] = 200
    src[0::2, 0::2] = 100  # grey at even indices must not leak in
    out = resize_mask(src, (4, 4))
    np.testing.assert_array_equal(out, np.ones((4, 4), dtype=bool))
    src[3, 5] = 100
    assert not resize_mask(src, (4, 4))[1, 2]


def test_resize_mask_float_and_bool() -> None:
    src = np.array([[0.0, 0.4], [0.6, 1.0]])
    np.testing.assert_array_equal(resize_mask(src, (2, 2)), [[False, False], [True, True]])
    np.testing.assert_array_equal(
        resize_mask(src.astype(np.float32), (4, 2)), [[False, False]] * 2 + [[True, True]] * 2
    )
    np.testing.assert_array_equal(resize_mask(src > 0.5, (1, 1)), [[True]])  # centre (1, 1)
    zero_one = np.array([[0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_mask(zero_one, (1, 2)), [[False, True]])


def test_resize_mask_nearest_index_rule() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 40, 4))
        src = rng.random((h, w)) > 0.5
        out = resize_mask(src, (oh, ow))
        rows = np.floor((np.arange(oh) + 0.5) * h / oh).astype(int)
        cols = np.floor((np.arange(ow) + 0.5) * w / ow).astype(int)
        np.testing.assert_array_equal(out, src[np.ix_(rows, cols)])


def test_resize_mask_agrees_with_pil_off_pixel_boundaries() -> None:
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    cases = [((900, 700), (224, 256)), ((300, 1000), (224, 224)), ((50, 37), (80, 23))]
    for (h, w), (oh, ow) in cases:
        src = np.where(rng.random((h, w)) > 0.5, 255, 0).astype(np.uint8)
        ours = resize_mask(src, (oh, ow))
        pil = np.asarray(image_module.fromarray(src).resize((ow, oh), image_module.NEAREST)) > 127
        # PIL rounds in floating point where a centre lands exactly on a source boundary; elsewhere
        # the two must agree.
        exact_r = ((2 * np.arange(oh) + 1) * h) % (2 * oh) == 0
        exact_c = ((2 * np.arange(ow) + 1) * w) % (2 * ow) == 0
        keep = ~(exact_r[:, None] | exact_c[None, :])
        np.testing.assert_array_equal(ours[keep], pil[keep])


def test_resize_mask_errors() -> None:
    with pytest.raises(InputError, match="2-D"):
        resize_mask(np.zeros((2, 3, 3)), (4, 4))
    with pytest.raises(InputError, match="positive"):
        resize_mask(np.zeros((3, 3)), (0, 4))


# --------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_everything() -> None:
    masks, maps = _random_case(9)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    result = evaluate(labels, scores, masks, maps)
    assert isinstance(result, Metrics)
    assert result.image_auroc == pytest.approx(image_auroc(labels, scores))
    assert result.pixel_auroc == pytest.approx(pixel_auroc(masks, maps))
    assert result.pro == pytest.approx(pro_score(masks, maps))


def test_evaluate_resizes_masks_of_another_size() -> None:
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[1, 2:6, 2:6] = 255
    masks[1, 1, 2:6] = 100  # anti-aliased edge, background side
    maps = np.zeros((2, 4, 4))
    maps[1, 1:3, 1:3] = 1.0
    result = evaluate([0, 1], [0.0, 1.0], masks, maps)
    assert result == Metrics(image_auroc=1.0, pixel_auroc=1.0, pro=pytest.approx(1.0))
    as_list = evaluate([0, 1], [0.0, 1.0], list(masks), maps)
    assert as_list.pro == pytest.approx(1.0)


def test_evaluate_returns_none_where_not_computable() -> None:
    assert evaluate([1, 1], [0.2, 0.3]) == Metrics(None, None, None)
    assert evaluate([0, 1], [0.2, 0.3]) == Metrics(1.0, None, None)
    empty = np.zeros((2, 4, 4), dtype=bool)
    assert evaluate([0, 0], [0.2, 0.3], empty, np.zeros((2, 4, 4))) == Metrics(None, None, None)
    assert evaluate([0, 1], [0.2, 0.3], None, np.zeros((2, 4, 4))).pro is None


def test_evaluate_still_rejects_inconsistent_inputs() -> None:
    with pytest.raises(InputError, match="2 labels but 3"):
        evaluate([1, 1], [0.2, 0.3, 0.4])
    with pytest.raises(InputError, match="anomaly maps"):
        evaluate([0, 1], [0.2, 0.3], np.zeros((3, 4, 4)), np.zeros((3, 4, 4)))


def test_pixels_outside_valid_are_left_out():
    """Letterbox padding: pixels that are no part of the image count neither as normal nor defective."""
    from protoad_export.evaluation.metrics import pixel_auroc, pro_score

    masks = np.zeros((1, 4, 4), bool)
    masks[0, 1, 1] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 1] = 0.5
    maps[0, 2, 2] = 0.9  # a false alarm inside the part
    valid = np.zeros((1, 4, 4), bool)
    valid[0, :3, :3] = True  # row 3 and column 3 are padding
    # 8 valid normal pixels, one above the defect: AUROC = 7/8 (padding would add 7 easy ones).
    assert pixel_auroc(masks, maps, valid) == pytest.approx(7 / 8)
    assert pixel_auroc(masks, maps) == pytest.approx(14 / 15)
    # The defect switches on at FPR 1/8 with valid, 1/15 without: less area under PRO with valid.
    assert pro_score(masks, maps, max_fpr=1.0, valid=valid) < pro_score(masks, maps, max_fpr=1.0)
    assert pro_score(masks, maps, max_fpr=1.0, valid=valid) == pytest.approx(1 - 1 / 8)


def test_paired_auroc_difference_against_an_explicit_bootstrap() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(40, int), np.ones(25, int)]
    a = rng.normal(size=65) + labels
    b = np.round(a + 0.8 * rng.normal(size=65), 1)  # ties within b and across the classes
    got = paired_auroc_difference(labels, a, b, resamples=4000, seed=1)
    assert got["difference"] == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b), abs=1e-12)
    # The same stratified, paired bootstrap done the slow way: resample indices, call sklearn.
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    diffs = []
    for _ in range(1500):
        idx = np.r_[rng.choice(neg, len(neg)), rng.choice(pos, len(pos))]
        diffs.append(roc_auc_score(labels[idx], a[idx]) - roc_auc_score(labels[idx], b[idx]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert got["low"] < got["difference"] < got["high"]
    assert got["low"] == pytest.approx(low, abs=0.02) and got["high"] == pytest.approx(high, abs=0.02)


def test_paired_auroc_difference_of_one_ranking_is_exactly_zero() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1])
    a = np.array([0.1, 0.4, 0.35, 0.2, 0.8, 0.5])
    got = paired_auroc_difference(labels, a, 3 * a + 1)  # same order: same AUROC on every resample
    assert (got["difference"], got["low"], got["high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(InputError, match="one length"):
        paired_auroc_difference(labels, a, a[:-1])
    with pytest.raises(InputError, match="both normal"):
        paired_auroc_difference(np.ones(6, int), a, a)
