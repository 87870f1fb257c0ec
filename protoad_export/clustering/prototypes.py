"""Prototypes: FINCH cluster means of all normal patch features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..options import AUTO, AUTO_MARGIN, AUTO_PROTOTYPE_CAP, PAPER_MAX_PROTOTYPES
from .finch import FinchResult, cluster_means, finch, merge_to_count
from .levels import Level, add_cap_partition, chosen_level, level_table, unit_prototypes

# A partition this close above the limit is a near miss worth a warning: FINCH's next level is
# typically 4-5x smaller, and fewer prototypes score worse on varied parts (RESULTS.md 6).
NEAR_MISS_RATIO = 1.25


@dataclass
class PrototypeFit:
    """The prototypes and how they were found."""

    prototypes: np.ndarray  # float32 [K, C]
    finch: FinchResult
    normalized: bool
    levels: list[Level] | None = None  # the level table of max_prototypes="auto"


def fit_prototypes(
    features: np.ndarray,
    max_prototypes: int | str = PAPER_MAX_PROTOTYPES,
    normalize: bool = False,
    method: str = "auto",
    device: torch.device | str = "cpu",
    log=None,
    *,
    holdout_patches: np.ndarray | None = None,
    grid: tuple[int, int] = (1, 1),
    cap: int = AUTO_PROTOTYPE_CAP,
    margin: float = AUTO_MARGIN,
    floor: int = PAPER_MAX_PROTOTYPES,
) -> PrototypeFit:
    """FINCH on ``features`` [N, C] until a partition has fewer than ``max_prototypes`` clusters, or,
    with ``max_prototypes="auto"``, the level ``clustering.levels.level_table`` keeps: the coarsest
    with at most ``cap`` prototypes, no coarser than the first under ``floor``, whose quantisation
    error on ``holdout_patches`` (unit rows [P, C] of held-out normal images) is within ``margin``
    of the finest level's; where none is, the partition of ``cap`` clusters between the finest level
    within the cap and the next finer one. ``grid`` (h, w) only sizes the table's FLOP column.

    ``normalize=False`` keeps the raw cluster means, as the authors' code does: a mean of unit
    vectors is shorter than 1, so its dot product with a test feature is a cosine scaled by the
    cluster's tightness. ``normalize=True`` re-normalises them (true cosine similarity).
    """
    auto = max_prototypes == AUTO
    if not auto and (isinstance(max_prototypes, bool) or not isinstance(max_prototypes, (int, np.integer))
                     or max_prototypes < 2):
        raise InputError(f"max prototypes must be '{AUTO}' or an integer >= 2, got {max_prototypes!r}")
    if len(features) < 2:
        raise InputError("need at least two patch features to cluster")
    if not auto:
        result = finch(features, stop_below=int(max_prototypes), method=method, device=device, log=log)
        return PrototypeFit(unit_prototypes(result.means, normalize), result, normalize)
    if holdout_patches is None or len(holdout_patches) == 0:
        raise InputError(f"max prototypes '{AUTO}' measures the FINCH levels on held-out normal patches: none were given")
    # The whole hierarchy (its coarse levels cost little): the table needs every level under the cap.
    result = finch(features, stop_below=None, method=method, device=device, keep_levels=True, log=log)
    rows = level_table(result.level_means, holdout_patches, normalize=normalize, grid=grid, cap=cap, margin=margin,
                       floor=floor)
    kept = chosen_level(rows)
    result.labels, result.means = result.levels[kept.level], result.level_means[kept.level]
    if kept.excess > margin and kept.level > 0:
        # No level within the cap is close enough: the cap binds, so use all of it.
        finer = kept.level - 1
        merged, count = merge_to_count(*result.level_links[finer], cap)
        sizes = np.bincount(result.levels[finer], minlength=len(result.level_means[finer]))
        result.means = cluster_means(result.level_means[finer], merged, count, weights=sizes)
        result.labels = merged[result.levels[finer]]
        add_cap_partition(rows, result.means, holdout_patches, normalize=normalize, grid=grid, level=finer)
        if log:
            log(f"FINCH level {finer} merged along its strongest links to the cap: {count:,} clusters")
    result.levels, result.level_means, result.level_links = [], [], []  # the means of level 0 alone can be 1 GB
    return PrototypeFit(unit_prototypes(result.means, normalize), result, normalize, rows)


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
