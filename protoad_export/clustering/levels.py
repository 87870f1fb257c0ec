"""Which FINCH level to keep, chosen from normal images alone (``max_prototypes="auto"``).

Each coarser FINCH level replaces groups of prototypes by their mean, so an unseen normal patch
lies farther from its nearest prototype: its anomaly value ``1 - cos`` grows, and defects have
less room above the normal parts' scores. The criterion measures that growth on patches of the
held-out normal images (never fitted on): for level ``L``

    excess(L) = mean(1 - best cos to level L) / mean(1 - best cos to level 0) - 1

(level 0 is FINCH's finest partition, the closest stand-in for the whole memory bank), and the
coarsest level whose excess is at most ``margin`` is kept, among the levels within the prototype
cap (the speed budget) and no coarser than the paper's rule (the first partition under 10,000).
Where no level within the cap qualifies, the budget binds and is used whole: the next finer
level's clusters are merged along their strongest first-neighbour links down to the cap (FINCH's
required-count step, ``finch.merge_to_count``), a partition between two levels, and kept. So
auto keeps the paper's level, or a finer one where the hold-out shows the paper's level quantises
unseen normal patches too coarsely. The floor matters on small sets: with a few training images
every unseen patch is far from all of them, the excess of each coarser level is small beside
that distance, and the excess alone would keep a hundred prototypes (benchmarks/RESULTS.md
section 7). No defect is looked at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import InputError
from ..options import AUTO_MARGIN, AUTO_PROTOTYPE_CAP, PAPER_MAX_PROTOTYPES
from .neighbours import nearest_similarity

AUTO_SAMPLE_PATCHES = 20_000  # held-out patches the criterion is measured on (a seeded sample)


@dataclass
class Level:
    """One row of the level table a build prints and records."""

    level: int
    prototypes: int
    mean_distance: float  # mean over the sampled held-out patches of 1 - best cosine
    excess: float  # mean_distance / level 0's - 1
    conv_gflops: float  # the prototype conv per image, 2 * K * C * h * w
    within_cap: bool
    chosen: bool = False
    # Level ``level`` merged down to the cap (between it and the next level; module docstring).
    to_cap: bool = False

    @property
    def name(self) -> str:
        return f"{self.level}-{self.level + 1}" if self.to_cap else str(self.level)

    def to_dict(self) -> dict:
        return {"name": self.name} | {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def conv_gflops(prototypes: int, dim: int, grid: tuple[int, int]) -> float:
    """Multiply-adds x 2 of the 1x1 prototype conv on one image's ``grid`` (h, w), in GFLOP."""
    return 2.0 * prototypes * dim * grid[0] * grid[1] / 1e9


def unit_prototypes(means: np.ndarray, normalize: bool) -> np.ndarray:
    """A level's prototypes as the network holds them (re-normalised or raw means), float32."""
    protos = np.asarray(means, dtype=np.float32)
    if normalize:
        protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(protos)


def sample_patches(features: np.ndarray, limit: int = AUTO_SAMPLE_PATCHES, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` rows of ``features`` [N, C] (a seeded uniform sample), unit length, float32."""
    rows = np.arange(len(features))
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), size=limit, replace=False))
    x = np.asarray(features[rows], dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def level_table(level_means: list[np.ndarray], patches: np.ndarray, *, normalize: bool, grid: tuple[int, int],
                cap: int = AUTO_PROTOTYPE_CAP, margin: float = AUTO_MARGIN,
                floor: int = PAPER_MAX_PROTOTYPES) -> list[Level]:
    """Score ``patches`` (unit rows [P, C] of held-out normal images) against every level's
    prototypes (``level_means``, finest first) and mark the kept level (see the module docstring):
    the coarsest within ``margin``, under ``cap`` and no coarser than the first level under ``floor``.

    Levels over ``cap`` prototypes are measured only when they are level 0 (the reference). Where no
    level qualifies, the finest within the cap is marked, and its excess is over ``margin``: the
    caller may then add the partition at the cap (``add_cap_partition``).
    """
    if not level_means:
        raise InputError("no FINCH levels to choose from")
    if len(patches) == 0:
        raise InputError("no held-out patches to measure the FINCH levels on")
    if not (isinstance(margin, (int, float)) and np.isfinite(margin) and margin >= 0):
        raise InputError(f"margin must be a finite number >= 0, got {margin!r}")
    dim = patches.shape[1]
    rows: list[Level] = []
    for index, means in enumerate(level_means):
        k = len(means)
        within = k <= cap
        distance = _mean_distance(means, patches, normalize) if within or index == 0 else float("nan")
        rows.append(Level(index, k, distance, float("nan"), round(conv_gflops(k, dim, grid), 3), within))
    reference = rows[0].mean_distance
    if not np.isfinite(reference):
        raise InputError("the held-out patches' distances to the finest level are not finite")
    for row in rows:
        if np.isfinite(row.mean_distance):
            row.excess = row.mean_distance / max(reference, 1e-12) - 1.0
    paper = next((r.level for r in rows if r.prototypes < floor), len(rows) - 1)
    under = [r for r in rows if r.within_cap and r.prototypes >= 2]
    candidates = [r for r in under if r.level <= paper] or under
    if not candidates:
        raise InputError(f"every FINCH level has {cap:,} prototypes or more: raise the prototype cap")
    within = [r for r in candidates if r.excess <= margin]
    # Levels are ordered finest first: the last one within the margin is the coarsest.
    chosen = within[-1] if within else candidates[0]
    chosen.chosen = True
    return rows


def _mean_distance(means: np.ndarray, patches: np.ndarray, normalize: bool) -> float:
    queries = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32))
    best = nearest_similarity(queries, torch.from_numpy(unit_prototypes(means, normalize)))
    return float((1.0 - best.double()).mean())


def add_cap_partition(rows: list[Level], means: np.ndarray, patches: np.ndarray, *, normalize: bool,
                      grid: tuple[int, int], level: int, keep: bool = True) -> Level:
    """Measure the partition at the cap (``means`` [K, C]: level ``level`` merged down to the cap),
    insert its row after that level's and (``keep``) keep it instead of the row marked so far.
    Returns the row."""
    row = Level(level, len(means), _mean_distance(means, patches, normalize), float("nan"),
                round(conv_gflops(len(means), patches.shape[1], grid), 3), True, to_cap=True)
    row.excess = row.mean_distance / max(rows[0].mean_distance, 1e-12) - 1.0
    if keep:
        for other in rows:
            other.chosen = False
        row.chosen = True
    place = next(i for i, r in enumerate(rows) if r.level == level and not r.to_cap) + 1
    while place < len(rows) and rows[place].to_cap and rows[place].prototypes > row.prototypes:
        place += 1  # finest first
    rows.insert(place, row)
    return row


def chosen_level(rows: list[Level]) -> Level:
    """The row marked as kept."""
    return next(r for r in rows if r.chosen)


def format_table(rows: list[Level]) -> list[str]:
    """The level table as printable lines."""
    lines = [f"{'level':>5} {'prototypes':>11} {'distance':>9} {'excess':>8} {'conv GFLOP/img':>15}"]
    for r in rows:
        excess = f"{100 * r.excess:7.1f}%" if np.isfinite(r.excess) else "      -"
        distance = f"{r.mean_distance:9.5f}" if np.isfinite(r.mean_distance) else "        -"
        note = "  <- kept" if r.chosen else ("" if r.within_cap else "  (over the cap)")
        note += f"  (level {r.level} merged to the cap)" if r.to_cap else ""
        lines.append(f"{r.name:>5} {r.prototypes:>11,} {distance} {excess} {r.conv_gflops:>15.1f}{note}")
    return lines
