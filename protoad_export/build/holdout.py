"""The normal hold-out: images kept out of fitting at build time and scored with the fitted network,
so that ``calibrate`` can set a threshold without a second pass over the data."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.datasets import evenly_spaced
from ..errors import InputError

HOLDOUT_RULE = "evenly spaced by sorted file name: image floor((i + 0.5) * n / m) for i < m, m = round(share * n)"
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def split_holdout(paths: Sequence[Path], share: float, min_fit: int) -> tuple[list[Path], list[Path]]:
    """Split sorted training paths into (fit, held out) deterministically (see ``HOLDOUT_RULE``).

    Evenly spaced picks spread the hold-out over the whole capture period when names follow time.
    A positive share holds out at least one image, but never so many that fewer than ``min_fit``
    remain for fitting (the hold-out shrinks, possibly to none, rather than the build failing).
    """
    paths = list(paths)
    n = len(paths)
    m = max(1, round(share * n)) if share > 0 else 0
    m = max(0, min(m, n - min_fit))
    picks = set(evenly_spaced(range(n), m))
    return [p for i, p in enumerate(paths) if i not in picks], [p for i, p in enumerate(paths) if i in picks]


def empty_holdout_reason(share: float, images: int, min_fit: int, held_out: int) -> str | None:
    """Why a build keeps no hold-out scores (recorded in the manifest, named by ``calibrate``), or
    None when it has some: ``images`` training images, ``held_out`` of them split off, all unreadable."""
    if share <= 0:
        return "built with --holdout 0"
    if held_out == 0:
        return (f"only {images} training images, all needed for fitting "
                f"(a hold-out needs at least {min_fit + 1}: {min_fit} to fit and 1 to hold out)")
    return None


def score_distribution(scores: np.ndarray) -> dict:
    """Count, mean, std, quantiles (linear interpolation) of image scores, for the manifest."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return {"count": 0}
    return {
        "count": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std(ddof=1)) if scores.size > 1 else 0.0,
        "min": float(scores.min()),
        "max": float(scores.max()),
        "quantiles": {str(q): float(np.quantile(scores, q)) for q in QUANTILES},
    }


def score_holdout(network, paths: Sequence[Path], prep, share: float, device, batch_size: int = 16) -> dict:
    """Image scores of the held-out normal images with the fitted FP32 torch network.

    Unreadable images are skipped and listed. Returns the manifest's ``holdout`` entry.
    """
    import torch

    from ..model.features import load_batches

    scores: list[float] = []
    used: list[str] = []
    skipped: list[str] = []
    # ONNX export leaves the network on the CPU; score on the build's device (the GPU when there is one).
    dev = torch.device(device) if device is not None else next(network.buffers()).device
    network = network.to(dev)
    with torch.no_grad():
        for chunk, decoded in load_batches(list(paths), prep, batch_size):
            good = [(Path(p).name, a) for p, a in zip(chunk, decoded) if not isinstance(a, InputError)]
            skipped += [Path(p).name for p, a in zip(chunk, decoded) if isinstance(a, InputError)]
            if good:
                _, s = network(torch.from_numpy(np.stack([a for _, a in good])).to(dev))
                scores += s.float().cpu().tolist()
                used += [name for name, _ in good]
    return {
        "share": float(share),
        "rule": HOLDOUT_RULE,
        "network": "torch fp32",
        "images": used,
        "skipped": skipped,
        "scores": [float(v) for v in scores],
        **score_distribution(np.asarray(scores)),
    }
