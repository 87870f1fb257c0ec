"""The antialiased resize, defined once and run two ways: numpy (the Python path) and in the graph.

The filter is Pillow's ``BILINEAR`` resampling (a triangle whose support grows with the shrink
factor, so it antialiases like torchvision's ``Resize(antialias=True)``): the weights come from the
same formula as Pillow's ``precompute_coeffs`` (``src/libImaging/Resample.c``). Pillow then rounds
to 8 bits after each pass; here the passes stay in float32, so that the numpy path and the exported
graph, which both apply :class:`AxisResample` tables, agree to float rounding, and both lie within
one 8-bit step of Pillow.

TensorRT has no antialiased Resize, and a dense resampling matrix from a 2048-pixel axis is a
~1 GFLOP product per channel and image. The weights are a narrow band, so each axis is applied
block-wise: the outputs are cut into blocks of ``block`` neighbours, each block reads one
contiguous span of the input (a constant-index Gather) and multiplies it by its own small weight
matrix (one batched MatMul). Only the outputs kept by a crop are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Cost model for choosing the block size: a gathered input value costs about as much memory
# traffic as this many multiply-adds.
_GATHER_COST_IN_MACS = 8


def triangle_weights(in_size: int, out_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pillow's BILINEAR coefficients for resizing an axis of ``in_size`` to ``out_size``.

    Returns (first input index per output [out_size], weights per output, each summing to 1).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    starts = np.empty(out_size, dtype=np.int64)
    weights = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        # int() truncates toward zero, as the C cast in Pillow does.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        x = np.arange(xmin, xmax, dtype=np.float64)
        w = np.clip(1.0 - np.abs((x - center + 0.5) / filterscale), 0.0, None)
        total = w.sum()
        starts[xx] = xmin
        weights.append(w / total if total else w)
    return starts, weights


@dataclass(frozen=True)
class AxisResample:
    """One axis: ``in_size`` inputs -> the outputs ``kept`` of a resize to ``out_size``.

    ``index`` int64 [G, L]: the input span each block of ``block`` outputs reads;
    ``weights`` float32 [G, L, block]: that block's weights (zero where a span is padded).
    Output ``g * block + j`` of the product is kept output ``j`` of block ``g``; the last
    ``G * block - len(kept)`` outputs are padding and are dropped.
    """

    in_size: int
    out_size: int
    kept: tuple[int, int]  # [first, last) of the resized axis that is computed
    block: int
    index: np.ndarray
    weights: np.ndarray

    @property
    def n_out(self) -> int:
        return self.kept[1] - self.kept[0]

    def matrix(self) -> np.ndarray:
        """The equivalent dense matrix float64 [in_size, n_out] (for tests)."""
        dense = np.zeros((self.in_size, self.index.shape[0] * self.block))
        for g in range(self.index.shape[0]):
            np.add.at(dense, (self.index[g][:, None], np.arange(g * self.block, (g + 1) * self.block)[None, :]),
                      self.weights[g].astype(np.float64))
        return dense[:, : self.n_out]

    def apply_last(self, x: np.ndarray) -> np.ndarray:
        """Resample the last axis of float32 ``x`` [..., in_size] -> [..., n_out]."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_size)
        spans = rows[:, self.index]  # [R, G, L]
        out = np.matmul(spans.transpose(1, 0, 2), self.weights)  # [G, R, block]
        out = out.transpose(1, 0, 2).reshape(len(rows), -1)[:, : self.n_out]
        return np.ascontiguousarray(out.reshape(*lead, self.n_out), dtype=np.float32)

    def apply_first(self, x: np.ndarray) -> np.ndarray:
        """Resample the first axis of float32 ``x`` [in_size, ...] -> [n_out, ...]; each gathered
        row is one contiguous block, so a frame is read in its own (row-major) layout."""
        trail = x.shape[1:]
        groups, span = self.index.shape
        spans = x[self.index.reshape(-1)].reshape(groups, span, -1)  # [G, L, rest]
        out = np.matmul(self.weights.transpose(0, 2, 1), spans)  # [G, block, rest]
        out = out.reshape(groups * self.block, *trail)[: self.n_out]
        return np.ascontiguousarray(out, dtype=np.float32)


def _block_tables(starts: np.ndarray, weights: list[np.ndarray], in_size: int, block: int):
    n = len(starts)
    groups = math.ceil(n / block)
    ends = np.array([s + len(w) for s, w in zip(starts, weights)])
    span = 0
    for g in range(groups):
        lo, hi = g * block, min((g + 1) * block, n)
        span = max(span, int(ends[lo:hi].max() - starts[lo:hi].min()))
    index = np.empty((groups, span), dtype=np.int64)
    table = np.zeros((groups, span, block), dtype=np.float64)
    for g in range(groups):
        lo, hi = g * block, min((g + 1) * block, n)
        first = int(starts[lo:hi].min())
        first = min(first, max(in_size - span, 0))  # spans stay inside the axis where they can
        index[g] = np.minimum(first + np.arange(span), in_size - 1)
        for j in range(lo, hi):
            offset = starts[j] - first
            table[g, offset : offset + len(weights[j]), j - lo] = weights[j]
    return index, table.astype(np.float32)


def _choose_block(starts: np.ndarray, weights: list[np.ndarray]) -> int:
    """The block size with the least estimated cost: gathered values plus multiply-adds."""
    n = len(starts)
    best, best_cost = 1, math.inf
    ends = np.array([s + len(w) for s, w in zip(starts, weights)])
    for block in sorted({1, 2, 4, 8, 16, 32, 64, 128, n}):
        if block > n:
            continue
        groups = math.ceil(n / block)
        span = max(int(ends[g * block : (g + 1) * block].max() - starts[g * block : (g + 1) * block].min())
                   for g in range(groups))
        cost = groups * span * (_GATHER_COST_IN_MACS + block)
        if cost < best_cost:
            best, best_cost = block, cost
    return best


@lru_cache(maxsize=64)
def axis_resample(in_size: int, out_size: int, kept: tuple[int, int] | None = None,
                  block: int | None = None) -> AxisResample:
    """The tables that resize an axis of ``in_size`` to ``out_size`` and keep outputs ``kept``."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"axis sizes must be positive, got {in_size} -> {out_size}")
    kept = kept or (0, out_size)
    starts, weights = triangle_weights(in_size, out_size)
    starts, weights = starts[kept[0] : kept[1]], weights[kept[0] : kept[1]]
    block = block or _choose_block(starts, weights)
    index, table = _block_tables(starts, weights, in_size, block)
    return AxisResample(in_size, out_size, tuple(kept), block, index, table)
