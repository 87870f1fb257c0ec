"""Anomaly-detection metrics: image AUROC, pixel AUROC and PRO (per-region overlap).

PRO follows Bergmann et al., "The MVTec Anomaly Detection Dataset" (IJCV 2021) and its reference
evaluation code (``generic_util.py`` / ``pro_curve_util.py``):

* ground-truth regions are the 8-connected components of each image's mask
  (``scipy.ndimage.label`` with a 3x3 structure of ones), never joined across images;
* for a threshold ``t``, ``PRO(t)`` is the mean over *all* regions of all images of
  ``|region ∩ {map >= t}| / |region|``, so a small region counts as much as a large one;
* ``FPR(t) = |{map >= t} ∩ normal| / |normal|`` where normal pixels are those outside every region,
  over all images, defect-free ones included;
* the score is the area under PRO-vs-FPR for FPR in ``[0, max_fpr]`` (trapezoid rule, the curve
  linearly interpolated at exactly ``max_fpr``), divided by ``max_fpr``.

The exact curve has one point per distinct pixel score, so pixels with equal scores switch
together and ties are handled exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ..errors import InputError

__all__ = [
    "Metrics",
    "evaluate",
    "image_auroc",
    "paired_auroc_difference",
    "pixel_auroc",
    "pro_curve",
    "pro_score",
    "resize_mask",
]

# 3x3 ones within an image, nothing across the image axis: 8-connectivity as in the MVTec AD
# reference code, while labelling the whole [N, H, W] stack in one call.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


@dataclass
class Metrics:
    """Result of :func:`evaluate`; ``None`` where a metric cannot be computed from the inputs."""

    image_auroc: float | None
    pixel_auroc: float | None
    pro: float | None


# --------------------------------------------------------------------------------------------
# Input checks


def _finite_scores(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number):
        raise InputError(f"{what} must be numeric, got dtype {values.dtype}")
    if np.issubdtype(values.dtype, np.complexfloating):
        raise InputError(f"{what} must be real-valued, got dtype {values.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"{what} contain NaN or infinite values")
    return values


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.number) or not np.isin(labels, (0, 1)).all():
            raise InputError("labels must be 0 (normal) or 1 (defective)")
        labels = labels.astype(bool)
    return labels


def _binarise(mask: np.ndarray) -> np.ndarray:
    """Bool mask from a bool, 0/1 or 0..255 mask (uint8 or float)."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if not np.issubdtype(mask.dtype, np.number) or np.issubdtype(mask.dtype, np.complexfloating):
        raise InputError(f"a mask must be bool or numeric, got dtype {mask.dtype}")
    if mask.size == 0:
        return np.zeros(mask.shape, dtype=bool)
    if np.isnan(mask).any():
        raise InputError("a mask contains NaN values")
    # A maximum above 1 means a 0..255 image (PNG masks, anti-aliased edges): the midpoint 127 keeps
    # edge pixels that are mostly foreground and drops those that are mostly background.
    if mask.max() > 1:
        return mask > 127
    return mask > 0.5


def _masks_and_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(bool [N,H,W], float [N,H,W])``; a single 2-D image is taken as N = 1."""
    maps = _finite_scores(maps, "anomaly maps")
    masks = np.asarray(masks)
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim != 3:
        raise InputError(f"anomaly maps must have shape [N, H, W], got {maps.shape}")
    if masks.shape != maps.shape:
        raise InputError(
            f"masks have shape {masks.shape} but anomaly maps have shape {maps.shape}; "
            "resize the masks first (resize_mask)"
        )
    if maps.size == 0:
        raise InputError("no pixels to evaluate")
    return _binarise(masks), maps


# --------------------------------------------------------------------------------------------
# AUROC


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC of ``scores`` for ``labels`` (1 = defective), in [0, 1].

    Ties between a defective and a normal image count one half (Mann-Whitney U).
    Raises :class:`InputError` if the lengths differ or only one class is present.
    """
    labels = _binary_labels(labels)
    scores = _finite_scores(scores, "image scores")
    if scores.ndim != 1:
        raise InputError(f"image scores must be 1-D, got shape {scores.shape}")
    if labels.shape != scores.shape:
        raise InputError(f"{labels.size} labels but {scores.size} image scores")
    if labels.all() or not labels.any():
        raise InputError("image AUROC needs both normal (0) and defective (1) images in the labels")
    return float(roc_auc_score(labels, scores))


def paired_auroc_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, resamples: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> dict:
    """Image AUROC of ``scores_a`` minus that of ``scores_b`` on the same images, with a paired,
    stratified bootstrap interval: normal and defective images are resampled separately (class
    counts fixed, as the test set's are) and both methods see the same resample.

    Returns ``{"difference", "low", "high", "resamples", "level"}``. Every resample's AUROC is
    ``c_pos @ W @ c_neg / (P N)`` with ``W`` the Mann-Whitney pair matrix (1, 1/2 for ties, 0)
    and ``c`` multinomial counts, so no scores are re-sorted.
    """
    labels = _binary_labels(labels)
    a, b = (_finite_scores(v, "image scores") for v in (scores_a, scores_b))
    if not labels.shape == a.shape == b.shape or a.ndim != 1:
        raise InputError(f"labels and both score vectors must be 1-D of one length, got {labels.shape}, {a.shape}, {b.shape}")
    if labels.all() or not labels.any():
        raise InputError("an AUROC difference needs both normal (0) and defective (1) images")
    if resamples < 1 or not 0 < level < 1:
        raise InputError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    pos, neg = labels == 1, labels == 0

    def pairs(v: np.ndarray) -> np.ndarray:
        d = v[pos][:, None] - v[neg][None, :]
        return (d > 0) + 0.5 * (d == 0)

    w = pairs(a) - pairs(b)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    rng = np.random.default_rng(seed)
    c_pos = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=resamples)
    c_neg = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=resamples)
    boot = np.einsum("bp,pn,bn->b", c_pos, w, c_neg) / (n_pos * n_neg)
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(w.mean()), "low": float(low), "high": float(high),
            "resamples": resamples, "level": level}


def _valid(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if valid is None:
        return None
    valid = np.asarray(valid, dtype=bool).reshape(shape) if np.size(valid) == int(np.prod(shape)) else None
    if valid is None:
        raise InputError(f"the valid-pixel mask must have the maps' shape {shape}")
    return valid


def pixel_auroc(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Pixel-level AUROC over all pixels of all images (or only where ``valid``, e.g. not letterbox padding).

    ``masks`` is bool [N,H,W] (0/1 and 0..255 masks are binarised as in :func:`resize_mask`),
    ``maps`` float [N,H,W] of the same shape. Memory is linear in the number of pixels.
    Raises :class:`InputError` if no pixel, or every pixel, is defective.
    """
    masks, maps = _masks_and_maps(masks, maps)
    keep = _valid(valid, maps.shape)
    truth, values = (masks, maps) if keep is None else (masks[keep], maps[keep])
    truth = truth.ravel()
    if truth.all() or not truth.any():
        raise InputError("pixel AUROC needs both defective and normal pixels in the masks")
    return float(roc_auc_score(truth, values.ravel()))


# --------------------------------------------------------------------------------------------
# Mask resizing


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D mask to ``shape`` = (height, width) by nearest neighbour; returns bool.

    Binarisation: bool masks as they are; masks whose maximum exceeds 1 (uint8 0/255 PNGs with
    anti-aliased grey edges, or float 0..255) become ``> 127``; other (0/1 or float 0..1) masks
    ``> 0.5``. Thresholding commutes with nearest-neighbour sampling, so the order is immaterial.

    Sampling uses an exact integer index computation, not PIL: output pixel ``i`` takes source
    pixel ``floor((i + 0.5) * in / out)``, the centre-aligned rule of PIL's ``Image.NEAREST`` and
    torch's ``"nearest-exact"``. PIL computes it in floating point and can pick the lower neighbour
    where a centre falls exactly on a source pixel boundary (e.g. 1024 -> 224); this version is
    exact there and independent of the platform.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"a mask must be 2-D [H, W], got shape {mask.shape}")
    try:
        out_h, out_w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"mask target shape must be (height, width), got {shape!r}") from None
    if out_h <= 0 or out_w <= 0:
        raise InputError(f"mask target shape must be positive, got {shape!r}")
    in_h, in_w = mask.shape
    if in_h == 0 or in_w == 0:
        raise InputError(f"cannot resize an empty mask of shape {mask.shape}")
    binary = _binarise(mask)
    if (in_h, in_w) == (out_h, out_w):
        return binary.copy()
    # Integer arithmetic: (2i + 1) * in // (2 * out) == floor((i + 0.5) * in / out), no rounding.
    rows = ((2 * np.arange(out_h, dtype=np.int64) + 1) * in_h) // (2 * out_h)
    cols = ((2 * np.arange(out_w, dtype=np.int64) + 1) * in_w) // (2 * out_w)
    return binary[np.ix_(rows, cols)]


# --------------------------------------------------------------------------------------------
# PRO


def _region_setup(masks: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per-pixel ``normal`` flags and region weights ``1/|region|``; region and normal counts.

    Pixels outside ``valid`` (padding that is not part of the image) are neither normal nor defective.
    """
    labelled, n_regions = ndimage.label(masks, structure=_STRUCTURE_8)
    if n_regions == 0:
        raise InputError("PRO needs at least one defect region, but every mask is empty")
    labelled = labelled.ravel()
    normal = labelled == 0
    if valid is not None:
        normal &= valid.ravel()
    n_normal = int(np.count_nonzero(normal))
    if n_normal == 0:
        raise InputError("PRO needs normal pixels, but the masks cover every pixel")
    sizes = np.bincount(labelled).astype(np.float64)
    sizes[0] = np.inf  # normal pixels carry no region weight
    weights = 1.0 / sizes
    return normal, weights[labelled], n_regions, n_normal


def _curve_from_bins(
    bins: np.ndarray,
    n_bins: int,
    normal: np.ndarray,
    weights: np.ndarray,
    n_regions: int,
    n_normal: int,
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve when ``bins`` holds, per pixel, the index of the highest threshold it reaches.

    Thresholds are ascending by bin index; a pixel in bin ``k`` is ``>= t_j`` for every ``j <= k``.
    """
    fp_per_bin = np.bincount(bins[normal], minlength=n_bins)
    overlap_per_bin = np.bincount(bins, weights=weights, minlength=n_bins)
    # Walking the thresholds from high to low accumulates the pixels that switch on at each.
    fpr = np.cumsum(fp_per_bin[::-1]) / n_normal
    pro = np.cumsum(overlap_per_bin[::-1]) / n_regions
    # The lowest threshold is the minimum score, which switches on everything: pin (1, 1) exactly
    # rather than leave the float sum a few ulps off.
    fpr[-1] = 1.0
    pro[-1] = 1.0
    np.clip(pro, 0.0, 1.0, out=pro)
    # (0, 0) is the threshold above the maximum score: nothing is predicted anomalous.
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def pro_curve(masks: np.ndarray, maps: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: ``(fpr, pro)``, fpr ascending, from (0, 0) to (1, 1).

    One point per distinct score ``t`` (plus the (0, 0) start), with the pixels ``>= t`` counted as
    anomalous. Tied pixels switch at the same threshold, so the curve has one point per tie group.
    O(P log P) time for P pixels (one sort) and a few arrays of length P; no per-threshold loops.
    The curve can hold repeated fpr values (vertical steps), as in the MVTec AD reference code.
    """
    masks, maps = _masks_and_maps(masks, maps)
    normal, weights, n_regions, n_normal = _region_setup(masks, _valid(valid, maps.shape))
    thresholds, bins = np.unique(maps.ravel(), return_inverse=True)
    return _curve_from_bins(bins.ravel(), thresholds.size, normal, weights, n_regions, n_normal)


def _approx_pro_curve(
    masks: np.ndarray, maps: np.ndarray, num_thresholds: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    normal, weights, n_regions, n_normal = _region_setup(masks, _valid(valid, maps.shape))
    scores = maps.ravel()
    # "inverted_cdf" returns actual pixel scores, so every point lies exactly on the exact curve;
    # q = 0 yields the minimum score, the threshold that switches on every pixel (point (1, 1)).
    thresholds = np.unique(
        np.quantile(scores, np.linspace(0.0, 1.0, num_thresholds), method="inverted_cdf")
    )
    bins = np.searchsorted(thresholds, scores, side="right") - 1
    return _curve_from_bins(bins, thresholds.size, normal, weights, n_regions, n_normal)


def _partial_area(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under ``pro(fpr)`` on [0, max_fpr], interpolating linearly at ``max_fpr``.

    ``fpr`` is ascending from 0 to 1 and may repeat (vertical steps). As in the MVTec AD code's
    ``trapezoid``, the interpolation uses the last point with fpr < max_fpr (the top of any
    vertical step there) and the first with fpr > max_fpr; a step exactly at max_fpr adds no area.
    """
    end = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x = fpr[:end]
    y = pro[:end]
    if x[-1] < max_fpr:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_at = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        x = np.append(x, max_fpr)
        y = np.append(y, y_at)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5))


def pro_score(
    masks: np.ndarray,
    maps: np.ndarray,
    max_fpr: float = 0.3,
    num_thresholds: int | None = None,
    valid: np.ndarray | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (AU-PRO); 1.0 for a perfect map.

    ``valid`` (bool, the maps' shape) leaves pixels out of the false-positive count, e.g. the
    letterbox padding, which is no part of the product and would make every map look better.

    ``masks`` bool [N,H,W] (defect-free images have empty masks and add normal pixels only),
    ``maps`` float [N,H,W]. Exact by default (see :func:`pro_curve`). With ``num_thresholds``, the
    curve is built from that many score quantiles instead (each an actual pixel score, so the
    points lie on the exact curve): O(P log K) with no full sort, a close lower-resolution estimate.
    Raises :class:`InputError` if there is no defect region or no normal pixel.
    """
    try:
        max_fpr = float(max_fpr)
    except (TypeError, ValueError):
        raise InputError(f"max_fpr must be a number, got {max_fpr!r}") from None
    if not 0.0 < max_fpr <= 1.0:
        raise InputError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if num_thresholds is None:
        fpr, pro = pro_curve(masks, maps, valid)
    else:
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)):
            raise InputError(f"num_thresholds must be an integer, got {num_thresholds!r}")
        if num_thresholds < 2:
            raise InputError(f"num_thresholds must be at least 2, got {num_thresholds}")
        masks, maps = _masks_and_maps(masks, maps)
        fpr, pro = _approx_pro_curve(masks, maps, int(num_thresholds), valid)
    return _partial_area(fpr, pro, max_fpr) / max_fpr


# --------------------------------------------------------------------------------------------
# Convenience


def _stack_masks(masks: np.ndarray | Sequence[np.ndarray], maps: np.ndarray) -> np.ndarray:
    """Masks as bool [N,H,W] matching ``maps``; other sizes go through :func:`resize_mask`."""
    shape = maps.shape[-2:]
    if isinstance(masks, np.ndarray) and masks.shape == maps.shape:
        return _binarise(masks)
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = masks[None]
    if len(masks) != len(maps):
        raise InputError(f"{len(masks)} masks but {len(maps)} anomaly maps")
    return np.stack([resize_mask(mask, shape) for mask in masks])


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | Sequence[np.ndarray] | None = None,
    maps: np.ndarray | None = None,
) -> Metrics:
    """All metrics the inputs allow; ``None`` for a metric that cannot be computed.

    Image AUROC is ``None`` when the labels hold one class only; pixel AUROC and PRO are ``None``
    without both masks and maps, or when no pixel (or every pixel) is defective. Masks of another
    size than the maps (an array or a list of 2-D masks) are resized with :func:`resize_mask`.
    Inconsistent inputs (mismatched lengths, NaN scores, bad shapes) still raise InputError.
    """
    label_array = _binary_labels(labels)
    if label_array.any() and not label_array.all():
        img = image_auroc(label_array, scores)
    else:
        # Still catch mismatched or malformed scores rather than silently ignore them.
        score_array = _finite_scores(scores, "image scores")
        if score_array.shape != label_array.shape:
            raise InputError(f"{label_array.size} labels but {score_array.size} image scores")
        img = None

    pix: float | None = None
    pro: float | None = None
    if masks is not None and maps is not None:
        map_array = _finite_scores(maps, "anomaly maps")
        if map_array.ndim == 2:
            map_array = map_array[None]
        if map_array.ndim != 3:
            raise InputError(f"anomaly maps must have shape [N, H, W], got {map_array.shape}")
        if len(map_array) != label_array.size:
            raise InputError(f"{label_array.size} labels but {len(map_array)} anomaly maps")
        mask_array = _stack_masks(masks, map_array)
        if mask_array.any() and not mask_array.all():
            pix = pixel_auroc(mask_array, map_array)
            pro = pro_score(mask_array, map_array)
    return Metrics(image_auroc=img, pixel_auroc=pix, pro=pro)
