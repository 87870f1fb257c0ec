"""Two-stage prototype search: a coarse FINCH level picks the candidates, the fine level scores them.

The flat search (``network.ProtoADNetwork``) takes, for every patch, the largest cosine over all
K fine prototypes: 2 * K * C * h * w FLOPs per image. FINCH's levels nest, so every fine
prototype has a parent among the Kc clusters of a coarser level. The two-stage search:

1. cosines of each patch with the Kc coarse prototypes (MatMul), the ``top`` best per patch (TopK);
2. the fine prototypes of those ``top`` clusters: a children table [Kc, M] (M = the largest
   cluster's child count) is gathered by the candidates, then the prototypes by the children
   (Gather, Gather), their cosines with the patch (MatMul) and the maximum (ReduceMax).

2 * (Kc + top * M) * C * h * w FLOPs instead. Every shape is a constant but the batch, so the
graph is one feed-forward ONNX graph of TensorRT ops. A cluster with fewer than M children is
padded with its own first child: a duplicate can never exceed the real maximum, so the result is
exactly the flat search's wherever the patch's best prototype lies in one of the ``top`` clusters,
and lower (a larger anomaly score) where it does not. ``split_clusters`` caps M by splitting large
clusters, because the gathered bytes per patch grow with ``top * M`` and FINCH's clusters are far
from equal in size.

Precision: both products are MatMuls of features and prototypes extended by one channel, 1 for
the feature and -1 for the prototype, so they yield cos - 1 with the -1 summed in the accumulator
before any FP16 rounding: the same numbers as the flat search's conv with a bias of -1
(``network.py``: FP16 steps near 1 are 4.9e-4, near 0 they keep FP16's relative precision).
TopK, the Gathers and the maxima only select, so they run in the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..options import PROTOTYPE_CHUNK

DEFAULT_TOP = 8
# Coarse prototypes per stage-1 MatMul: a chunk's [B, h*w, chunk] similarities stay small; the
# chunks' TopK results are merged by one more TopK.
COARSE_CHUNK = 8 * PROTOTYPE_CHUNK
# Gathered fine prototypes per stage-2 step (probes * M per patch): the [B, h*w, step, C + 1]
# gathered tensor is bounded by this many rows per patch.
GATHER_ROWS = 512


@dataclass(frozen=True)
class TwoStage:
    """What ``ProtoADNetwork(..., two_stage=...)`` needs beside its (fine) prototypes.

    ``parent`` [K]: each fine prototype's index into ``coarse`` [Kc, C]; ``top``: coarse clusters
    probed per patch.
    """

    parent: np.ndarray
    coarse: np.ndarray
    top: int = DEFAULT_TOP


def parents_from_levels(fine_labels: np.ndarray, coarse_labels: np.ndarray) -> np.ndarray:
    """Each fine cluster's coarse cluster, from two FINCH levels' labels of the same points
    (``finch(..., keep_levels=True).levels[i]``). Raises ValueError if the levels do not nest."""
    fine_labels = np.asarray(fine_labels, dtype=np.int64)
    coarse_labels = np.asarray(coarse_labels, dtype=np.int64)
    if fine_labels.shape != coarse_labels.shape:
        raise ValueError("the two levels must label the same points")
    k = int(fine_labels.max()) + 1
    parent = np.full(k, -1, dtype=np.int64)
    parent[fine_labels] = coarse_labels
    # A fine cluster whose points have two coarse labels would break the search's exactness.
    if (parent < 0).any() or not np.array_equal(parent[fine_labels], coarse_labels):
        raise ValueError("the fine level does not nest in the coarse level")
    return parent


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def split_clusters(fine: np.ndarray, parent: np.ndarray, max_children: int) -> tuple[np.ndarray, np.ndarray]:
    """Cap every cluster at ``max_children`` fine prototypes: a larger one is bisected at the median
    of its children's projections on their first principal direction until each part fits.

    Returns (parent [K], coarse [Kc'] unit means of each part's children), parts numbered in the
    order of the original clusters. Clusters that fit are kept whole.
    """
    if max_children < 1:
        raise ValueError(f"max_children must be at least 1, got {max_children}")
    fine = np.asarray(fine, dtype=np.float32)
    parent = np.asarray(parent, dtype=np.int64)
    order = np.argsort(parent, kind="stable")
    bounds = np.searchsorted(parent[order], np.arange(int(parent.max()) + 2))
    groups: list[np.ndarray] = []

    def bisect(members: np.ndarray) -> None:
        if len(members) <= max_children:
            groups.append(members)
            return
        x = fine[members] - fine[members].mean(axis=0)
        # The first right singular vector: the direction of largest spread.
        direction = np.linalg.svd(x, full_matrices=False)[2][0]
        ranked = members[np.argsort(x @ direction, kind="stable")]
        half = len(ranked) // 2
        bisect(ranked[:half])
        bisect(ranked[half:])

    for c in range(len(bounds) - 1):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members):
            bisect(members)
    new_parent = np.empty(len(fine), dtype=np.int64)
    coarse = np.empty((len(groups), fine.shape[1]), dtype=np.float32)
    for g, members in enumerate(groups):
        new_parent[members] = g
        coarse[g] = fine[members].mean(axis=0)
    return new_parent, unit_rows(coarse)


def children_table(parent: np.ndarray, n_coarse: int) -> np.ndarray:
    """[Kc, M] int64: each coarse cluster's fine prototypes, padded with its first child (M = the
    largest cluster's size). Raises ValueError for a coarse cluster without children."""
    parent = np.asarray(parent, dtype=np.int64)
    if parent.min() < 0 or parent.max() >= n_coarse:
        raise ValueError(f"parent indices must lie in [0, {n_coarse})")
    counts = np.bincount(parent, minlength=n_coarse)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} coarse clusters have no fine prototype")
    order = np.argsort(parent, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    m = int(counts.max())
    # Position j of cluster c: its j-th child, or its first child past its last one.
    j = np.arange(m)[None, :]
    pos = starts[:, None] + np.where(j < counts[:, None], j, 0)
    return order[pos]


def _extend(rows: torch.Tensor, value: float) -> torch.Tensor:
    """[N, C] -> [N, C + 1] with ``value`` in the new channel."""
    return torch.cat([rows, torch.full((len(rows), 1), value, dtype=rows.dtype)], dim=1)


class TwoStageSearch(nn.Module):
    """Unit patch features [B, C, h, w] -> max over the fine prototypes of cos - 1 [B, 1, h, w],
    searched among the children of each patch's ``top`` nearest coarse prototypes.

    ``fine`` [K, C] and ``coarse`` [Kc, C] are used as given (unit or raw); ``parent`` [K] maps
    each fine prototype to its coarse cluster. ``dtype`` is the compute dtype of products and
    selections (``network.py``'s precision plan).
    """

    def __init__(self, fine: np.ndarray | torch.Tensor, parent: np.ndarray, coarse: np.ndarray | torch.Tensor, *,
                 top: int = DEFAULT_TOP, dtype: torch.dtype = torch.float32, coarse_chunk: int = COARSE_CHUNK,
                 gather_rows: int = GATHER_ROWS) -> None:
        super().__init__()
        fine = torch.as_tensor(np.asarray(fine, dtype=np.float32))
        coarse = torch.as_tensor(np.asarray(coarse, dtype=np.float32))
        parent = np.asarray(parent)
        if fine.ndim != 2 or coarse.ndim != 2 or fine.shape[1] != coarse.shape[1]:
            raise ValueError(f"fine [K, C] and coarse [Kc, C] prototypes needed, got {tuple(fine.shape)} and {tuple(coarse.shape)}")
        if parent.shape != (len(fine),):
            raise ValueError(f"parent must have one entry per fine prototype ({len(fine)}), got shape {parent.shape}")
        if not 1 <= top <= len(coarse):
            raise ValueError(f"top must lie in [1, {len(coarse)}] (the coarse prototypes), got {top}")
        if coarse_chunk < top:
            raise ValueError(f"coarse_chunk ({coarse_chunk}) must be at least top ({top})")
        table = children_table(parent, len(coarse))
        self.k, self.kc, self.dim = len(fine), len(coarse), fine.shape[1]
        self.top, self.max_children = int(top), table.shape[1]
        # Probes per stage-2 step: at least one, at most gather_rows // M.
        self.probe_step = max(1, min(self.top, gather_rows // self.max_children))
        self.register_buffer("fine", _extend(fine, -1.0).to(dtype))  # [K, C + 1]
        self.register_buffer("child_table", torch.from_numpy(table))  # [Kc, M]
        # One buffer per chunk: every MatMul's weights are an initializer, not a runtime Slice.
        self.coarse_chunks = math.ceil(self.kc / coarse_chunk)
        for i in range(self.coarse_chunks):
            part = coarse[i * coarse_chunk : (i + 1) * coarse_chunk]
            self.register_buffer(f"coarse_{i}", _extend(part, -1.0).t().contiguous().to(dtype))  # [C + 1, n]
        self.coarse_chunk = coarse_chunk

    @property
    def gathered_rows(self) -> int:
        """Fine prototypes scored per patch (padding included): top * M."""
        return self.top * self.max_children

    def flops_per_patch(self) -> int:
        """Multiply-adds x 2 of both stages for one patch (the extra channel included)."""
        return 2 * (self.kc + self.gathered_rows) * (self.dim + 1)

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """Extended features [B, P, C + 1] -> the ``top`` best coarse clusters [B, P, top] (int64)."""
        values, indices = [], []
        for i in range(self.coarse_chunks):
            sims = torch.matmul(x, getattr(self, f"coarse_{i}"))  # [B, P, n]: cos - 1
            v, j = torch.topk(sims, min(self.top, sims.shape[-1]), dim=-1)
            values.append(v)
            indices.append(j + i * self.coarse_chunk if i else j)
        if len(values) == 1:
            return indices[0]
        v, j = torch.topk(torch.cat(values, dim=-1), self.top, dim=-1)
        return torch.gather(torch.cat(indices, dim=-1), -1, j)

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        _, c, h, w = unit.shape
        p = h * w
        x = unit.reshape(-1, c, p).transpose(1, 2)  # [B, P, C]
        x = torch.nn.functional.pad(x, (0, 1), value=1.0)  # [B, P, C + 1]: the -1 of each prototype meets a 1
        cand = self.candidates(x)  # [B, P, top]
        column = x.unsqueeze(-1)  # [B, P, C + 1, 1]
        best = None
        for t in range(0, self.top, self.probe_step):
            probes = cand[:, :, t : t + self.probe_step]  # [B, P, s]
            s = probes.shape[-1]
            kids = torch.index_select(self.child_table, 0, probes.reshape(-1))  # [B * P * s, M]
            protos = torch.index_select(self.fine, 0, kids.reshape(-1))  # [B * P * s * M, C + 1]
            protos = protos.reshape(-1, p, s * self.max_children, c + 1)
            sims = torch.matmul(protos, column)  # [B, P, s * M, 1]: cos - 1
            # torch.max, not amax: a plain ReduceMax in FP16 (see network.py).
            m = torch.max(sims, dim=2).values  # [B, P, 1]
            best = m if best is None else torch.maximum(best, m)
        return best.transpose(1, 2).reshape(-1, 1, h, w)
