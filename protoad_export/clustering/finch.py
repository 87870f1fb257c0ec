"""FINCH clustering (Sarfraz et al., CVPR 2019) for millions of unit-length patch features.

Each level links every point to its first neighbour (cosine); the connected components of that
graph (j = k_i, k_j = i or k_i = k_j, which is weak connectivity of the i -> k_i graph) are the
clusters. The next level repeats on the cluster means, which are always the means over the
original points (size-weighted means of the previous level's means, so only level 0 reads
the data). ProtoAD stops at the first partition with fewer than ``stop_below`` clusters.

First neighbours, at every level: exact blocked matrix products (``neighbours.py``) on a GPU or,
on a CPU, up to ``EXACT_CPU_LIMIT`` points; above, on a CPU, an IVF search run as int8 products
with FP32 re-scoring and a run-time calibrated nprobe (``ivf.py``). Nothing of size N x N is ever
held; a disk-backed input is read in chunks, so memory is the IVF's 16-bit copy of the data (the
size of the build's FP16 features) plus the cluster means plus one chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from . import kernels
from ..errors import InputError
from ..options import NEIGHBOUR_METHODS
from .ivf import approx_first_neighbours
from .neighbours import as_float32, chunk_rows, exact_first_neighbours, exact_gpu_bytes, release_pages

# Up to this many points a CPU searches exactly (N^2 * C at BLAS speed); above, an IVF index
# whose nprobe is calibrated at run time to a measured first-neighbour recall (finch.md).
EXACT_CPU_LIMIT = 20_000
# Exact search on a GPU holds all rows there (FP32 and FP16: 25 GiB for the full magnetic tile set
# with 1792 dims). Where that exceeds this share of the free GPU memory, ``auto`` searches with
# the CPU's IVF instead of failing with an out-of-memory error, and ``exact`` stops with one line.
GPU_MEMORY_SHARE = 0.9


def _gpu_free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def _gpu_exact_fits(n: int, dim: int, device: torch.device) -> tuple[bool, int, int]:
    """Whether exact GPU search of ``n`` x ``dim`` rows fits ``GPU_MEMORY_SHARE`` of the free GPU
    memory, with the bytes it needs and the bytes free."""
    need, free = exact_gpu_bytes(n, dim), _gpu_free_bytes(device)
    return need <= GPU_MEMORY_SHARE * free, need, free


def searches_on_cpu(n: int, dim: int, method: str = "auto", device: torch.device | str = "cpu") -> bool:
    """Whether ``first_neighbours`` will search ``n`` rows of ``dim`` on the CPU (and so hold them in
    host memory): the build's memory plan asks before extracting any feature."""
    device = torch.device(device)
    return device.type != "cuda" or method == "approx" or (method == "auto" and not _gpu_exact_fits(n, dim, device)[0])


def first_neighbours(x: np.ndarray, method: str = "auto", device: torch.device | str = "cpu", *,
                     kernel: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Pick the neighbour search: exact on a GPU (when its rows fit in ``GPU_MEMORY_SHARE`` of the
    free GPU memory) or for small N on a CPU, the IVF otherwise. ``kernel`` forces the CPU's
    product kernel (``kernels.py``); by default the fastest measured."""
    if method not in NEIGHBOUR_METHODS:
        raise InputError(f"unknown neighbour method {method!r}: choose one of {', '.join(NEIGHBOUR_METHODS)}")
    device = torch.device(device)
    if len(x) < 2:
        raise InputError("FINCH needs at least two points")
    note = ""
    if device.type == "cuda" and method != "approx":
        fits, need, free = _gpu_exact_fits(*x.shape, device)
        if not fits:
            if method == "exact":
                raise InputError(f"exact first neighbours of {len(x):,} x {x.shape[1]} features need {need / 2**30:.1f} GiB "
                                 f"of GPU memory, {free / 2**30:.1f} GiB is free: use --neighbours auto (the CPU's IVF "
                                 "then) or --max-train-patches")
            device = torch.device("cpu")  # and choose as on a CPU
            note = f" (on the CPU: exact GPU search needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free)"
    if method == "exact" or (method == "auto" and (device.type == "cuda" or len(x) <= EXACT_CPU_LIMIT)):
        return (*exact_first_neighbours(x, device, kernel=kernel), "exact" + note)
    idx, sim, info = approx_first_neighbours(x, kernel=kernel)
    return idx, sim, f"ivf {info['nprobe']}/{info['nlist']} recall~{info['recall']:.3f}{note}"


def _add_rows(sums: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    # Only the labels present in this chunk: the temporary stays the size of the chunk.
    present, local = np.unique(labels, return_inverse=True)
    onehot = sp.csr_matrix((np.ones(len(labels), np.float32), (local, np.arange(len(labels)))), shape=(len(present), len(labels)))
    sums[present] += onehot @ rows


def cluster_means(data: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Float32 means per label of the rows of ``data`` (a memmap is read chunk by chunk), each
    row weighted by ``weights`` (cluster sizes, when the rows are means themselves)."""
    sums = np.zeros((k, data.shape[1]), dtype=np.float32)
    step = chunk_rows(data)
    for start in range(0, len(data), step):
        rows = as_float32(data[start : start + step])
        release_pages(data)
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
    levels: list[np.ndarray] = field(default_factory=list)  # labels per level (``keep_levels``)
    level_means: list[np.ndarray] = field(default_factory=list)  # cluster means per level (``keep_levels``)
    first_neighbours: np.ndarray | None = None  # level 0, kept to measure recall
    neighbour_methods: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    # Per product family used on the CPU ("scan": the IVF, "dense": exact search): the kernel and
    # the measured rates it was chosen from (``kernels.KernelChoice.record``).
    kernels: dict = field(default_factory=dict)
    # Per level but the last (``keep_levels``): each cluster's first neighbour among the level's
    # clusters and their cosine, the links the next level was formed from.
    level_links: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

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
    *,
    kernel: str | None = None,
) -> FinchResult:
    """Run FINCH on ``data`` [N, C]; stop at the first partition with fewer than ``stop_below`` clusters.

    Without ``stop_below`` the whole hierarchy is computed as ``finch-clust`` does: a level is kept
    while it merges more than one cluster and leaves more than one. The result's partition is the
    last one kept. (``finch-clust``'s ``ensure_early_exit`` zeroes matrix entries that
    ``connected_components`` still counts as edges, so it never changes a partition and is not
    copied; ``tests/test_finch.py`` shows it.) ``kernel`` forces the CPU's product kernel
    (``kernels.py``; also ``PROTOAD_PRODUCT_KERNEL``).
    """
    if stop_below is not None and stop_below < 2:
        raise InputError(f"max prototypes must be at least 2, got {stop_below}")
    t0 = time.perf_counter()
    nn_idx, _, how = first_neighbours(data, method, device, kernel=kernel)
    labels, count = _components(nn_idx)
    counts = np.bincount(labels, minlength=count).astype(np.float64)
    means = cluster_means(data, labels, count)
    result = FinchResult(labels, means, [count], [labels] if keep_levels else [], [means] if keep_levels else [],
                         nn_idx, [how], [time.perf_counter() - t0])
    _record_kernel(result, how, data.shape[1], device, kernel)
    if log:
        log(f"FINCH level 0: {count:,} clusters ({how} neighbours, {result.seconds[-1]:.1f} s)")
    while stop_below is None or count >= stop_below:
        if count < 3:
            break
        t0 = time.perf_counter()
        nn_idx, nn_sim, how = first_neighbours(means, method, device, kernel=kernel)
        merged, new_count = _components(nn_idx)
        if new_count == 1 or count - new_count <= 1:
            break
        if keep_levels:
            result.level_links.append((nn_idx, np.asarray(nn_sim, dtype=np.float32)))
        labels = merged[labels]
        # Size-weighted means of means are the means over the original points: no pass over the data.
        means = cluster_means(means, merged, new_count, weights=counts)
        counts = np.bincount(merged, weights=counts, minlength=new_count)
        count = new_count
        result.labels, result.means = labels, means
        result.partition_sizes.append(count)
        result.neighbour_methods.append(how)
        result.seconds.append(time.perf_counter() - t0)
        _record_kernel(result, how, data.shape[1], device, kernel)
        if keep_levels:
            result.levels.append(labels)
            result.level_means.append(means)
        if log:
            log(f"FINCH level {len(result.partition_sizes) - 1}: {count:,} clusters ({how} neighbours, {result.seconds[-1]:.1f} s)")
    return result


def merge_to_count(neighbours: np.ndarray, similarity: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """FINCH's required-cluster-count step (``req_clust`` in the authors' code) in one pass: merge a
    level's clusters along their first-neighbour links (``neighbours`` [n], ``similarity`` [n], as
    kept in ``FinchResult.level_links``), the most similar first, until ``count`` clusters are left.

    The authors merge one closest pair at a time and search again after each merge, which costs a
    neighbour search per merge (hundreds of thousands at the sizes here); this keeps the level's
    own links, so the result lies between the level and the next one (each of its clusters is a
    union of the level's clusters and part of one of the next level's). Returns the labels [n]
    (0 .. k-1) of the level's clusters and k, which is ``count`` unless the links cannot reach it:
    ``n`` when ``count >= n``, the next level's size when ``count`` is below it.
    """
    n = len(neighbours)
    if len(similarity) != n:
        raise InputError(f"{n} first neighbours but {len(similarity)} similarities")
    order = np.argsort(-np.asarray(similarity, dtype=np.float64), kind="stable")  # ties: lower index first

    def components(links: int) -> tuple[np.ndarray, int]:
        keep = order[:links]
        graph = sp.csr_matrix((np.ones(links, dtype=np.float32), (keep, neighbours[keep])), shape=(n, n))
        found, labels = connected_components(graph, directed=True, connection="weak", return_labels=True)
        return labels.astype(np.int64), int(found)

    if count >= n:
        return np.arange(n, dtype=np.int64), n
    # Each added link merges at most two components, so the count falls one at a time: the fewest
    # strongest links that leave at most ``count`` components leave exactly ``count``.
    low, high = 0, n
    labels, found = components(high)
    if found >= count:
        return labels, found
    while high - low > 1:
        middle = (low + high) // 2
        if components(middle)[1] <= count:
            high = middle
        else:
            low = middle
    return components(high)


def _record_kernel(result: FinchResult, how: str, dim: int, device, kernel: str | None) -> None:
    """Note the product kernel a level's CPU search used (the choice is cached: no new timing)."""
    on_cpu = torch.device(device).type != "cuda" or how.startswith("ivf") or "(on the CPU" in how
    family = "scan" if how.startswith("ivf") else "dense"
    if on_cpu and family not in result.kernels:
        result.kernels[family] = kernels.choose(dim, family=family, force=kernel).record()
