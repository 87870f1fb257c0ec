"""FINCH clustering (Sarfraz et al., CVPR 2019) for millions of unit-length patch features.

Each level links every point to its first neighbour (cosine); the connected components of that
graph (j = k_i, k_j = i or k_i = k_j, which is weak connectivity of the i -> k_i graph) are the
clusters. The next level repeats on the cluster means, which are always taken over the original
points. ProtoAD stops at the first partition with fewer than ``stop_below`` clusters.

First neighbours come from exact blocked matrix products (on the GPU when there is one) or, for
large N on a CPU, from an approximate faiss index whose recall is measured by
``benchmarks/finch_scaling.py``. Nothing of size N x N is ever held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from .errors import InputError

NEIGHBOUR_METHODS = ("auto", "exact", "approx")
# Above this many points a CPU uses the approximate index; the exact search costs N^2 * C.
EXACT_CPU_LIMIT = 60_000
_ROWS_PER_CHUNK = 65_536


def _as_unit_float32(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    block = np.asarray(x[start:stop], dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def exact_first_neighbours(
    x: np.ndarray, device: torch.device | str = "cpu", block_elements: int = 1 << 26
) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbour (excluding self) of every row by cosine: (indices int64, similarities).

    On CUDA the products run in FP16 and the two best candidates of each row are re-scored in FP32,
    so the winner is exact up to candidates closer than FP16 can separate.
    """
    device = torch.device(device)
    n = len(x)
    if n < 2:
        raise InputError("FINCH needs at least two points")
    base = torch.from_numpy(np.concatenate([_as_unit_float32(x, s, s + _ROWS_PER_CHUNK) for s in range(0, n, _ROWS_PER_CHUNK)]))
    base = base.to(device)
    fast = base.half() if device.type == "cuda" else base
    rows = max(1, min(n, block_elements // n))
    idx = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            s = fast[start:stop] @ fast.T
            s[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = -torch.inf
            if device.type == "cuda":
                k = min(2, n - 1)
                cand = s.topk(k, dim=1).indices
                exact = torch.einsum("bc,bkc->bk", base[start:stop], base[cand])
                best = exact.argmax(dim=1)
                top = cand.gather(1, best[:, None])[:, 0]
                val = exact.gather(1, best[:, None])[:, 0]
            else:
                val, top = s.max(dim=1)
            idx[start:stop] = top.cpu().numpy()
            sim[start:stop] = val.float().cpu().numpy()
    return idx, sim


def approx_first_neighbours(
    x: np.ndarray, hnsw_m: int = 32, ef_construction: int = 64, ef_search: int = 128, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate first neighbours with a faiss HNSW inner-product index on unit vectors.

    Rows are added in chunks, so a disk-backed FP16 array is never converted whole to FP32.
    """
    import faiss

    n, dim = x.shape
    faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
    index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    for start in range(0, n, _ROWS_PER_CHUNK):
        index.add(_as_unit_float32(x, start, start + _ROWS_PER_CHUNK))
    idx = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    for start in range(0, n, _ROWS_PER_CHUNK):
        q = _as_unit_float32(x, start, start + _ROWS_PER_CHUNK)
        d, i = index.search(q, 3)
        own = np.arange(start, start + len(q))[:, None]
        # Skip the point itself (it is usually, but with duplicates not always, the first hit).
        keep = (i != own) & (i >= 0)
        first = keep.argmax(axis=1)
        idx[start : start + len(q)] = i[np.arange(len(q)), first]
        sim[start : start + len(q)] = d[np.arange(len(q)), first]
    return idx, sim


def first_neighbours(x: np.ndarray, method: str = "auto", device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, str]:
    """Pick the neighbour search: exact on a GPU or for small N, approximate otherwise."""
    if method not in NEIGHBOUR_METHODS:
        raise InputError(f"unknown neighbour method {method!r}: choose one of {', '.join(NEIGHBOUR_METHODS)}")
    device = torch.device(device)
    if method == "exact" or (method == "auto" and (device.type == "cuda" or len(x) <= EXACT_CPU_LIMIT)):
        return (*exact_first_neighbours(x, device), "exact")
    return (*approx_first_neighbours(x), "approx")


def cluster_means(data: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Float32 means of the rows of ``data`` per label, accumulated chunk by chunk (data may be a memmap)."""
    sums = np.zeros((k, data.shape[1]), dtype=np.float64)
    for start in range(0, len(data), _ROWS_PER_CHUNK):
        lab = labels[start : start + _ROWS_PER_CHUNK]
        onehot = sp.csr_matrix((np.ones(len(lab), dtype=np.float32), (lab, np.arange(len(lab)))), shape=(k, len(lab)))
        sums += onehot @ np.asarray(data[start : start + _ROWS_PER_CHUNK], dtype=np.float32)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return (sums / counts[:, None]).astype(np.float32)


def _components(neighbours: np.ndarray) -> tuple[np.ndarray, int]:
    n = len(neighbours)
    graph = sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), neighbours)), shape=(n, n))
    count, labels = connected_components(graph, directed=True, connection="weak", return_labels=True)
    return labels.astype(np.int64), int(count)


@dataclass
class FinchResult:
    """The chosen partition of the original points and the history of the hierarchy."""

    labels: np.ndarray
    means: np.ndarray
    partition_sizes: list[int]
    levels: list[np.ndarray] = field(default_factory=list)
    neighbour_methods: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def n_clusters(self) -> int:
        return len(self.means)


def finch(
    data: np.ndarray,
    stop_below: int | None = None,
    method: str = "auto",
    device: torch.device | str = "cpu",
    keep_levels: bool = False,
    log=None,
) -> FinchResult:
    """Run FINCH on ``data`` [N, C]; stop at the first partition with fewer than ``stop_below`` clusters.

    Without ``stop_below`` the whole hierarchy is computed as ``finch-clust`` does: a level is kept
    while it merges more than one cluster and leaves more than one. The result's partition is the
    last one kept. (``finch-clust``'s ``ensure_early_exit`` only zeroes matrix entries that
    ``connected_components`` still counts as edges, so it never changes a partition; it is not copied.)
    """
    if stop_below is not None and stop_below < 2:
        raise InputError(f"max prototypes must be at least 2, got {stop_below}")
    t0 = time.perf_counter()
    nn_idx, _, how = first_neighbours(data, method, device)
    labels, count = _components(nn_idx)
    means = cluster_means(data, labels, count)
    result = FinchResult(labels, means, [count], [labels] if keep_levels else [], [how], [time.perf_counter() - t0])
    if log:
        log(f"FINCH level 0: {count} clusters ({how} neighbours, {result.seconds[-1]:.1f} s)")
    while stop_below is None or count >= stop_below:
        if count < 3:
            break
        t0 = time.perf_counter()
        nn_idx, _, how = first_neighbours(means, method, device)
        merged, new_count = _components(nn_idx)
        if new_count == 1 or count - new_count <= 1:
            break
        labels = merged[labels]
        means = cluster_means(data, labels, new_count)
        count = new_count
        result.labels, result.means = labels, means
        result.partition_sizes.append(count)
        result.neighbour_methods.append(how)
        result.seconds.append(time.perf_counter() - t0)
        if keep_levels:
            result.levels.append(labels)
        if log:
            log(f"FINCH level {len(result.partition_sizes) - 1}: {count} clusters ({how} neighbours, {result.seconds[-1]:.1f} s)")
    return result
