"""First neighbours by cosine, exactly, and the chunked reads of the data that every search shares.

Exact search is blocked matrix products of unit rows: cache-sized FP32 tiles on a CPU; on a GPU,
FP16 products (as cos - 1) whose best ``RECHECK_CANDIDATES`` per row are re-scored in FP32. Nothing
of size N x N is ever held. A disk-backed input (``np.memmap``) is read in chunks whose mapped
pages are released after use. ``ivf.py`` holds the approximate search for large N on a CPU,
``finch.py`` the hierarchy that calls them.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from . import kernels
from ..errors import InputError

# Candidates re-scored in FP32 after FP16 products: FP16 inputs carry ~2^-12 relative error, so
# close neighbours can swap order; the true winner is found unless more than this many
# candidates land within that error of it.
RECHECK_CANDIDATES = 8
CHUNK_BYTES = 1 << 26  # float32 bytes per chunk of rows read from the data
BLOCK_ELEMENTS = 1 << 24  # similarities per block of exact products (64 MiB in FP32)
# Per block of the IVF scan and of exact CPU search: 4 MiB stays in cache between the product and
# its row maxima; larger blocks write the similarities to memory and read them back (finch.md).
SCAN_BLOCK_ELEMENTS = 1 << 20
_CPU_TILE_ROWS = 2048  # rows per tile of exact CPU search (x 512 columns at that block size)


def as_float32(block: np.ndarray) -> np.ndarray:
    """A float32 copy of ``block`` (rows of the FP16 store, or anything else). FP16 converts through
    torch, which uses the CPU's F16C instructions (several times faster than numpy's conversion)."""
    if block.dtype == np.float16:
        return torch.from_numpy(np.array(block)).float().numpy()  # np.array: writable, for torch
    return np.array(block, dtype=np.float32)


def chunk_rows(x: np.ndarray) -> int:
    """Rows of ``x`` per chunk read (``CHUNK_BYTES`` of FP32)."""
    return max(1024, CHUNK_BYTES // (4 * x.shape[1]))


def release_pages(x: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped input (they stay in the page cache, off our RSS)."""
    handle = getattr(x, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(handle, "madvise"):
        handle.madvise(mmap.MADV_DONTNEED)


def unit_rows(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``x`` as unit FP32 rows, the mapped pages released."""
    block = as_float32(x[start:stop])
    release_pages(x)
    return normalised(block)


def normalised(block: np.ndarray) -> np.ndarray:
    """``block`` (float32 rows) scaled in place to unit length (torch's norm, faster than numpy's)."""
    rows = torch.from_numpy(block)
    rows.div_(rows.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return block


def unit_matrix(x: np.ndarray) -> np.ndarray:
    """All of ``x`` as unit FP32 rows (for data that fits in memory)."""
    step = chunk_rows(x)
    return np.concatenate([unit_rows(x, s, s + step) for s in range(0, len(x), step)])


def unit_sample(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unit rows ``x[rows]`` (``rows`` ascending) read chunk by chunk, releasing the mapped pages
    as it goes: scattered reads through a mapping fault in whole 64 KiB runs around each row."""
    block = np.empty((len(rows), x.shape[1]), dtype=np.float32)
    step = chunk_rows(x)
    for start in range(0, len(x), step):
        lo, hi = np.searchsorted(rows, [start, start + step])
        if hi > lo:
            block[lo:hi] = as_float32(x[rows[lo:hi]])
            release_pages(x)
    return normalised(block)


def block_first_neighbours(
    queries: torch.Tensor, base: torch.Tensor, offset: int, low_precision: torch.dtype | None = None,
    base_low: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best match in ``base`` (unit rows, FP32) for ``queries`` = ``base[offset:offset+B]``, self excluded.

    With ``low_precision`` (FP16 on CUDA) the products run in that dtype and the top
    ``RECHECK_CANDIDATES`` of each row are re-scored in FP32, so the returned similarity is exact
    and the winner is exact up to FP16 ties beyond that many candidates. Works on any device, so
    the GPU logic is testable on a CPU. ``base_low``: ``base`` already cast (saves a cast per block).
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
    if base_low is None:
        base_low = base.to(low_precision)
    s = torch.addmm(shift, queries.to(low_precision), base_low.T)
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


def exact_gpu_bytes(n: int, dim: int) -> int:
    """GPU memory that exact search of ``n`` rows plans for: the unit rows in FP32 and FP16 and one
    default block of similarities (FP16, counted twice for the product's temporaries)."""
    return n * dim * 6 + BLOCK_ELEMENTS * 16 * 4


def exact_first_neighbours(
    x: np.ndarray, device: torch.device | str = "cpu", block_elements: int | None = None,
    low_precision: torch.dtype | None | str = "auto", *, kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbour (excluding self) of every row by cosine: (indices int64, similarities).

    On a CPU in FP32, cache-sized tiles (``_CPU_TILE_ROWS`` rows x ``SCAN_BLOCK_ELEMENTS``);
    otherwise in blocks of ``block_elements`` entries (default ``BLOCK_ELEMENTS``, 16x that on a
    GPU), so memory is O(N * C + block).
    ``low_precision="auto"``: FP16 products + FP32 re-check on CUDA; on a CPU the fastest dense
    kernel measured (``kernels.choose``, or ``kernel``), whose candidates within its error bound
    are re-scored in FP32 (``rescore_candidates``), so the winners are FP32's.
    """
    device = torch.device(device)
    if low_precision == "auto":
        low_precision = torch.float16 if device.type == "cuda" else None
    n = len(x)
    if n < 2:
        raise InputError("FINCH needs at least two points")
    # Filled chunk by chunk, so the host never holds an FP32 copy when the base lives on a GPU.
    base = torch.empty((n, x.shape[1]), dtype=torch.float32, device=device)
    step = chunk_rows(x)
    for start in range(0, n, step):
        base[start : start + step] = torch.from_numpy(unit_rows(x, start, start + step))
    idx = np.empty(n, dtype=np.int64)
    sim = np.empty(n, dtype=np.float32)
    if device.type == "cpu" and low_precision is None:
        kern = kernels.choose(x.shape[1], family="dense", force=kernel).name
        low = None
        if kern != "fp32":
            base_low = base.to(kernels.dense_dtype(kern))
            err = kernels.dense_error(kern, x.shape[1])
        # Tiles that stay in cache between the product and its row maxima.
        for start in range(0, n, _CPU_TILE_ROWS):
            stop = min(n, start + _CPU_TILE_ROWS)
            best = torch.full((stop - start,), -torch.inf)
            arg = torch.zeros(stop - start, dtype=torch.int64)
            if kern != "fp32":
                low = (base_low[start:stop], base_low, err)
            best_among(base[start:stop], torch.arange(start, stop), base, 0, best, arg, low)
            idx[start:stop], sim[start:stop] = arg.numpy(), best.numpy()
        return idx, sim
    base_low = base.to(low_precision) if low_precision is not None else None
    # A GPU wants far larger blocks than a CPU cache does (kernel launches, not memory, limit it).
    block_elements = block_elements or (BLOCK_ELEMENTS * 16 if device.type == "cuda" else BLOCK_ELEMENTS)
    rows = max(1, min(n, block_elements // n))
    with torch.no_grad():
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            top, val = block_first_neighbours(base[start:stop], base, start, low_precision, base_low)
            idx[start:stop] = top.cpu().numpy()
            sim[start:stop] = val.float().cpu().numpy()
    return idx, sim


def best_among(q: torch.Tensor, own: torch.Tensor, base: torch.Tensor, offset: int,
                best: torch.Tensor, arg: torch.Tensor, low: tuple | None = None) -> None:
    """Update ``best``/``arg`` of unit queries ``q`` (rows ``own`` of the data) with the rows of
    ``base`` (rows ``offset``... of the data), self excluded, in products small enough to stay in
    cache; row maxima without indices cost a seventh of ``max(dim=1)``, so indices are taken only
    for the rows that improve. ``low``: (q, base) in a dense kernel's dtype and its error bound
    (``kernels.dense_error``): the products run in that dtype, the candidates are re-scored."""
    width = max(128, SCAN_BLOCK_ELEMENTS // len(q))
    for lo in range(0, len(base), width):
        tile = base[lo : lo + width]
        s = q @ tile.T if low is None else (low[0] @ low[1][lo : lo + width].T).float()
        local = own - (offset + lo)
        inside = (local >= 0) & (local < s.shape[1])
        s[torch.nonzero(inside)[:, 0], local[inside]] = -torch.inf
        if low is not None:
            s = rescore_candidates(s, q, tile, best, low[2])
        better = torch.nonzero(s.amax(dim=1) > best)[:, 0]
        if len(better):
            val, top = s[better].max(dim=1)
            best[better], arg[better] = val, top + offset + lo


def exact_for_some(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbours of a few ``rows`` of ``x`` against all of it, streaming ``x``."""
    q = torch.from_numpy(unit_sample(x, rows))
    best = torch.full((len(rows),), -torch.inf)
    arg = torch.zeros(len(rows), dtype=torch.int64)
    own = torch.from_numpy(rows)
    for start in range(0, len(x), chunk_rows(x)):
        best_among(q, own, torch.from_numpy(unit_rows(x, start, start + chunk_rows(x))), start, best, arg)
    return arg.numpy(), best.numpy()


def rescore_candidates(approx: torch.Tensor, q: torch.Tensor, tile: torch.Tensor, best: torch.Tensor,
                       err: float) -> torch.Tensor:
    """FP32 products of unit ``q`` [Q, C] and ``tile`` [T, C] where the low-precision ones
    ``approx`` [Q, T] (float32, -inf where excluded) may hold a winner, -inf elsewhere.

    With every low-precision product within ``err`` of its exact value, a query's exact winner w
    in the tile satisfies approx(w) >= best - err (its exact value is at least the query's exact
    ``best`` so far) and approx(w) >= approx(j) - 2 err for every j of the tile; the entries
    meeting both are re-scored, so the maximum of the result is the exact maximum whenever it can
    beat ``best``.
    """
    threshold = torch.maximum(best - err, approx.amax(dim=1) - 2 * err)
    i, j = torch.nonzero((approx >= threshold[:, None]) & (approx > -torch.inf), as_tuple=True)
    exact = torch.full_like(approx, -torch.inf)
    exact[i, j] = torch.einsum("kc,kc->k", q[i], tile[j])
    return exact


CPU_TILE = 1024  # query rows and bank rows per tile of nearest_similarity on a CPU


def nearest_similarity(queries, bank, query_block: int | None = None, bank_block: int | None = None, *,
                       kernel: str | None = None, bank_low=None):
    """Max cosine of each unit query row [Q, C] to the unit ``bank`` rows [M, C] (torch tensors, same
    device), exactly, in blocks of at most query_block x bank_block similarities.

    On a CPU the products run in the fastest dense kernel measured (``kernels.choose``, or
    ``kernel``); a low-precision one's candidates within its error bound are re-scored in FP32
    (``neighbours.rescore_candidates``), so the result is FP32's. ``bank_low``: the bank already
    in that kernel's dtype (saves a conversion per call).

    On a CPU the default tiles (1024 x 1024) keep the 4 MiB of similarities in cache between the
    product and its row maxima, about twice the speed of 4096 x 16384 blocks
    (benchmarks/results/knn_tiles.md). A GPU gets large blocks (kernel launches limit it there).
    """
    cpu = queries.device.type == "cpu"
    query_block = query_block or (CPU_TILE if cpu else 4096)
    bank_block = bank_block or (CPU_TILE if cpu else 16384)
    kern = kernels.choose(bank.shape[1], family="dense", force=kernel).name if cpu else "fp32"
    if kern != "fp32":
        dtype = kernels.dense_dtype(kern)
        bank_low = bank.to(dtype) if bank_low is None or bank_low.dtype != dtype else bank_low
        err = kernels.dense_error(kern, bank.shape[1])
    best = torch.full((len(queries),), -torch.inf, device=queries.device)
    for q in range(0, len(queries), query_block):
        rows = queries[q : q + query_block]
        rows_low = rows.to(bank_low.dtype) if kern != "fp32" else None
        for b in range(0, len(bank), bank_block):
            if kern == "fp32":
                sim = (rows @ bank[b : b + bank_block].T).amax(dim=1)
            else:
                approx = (rows_low @ bank_low[b : b + bank_block].T).float()
                sim = rescore_candidates(approx, rows, bank[b : b + bank_block], best[q : q + query_block], err).amax(dim=1)
            best[q : q + query_block] = torch.maximum(best[q : q + query_block], sim)
    return best
