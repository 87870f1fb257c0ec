"""FINCH clustering (Sarfraz et al., CVPR 2019) for millions of unit-length patch features.

Each level links every point to its first neighbour (cosine); the connected components of that
graph (j = k_i, k_j = i or k_i = k_j, which is weak connectivity of the i -> k_i graph) are the
clusters. The next level repeats on the cluster means, which are always the means over the
original points (merged from the previous level's sums, so the data is read once). ProtoAD stops
at the first partition with fewer than ``stop_below`` clusters.

First neighbours, at every level: exact blocked matrix products on a GPU (FP16 products, the best
candidates re-scored in FP32) or on a CPU for small N; above ``EXACT_CPU_LIMIT`` points on a CPU a
faiss IVF index (inner product on unit vectors) whose parameters were chosen by measured recall
(``benchmarks/results/finch.md``). Nothing of size N x N is ever held, and a disk-backed input is
read in chunks whose pages are released after use, so resident memory stays far below its size.
"""

from __future__ import annotations

import math
import mmap
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from .errors import InputError

NEIGHBOUR_METHODS = ("auto", "exact", "approx")
# Above this many points a CPU uses the IVF index: exact search costs N^2 * C, IVF about
# N * 2 * sqrt(nprobe * N) * C plus training; measured crossover ~20k on 2 cores (finch.md).
EXACT_CPU_LIMIT = 20_000
# IVF parameters, chosen by first-neighbour recall on magnetic tile features (finch.md): recall
# >= 0.99 at 100k and 2.4M points. nlist ~ sqrt(nprobe * N) balances coarse and fine search.
IVF_NPROBE = 8
IVF_TRAIN_PER_LIST = 40
IVF_KMEANS_ITERATIONS = 10
# Candidates re-scored in FP32 after FP16 products: FP16 inputs carry ~2^-12 relative error, so
# close neighbours can swap order; the true winner is found unless more than this many
# candidates land within that error of it.
RECHECK_CANDIDATES = 8
_CHUNK_BYTES = 1 << 26  # float32 bytes per chunk of rows read from the data


def _chunk_rows(x: np.ndarray) -> int:
    return max(1024, _CHUNK_BYTES // (4 * x.shape[1]))


def _release_pages(x: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped input (they stay in the page cache, off our RSS)."""
    handle = getattr(x, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(handle, "madvise"):
        handle.madvise(mmap.MADV_DONTNEED)


def _unit_rows(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    block = np.asarray(x[start:stop], dtype=np.float32)
    _release_pages(x)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def _unit_matrix(x: np.ndarray) -> np.ndarray:
    step = _chunk_rows(x)
    return np.concatenate([_unit_rows(x, s, s + step) for s in range(0, len(x), step)])


def block_first_neighbours(
    queries: torch.Tensor, base: torch.Tensor, offset: int, low_precision: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best match in ``base`` (unit rows, FP32) for ``queries`` = ``base[offset:offset+B]``, self excluded.

    With ``low_precision`` (FP16 on CUDA) the products run in that dtype and the top
    ``RECHECK_CANDIDATES`` of each row are re-scored in FP32, so the returned similarity is exact
    and the winner is exact up to FP16 ties beyond that many candidates. Works on any device, so
    the GPU logic is testable on a CPU.
    """
    b = len(queries)
    rows = torch.arange(b, device=queries.device)
    if low_precision is None:
        s = queries @ base.T
        s[rows, rows + offset] = -torch.inf
        val, top = s.max(dim=1)
        return top, val
    # cos - 1 instead of cos (bias added in the FP32 accumulator before rounding): values near
    # 0 keep FP16's relative precision, where cos near 1 would round to steps of 4.9e-4.
    shift = torch.full((1, 1), -1.0, dtype=low_precision, device=queries.device).expand(b, len(base))
    s = torch.addmm(shift, queries.to(low_precision), base.to(low_precision).T)
    s[rows, rows + offset] = -torch.inf
    k = min(RECHECK_CANDIDATES, len(base) - 1)
    cand = s.topk(k, dim=1).indices
    exact = torch.einsum("bc,bkc->bk", queries, base[cand])
    exact[cand == (rows + offset)[:, None]] = -torch.inf  # never self, even if FP16 ranked it
    # Among exact ties prefer the lowest index, as the FP32 path (first maximum) does.
    order = torch.argsort(cand, dim=1)
    cand, exact = cand.gather(1, order), exact.gather(1, order)
    val, best = exact.max(dim=1)
    return cand.gather(1, best[:, None])[:, 0], val


def exact_first_neighbours(
    x: np.ndarray, device: torch.device | str = "cpu", block_elements: int = 1 << 24,
    low_precision: torch.dtype | None | str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbour (excluding self) of every row by cosine: (indices int64, similarities).

    Products are taken in blocks of ``block_elements`` entries, so memory is O(N * C + block).
    ``low_precision="auto"``: FP16 products + FP32 re-check on CUDA, plain FP32 on a CPU.
    """
    device = torch.device(device)
    if low_precision == "auto":
        low_precision = torch.float16 if device.type == "cuda" else None
    n = len(x)
    if n < 2:
        raise InputError("FINCH needs at least two points")
    base = torch.from_numpy(_unit_matrix(x)).to(device)
    rows = max(1, min(n, block_elements // n))
    idx = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            top, val = block_first_neighbours(base[start:stop], base, start, low_precision)
            idx[start:stop] = top.cpu().numpy()
            sim[start:stop] = val.float().cpu().numpy()
    return idx, sim


def _exact_for_some(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbours of a few ``rows`` of ``x`` against all of it, streaming ``x``."""
    q = torch.from_numpy(_unit_matrix(x[rows]) if len(rows) else np.zeros((0, x.shape[1]), np.float32))
    best = torch.full((len(rows),), -torch.inf)
    arg = torch.zeros(len(rows), dtype=torch.int64)
    own = torch.from_numpy(rows)
    for start in range(0, len(x), _chunk_rows(x)):
        s = q @ torch.from_numpy(_unit_rows(x, start, start + _chunk_rows(x))).T
        local = own - start
        inside = (local >= 0) & (local < s.shape[1])
        s[torch.nonzero(inside)[:, 0], local[inside]] = -torch.inf
        val, top = s.max(dim=1)
        better = val > best
        best[better], arg[better] = val[better], top[better] + start
    return arg.numpy(), best.numpy()


def approx_first_neighbours(
    x: np.ndarray, nprobe: int = IVF_NPROBE, nlist: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """First neighbours from a faiss IVF inner-product index on unit vectors, stored in FP16.

    FP16 storage (``IndexIVFScalarQuantizer``) halves the index (the build's features are FP16
    already); the similarities it returns carry FP16 rounding (~1e-4). Rows go in and out in
    chunks, so a disk-backed input is never converted whole. The rare point whose probed lists
    hold nothing but itself gets an exact search.
    """
    import faiss

    n, dim = x.shape
    nlist = nlist or max(1, min(n // IVF_TRAIN_PER_LIST, int(round(math.sqrt(nprobe * n)))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_KMEANS_ITERATIONS
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
    index.train(_unit_sample(x, sample))
    step = _chunk_rows(x)
    for start in range(0, n, step):
        index.add(_unit_rows(x, start, start + step))
    index.nprobe = nprobe
    idx = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    for start in range(0, n, step):
        q = _unit_rows(x, start, start + step)
        d, i = index.search(q, 2)
        own = np.arange(start, start + len(q))[:, None]
        # Skip the point itself (usually, but with duplicates not always, the first hit).
        keep = (i != own) & (i >= 0)
        first = keep.argmax(axis=1)
        pick = np.arange(len(q))
        idx[start : start + len(q)] = np.where(keep[pick, first], i[pick, first], -1)
        sim[start : start + len(q)] = d[pick, first]
    del index
    missing = np.flatnonzero(idx < 0)
    if len(missing):
        idx[missing], sim[missing] = _exact_for_some(x, missing)
    return idx, sim


def _unit_sample(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unit rows ``x[rows]`` (sorted) read chunk by chunk, releasing the mapped pages as it goes."""
    out = []
    step = _chunk_rows(x)
    for start in range(0, len(x), step):
        lo, hi = np.searchsorted(rows, [start, start + step])
        if hi > lo:
            out.append(np.asarray(x[rows[lo:hi]], dtype=np.float32))
            _release_pages(x)
    block = np.concatenate(out)
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


def first_neighbours(x: np.ndarray, method: str = "auto", device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, str]:
    """Pick the neighbour search: exact on a GPU or for small N, IVF otherwise."""
    if method not in NEIGHBOUR_METHODS:
        raise InputError(f"unknown neighbour method {method!r}: choose one of {', '.join(NEIGHBOUR_METHODS)}")
    device = torch.device(device)
    if len(x) < 2:
        raise InputError("FINCH needs at least two points")
    if method == "exact" or (method == "auto" and (device.type == "cuda" or len(x) <= EXACT_CPU_LIMIT)):
        return (*exact_first_neighbours(x, device), "exact")
    return (*approx_first_neighbours(x), "approx")


def _add_rows(sums: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    # Only the labels present in this chunk: the temporary stays the size of the chunk.
    present, local = np.unique(labels, return_inverse=True)
    onehot = sp.csr_matrix((np.ones(len(labels), np.float32), (local, np.arange(len(labels)))), shape=(len(present), len(labels)))
    sums[present] += onehot @ rows


def cluster_means(data: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Float32 means per label of the rows of ``data`` (a memmap is read chunk by chunk), each
    row weighted by ``weights`` (cluster sizes, when the rows are means themselves)."""
    sums = np.zeros((k, data.shape[1]), dtype=np.float32)
    step = _chunk_rows(data)
    for start in range(0, len(data), step):
        rows = np.asarray(data[start : start + step], dtype=np.float32)
        _release_pages(data)
        if weights is not None:
            rows = rows * weights[start : start + step, None].astype(np.float32)
        _add_rows(sums, labels[start : start + step], rows)
    counts = np.bincount(labels, weights=weights, minlength=k)
    sums /= counts[:, None].astype(np.float32)
    return sums


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
    last one kept. (``finch-clust``'s ``ensure_early_exit`` zeroes matrix entries that
    ``connected_components`` still counts as edges, so it never changes a partition and is not
    copied; ``tests/test_finch.py`` shows it.)
    """
    if stop_below is not None and stop_below < 2:
        raise InputError(f"max prototypes must be at least 2, got {stop_below}")
    t0 = time.perf_counter()
    nn_idx, _, how = first_neighbours(data, method, device)
    labels, count = _components(nn_idx)
    counts = np.bincount(labels, minlength=count).astype(np.float64)
    means = cluster_means(data, labels, count)
    result = FinchResult(labels, means, [count], [labels] if keep_levels else [], [how], [time.perf_counter() - t0])
    if log:
        log(f"FINCH level 0: {count:,} clusters ({how} neighbours, {result.seconds[-1]:.1f} s)")
    while stop_below is None or count >= stop_below:
        if count < 3:
            break
        t0 = time.perf_counter()
        nn_idx, _, how = first_neighbours(means, method, device)
        merged, new_count = _components(nn_idx)
        if new_count == 1 or count - new_count <= 1:
            break
        labels = merged[labels]
        # Size-weighted means of means are the means over the original points: no pass over the data.
        means = cluster_means(means, merged, new_count, weights=counts)
        counts = np.bincount(merged, weights=counts, minlength=new_count)
        count = new_count
        result.labels, result.means = labels, means
        result.partition_sizes.append(count)
        result.neighbour_methods.append(how)
        result.seconds.append(time.perf_counter() - t0)
        if keep_levels:
            result.levels.append(labels)
        if log:
            log(f"FINCH level {len(result.partition_sizes) - 1}: {count:,} clusters ({how} neighbours, {result.seconds[-1]:.1f} s)")
    return result
