"""Prototypes: FINCH cluster means of all normal patch features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..options import DEFAULT_MAX_PROTOTYPES
from .finch import FinchResult, finch

# A partition this close above the limit is a near miss worth a warning: FINCH's next level is
# typically 4-5x smaller, and fewer prototypes score worse on varied parts (RESULTS.md 6).
NEAR_MISS_RATIO = 1.25


@dataclass
class PrototypeFit:
    """The prototypes and how they were found."""

    prototypes: np.ndarray  # float32 [K, C]
    finch: FinchResult
    normalized: bool


def fit_prototypes(
    features: np.ndarray,
    max_prototypes: int = DEFAULT_MAX_PROTOTYPES,
    normalize: bool = False,
    method: str = "auto",
    device: torch.device | str = "cpu",
    log=None,
) -> PrototypeFit:
    """FINCH on ``features`` [N, C] until a partition has fewer than ``max_prototypes`` clusters.

    ``normalize=False`` keeps the raw cluster means, as the authors' code does: a mean of unit
    vectors is shorter than 1, so its dot product with a test feature is a cosine scaled by the
    cluster's tightness. ``normalize=True`` re-normalises them (true cosine similarity).
    """
    if not isinstance(max_prototypes, (int, np.integer)) or max_prototypes < 2:
        raise InputError(f"--max-prototypes must be an integer >= 2, got {max_prototypes!r}")
    if len(features) < 2:
        raise InputError("need at least two patch features to cluster")
    result = finch(features, stop_below=int(max_prototypes), method=method, device=device, log=log)
    protos = result.means.astype(np.float32)
    if normalize:
        protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    return PrototypeFit(np.ascontiguousarray(protos), result, normalize)


def near_miss(partition_sizes: list[int], max_prototypes: int) -> int | None:
    """The size of the partition FINCH passed over just before the chosen one when it was within
    ``NEAR_MISS_RATIO`` of ``max_prototypes`` (the paper's rule then keeps a far coarser one)."""
    if len(partition_sizes) >= 2 and partition_sizes[-1] < max_prototypes <= partition_sizes[-2] <= NEAR_MISS_RATIO * max_prototypes:
        return partition_sizes[-2]
    return None


def sample_rows(n_rows: int, limit: int | None, seed: int = 0) -> np.ndarray | None:
    """The rows that ``--max-train-patches`` keeps: ``None`` (all) when ``limit`` is off or not
    exceeded, else a uniform sample of ``limit`` distinct rows drawn with ``numpy``'s
    ``default_rng(seed)``, sorted ascending, so the same features always give the same sample
    and a disk-backed array is read front to back."""
    if limit is None or n_rows <= limit:
        return None
    if limit < 2:
        raise InputError(f"--max-train-patches must be at least 2, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=limit, replace=False))
