"""Golden outputs: reference inputs and the PyTorch FP32 outputs for them, stored in the bundle.

``verify`` (``evaluation/verify.py``) runs any backend on ``golden/inputs.npy`` and compares with
``golden/anomaly_map.npy`` and ``golden/score.npy``, so a line PC accepts an engine without torch,
the backbone's weights or the training images (Polygraphy's ``--save-outputs`` at build time,
``--load-outputs`` on the target).

The inputs are the exact graph inputs (uint8 frames or float32 tensors): a few hold-out normal
images (fitting images when the build kept none back) and synthetic defects drawn on one of them
in numpy (a dark scratch, a dark spot; deterministic), so that the decision path is exercised by
at least some rows scoring well above the normal ones. All arrays are saved without pickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import atomic_path
from ..contract import InputContract, OUTPUT_NAMES
from ..data.datasets import evenly_spaced
from ..data.images import Preprocessing, load_image
from ..errors import InputError

GOLDEN_DIR = "golden"
INPUTS_FILE = f"{GOLDEN_DIR}/inputs.npy"
OUTPUT_FILES = {name: f"{GOLDEN_DIR}/{name}.npy" for name in OUTPUT_NAMES}
MAX_NORMAL = 4
DEFECTS = ("dark scratch", "dark spot")


def draw_defect(pixels: np.ndarray, kind: str) -> np.ndarray:
    """A copy of RGB uint8 [H, W, 3] ``pixels`` with a dark ``kind`` defect near the centre (kept by
    every resize mode: a centre crop keeps the middle of the image)."""
    height, width = pixels.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = float(min(height, width))
    if kind == "dark scratch":
        # A diagonal segment through the centre, a few pixels wide at any resolution.
        (x0, y0), (x1, y1) = (0.38 * width, 0.40 * height), (0.62 * width, 0.58 * height)
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        distance = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
        region = distance <= max(1.5, side / 80)
    elif kind == "dark spot":
        region = np.hypot(xx - 0.55 * width, yy - 0.45 * height) <= max(3.0, side / 14)
    else:
        raise ValueError(f"unknown synthetic defect {kind!r}: choose one of {DEFECTS}")
    out = pixels.copy()
    out[region] = (out[region].astype(np.float32) * 0.2).astype(np.uint8)
    return out


def _rows(paths: Sequence[Path], source: str, contract: InputContract, prep: Preprocessing, limit: int):
    """(pixels, input row, description) of the first ``limit`` readable images in ``paths``."""
    rows = []
    for path in paths:
        if len(rows) == limit:
            break
        try:
            pixels = np.asarray(load_image(path), dtype=np.uint8)
            row = contract.from_pixels(pixels, prep, path)
        except InputError:
            continue  # unreadable, or another frame size: the build already reported it
        rows.append((pixels, row, {"source": source, "image": Path(path).name, "synthetic": None}))
    return rows


def write_golden(network, contract: InputContract, prep: Preprocessing, folder: str | Path, *,
                 holdout: Sequence[Path], fitting: Sequence[Path] = (), count: int = MAX_NORMAL) -> dict:
    """Run the FP32 ``network`` (input as ``contract`` -> (anomaly_map [B, 1, H, W], score [B])) on
    ``count`` normal images (hold-out first, fitting images when too few were held out) plus synthetic
    defects drawn on the first one;
    write ``golden/*.npy`` into ``folder`` and return the manifest's ``golden`` entry.

    The returned ``files`` must go into ``manifest["files"]`` so that the manifest hashes them.
    """
    import torch

    rows = _rows(holdout, "holdout", contract, prep, count)
    if len(rows) < count:  # a small build keeps back few images, or none
        spread = evenly_spaced(list(fitting), min(len(fitting), 4 * count))
        rows += _rows(spread, "fitting", contract, prep, count - len(rows))
    if not rows:
        raise InputError("no readable image for the golden outputs")
    base_pixels, _, base = rows[0]
    for kind in DEFECTS:
        pixels = draw_defect(base_pixels, kind)
        rows.append((pixels, contract.from_pixels(pixels, prep, base["image"]),
                     {"source": base["source"], "image": base["image"], "synthetic": kind}))
    inputs = np.ascontiguousarray(np.stack([r for _, r, _ in rows]))
    contract.check(inputs)  # the rows are exactly what a caller of the graph feeds it

    device = next(network.buffers()).device
    # TF32 convolutions on Ampere and later differ from FP32 by ~1e-3: not a reference.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        maps, scores = network.eval()(torch.from_numpy(inputs).to(device))
    outputs = {"anomaly_map": maps.float().cpu().numpy(), "score": scores.float().cpu().numpy()}

    folder = Path(folder)
    (folder / GOLDEN_DIR).mkdir(parents=True, exist_ok=True)
    for name, array in ((INPUTS_FILE, inputs), *((OUTPUT_FILES[k], v) for k, v in outputs.items())):
        with atomic_path(folder / name) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
    return {
        "inputs": INPUTS_FILE,
        "outputs": dict(OUTPUT_FILES),
        "count": len(rows),
        "rows": [meta for _, _, meta in rows],
        "reference": f"torch fp32 on {device.type}",
        "files": [INPUTS_FILE, *OUTPUT_FILES.values()],
    }
