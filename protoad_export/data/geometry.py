"""``resize_mode="auto"``: the model input's geometry chosen from the training images' sizes.

The network is fully convolutional, so nothing forces a square input. The rule, and why:

- every image one size (a camera) and about square: the authors' resize and centre crop;
- every image one size and elongated: the whole frame squashed to a non-square input whose
  short side is the backbone's usual size and whose long side keeps the aspect ratio (rounded to
  the 16-pixel stage-3 stride), so no part of the frame is cut and nothing is shrunk more than
  the short side;
- sizes differ (a folder of crops): the whole image letterboxed (no distortion), into a
  non-square input at the images' median aspect ratio when they share an orientation, else into
  the usual square. A larger square (the median crop's short side at the usual size) scored
  lower on the magnetic tiles, whose crops come in both orientations, at 4x the cost
  (benchmarks/RESULTS.md section 4).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from ..options import AUTO
from .images import Preprocessing

SQUARE_ASPECT = 1.15  # long / short side up to which a part counts as square
SHARED_ORIENTATION = 0.9  # share of images in one orientation for a non-square letterbox
STRIDE = 16  # the stage-3 stride: model input sides are multiples of it


def _round_side(value: float) -> int:
    return max(STRIDE * 2, int(round(value / STRIDE)) * STRIDE)


def choose_geometry(prep: Preprocessing, sizes: list[tuple[int, int]]) -> tuple[Preprocessing, dict]:
    """``prep`` with ``mode="auto"`` resolved from ``sizes`` (width, height) of the training images,
    and the manifest's record of what was chosen and why; any other ``prep`` is returned as it is."""
    if prep.mode != AUTO:
        return prep, {"requested": prep.mode}
    if not sizes:  # the feature extraction names the unreadable files; letterbox keeps any image whole
        chosen = replace(prep, mode="letterbox")
        return chosen, {"requested": AUTO, "chosen": chosen.to_dict(), "reason": "no readable image header: letterbox"}
    if prep.width is not None:  # the input size is given: auto only keeps the whole part, undistorted
        chosen = replace(prep, mode="letterbox")
        return chosen, {"requested": AUTO, "chosen": chosen.to_dict(),
                        "reason": f"the input size given ({prep.width}x{prep.crop}): each whole image letterboxed into it"}
    short = prep.crop  # the backbone's usual input side
    counts = Counter(sizes)
    aspects = np.array([w / h for w, h in sizes], dtype=np.float64)
    landscape = float(np.mean(aspects >= 1.0))
    record = {"requested": AUTO, "images": len(sizes), "sizes": len(counts),
              "median_aspect_w_over_h": round(float(np.median(aspects)), 4), "landscape_share": round(landscape, 4)}
    if len(counts) == 1:
        (width, height), = counts
        elongation = max(width, height) / min(width, height)
        if elongation <= SQUARE_ASPECT:
            chosen = replace(prep, mode="crop")
            why = f"one size {width}x{height}, about square: the authors' resize {prep.resize} and centre crop {prep.crop}"
        else:
            long = _round_side(short * elongation)
            w, h = (long, short) if width >= height else (short, long)
            chosen = _non_square(prep, "squash", w, h)
            why = (f"one size {width}x{height} (1:{elongation:.2f}): the whole frame into {w}x{h}, short side {short}, "
                   "the aspect ratio kept up to the 16-pixel stride")
    elif landscape >= SHARED_ORIENTATION or landscape <= 1.0 - SHARED_ORIENTATION:
        same = aspects[aspects >= 1.0] if landscape >= 0.5 else 1.0 / aspects[aspects < 1.0]
        elongation = float(np.median(same))
        long = _round_side(short * max(elongation, 1.0))
        w, h = (long, short) if landscape >= 0.5 else (short, long)
        chosen = _non_square(prep, "letterbox", w, h) if long > short else replace(prep, mode="letterbox")
        shape = "about square" if elongation <= SQUARE_ASPECT else "landscape" if landscape >= 0.5 else "portrait"
        why = (f"{len(counts)} sizes, {shape} (median 1:{elongation:.2f}): "
               f"each whole image letterboxed into {w}x{h}")
    else:
        elongation = float(np.median(np.maximum(aspects, 1.0 / aspects)))
        chosen = replace(prep, mode="letterbox")
        why = (f"{len(counts)} sizes in both orientations ({landscape:.0%} landscape, median 1:{elongation:.2f}): each "
               f"whole image letterboxed into {prep.crop}x{prep.crop}")
    record.update(chosen=chosen.to_dict(), reason=why)
    return chosen, record


def _non_square(prep: Preprocessing, mode: str, width: int, height: int) -> Preprocessing:
    """A ``width`` x ``height`` model input (height = crop)."""
    return replace(prep, mode=mode, crop=height, resize=max(prep.resize, height), width=width)
