"""Approximate first neighbours for millions of unit vectors on a CPU: an inverted file (IVF).

Spherical k-means cuts the data into lists; each point is compared with the members of the
``nprobe`` lists whose centroids are most similar to it, list by list, as one dense int8 matrix
product with all the points that probe that list (VNNI). The lists within the int8 rounding
error of a point's best are re-scored in FP32 from a 16-bit copy of the data, and every found
pair is also offered to its other end (``_take_reverse_links``). nprobe is calibrated at run
time against exhaustive search on a sample, to a first-neighbour recall of at least
``RECALL_TARGET`` at 95 % confidence (``benchmarks/results/finch.md`` shows why fixed parameters
fail). Memory is the lists' 16-bit copy of the data (two int8 halves: the size of the build's
FP16 features) plus one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels, neighbours
from .neighbours import chunk_rows, exact_for_some, unit_rows, unit_sample

RECALL_TARGET = 0.99
RECALL_PROBES = 4000  # standard error of the recall estimate near 0.99: 0.16 points
RECALL_PROBES_MIN = 1000
# Compute budgets are operation counts set for int8 products (VNNI) where the IVF was tuned
# (finch.md section 5), scaled by how much faster than int8 the chosen kernel measured
# (``_budget_scale``): a CPU whose BF16 (AMX) beats int8 probes more lists in the same time and
# reaches more recall. The ratio, measured with the kernels taking turns, not the absolute rate:
# on a shared machine one process measured 75 and another 684 int8 GOP/s within the hour
# (benchmarks/results/kernels.md), which as a budget would have cut level 0 to one list.
RECALL_OPS = 8e12  # fewer probes (not below the minimum) where their search costs more
# nprobe must reach the target at this one-sided confidence (z = 1.645: 95 %), i.e. an estimate of
# 0.9926 for 0.99 on 4,000 probes, so the recall of the whole run is at least the target.
RECALL_Z = 1.645
# nlist = 1.4 sqrt(N): fewer, longer lists mean larger products and fewer gathers per query, more
# lists fewer scanned points; 1.4 was the fastest at equal recall at 100k and 300k points, and
# below ~0.7 sqrt(N) the target needs over a quarter of the lists (finch.md, "Tried and not kept").
IVF_LISTS_PER_ROOT = 1.4
IVF_TRAIN_PER_LIST = 20
IVF_KMEANS_ITERATIONS = 8
# Lists ranked per point (and so the deepest nprobe calibrated). If the target needs more, the
# IVF scans every list (exhaustive search: still int8, re-scored) up to EXHAUSTIVE_LIMIT points;
# beyond, an exhaustive scan would cost a CPU build tens of minutes, so it keeps the nprobe that
# IVF_SCAN_OPS (int8 operations, scaled by ``_budget_scale``) allows and reports its recall instead. On the full
# magnetic tile set (2.4M points) that is 21 of 2,164 lists with 176 dims and 2 with 1792 dims
# (where the FP32 re-scoring covers most of the probed lists); RESULTS.md section 2.
MAX_PROBE_SHARE = 1 / 4
EXHAUSTIVE_LIMIT = 100_000
IVF_SCAN_OPS = 2e13
# The calibration counts the reverse repair for the probes whose direct hit comes after the depth
# where the direct recall is this far below what is needed (about 5 % of them at 100k).
REPAIR_CHECK_SHARE = 0.04
# The IVF's products take int8-rounded rows, multiplied by the fastest kernel measured at run
# time (``kernels.py``: VNNI's int8 runs several times FP32 on many x86 CPUs, AMX's BF16 beats it
# where present; int8 values are exact in BF16 and FP16, whose output rounding ``kernels.scan_margin``
# adds to this margin). For each query, every list whose int8 maximum is within this many standard deviations (of the
# difference of two rounding errors) of its best is re-scored in FP32 from a 16-bit copy (256x
# finer than int8, finer than FP16), so the winner is the FP32 winner unless a rounding error
# exceeds 6 sd or two candidates tie within the 16-bit copy's precision (~1e-5).
INT8_MARGIN_SIGMAS = 6.0
_INT32_MIN = np.iinfo(np.int32).min
_TABLE_ELEMENTS = 1 << 24  # (query, list) pairs searched at once: bounds the IVF's tables


def _int8_rows(rows: np.ndarray, scale: float | None = None) -> torch.Tensor:
    """Unit rows (overwritten) rounded to int8 at ``scale``, one for all rows (their products then
    compare across rows), or without it each row at its own largest scale (only comparisons
    within a row hold)."""
    t = torch.from_numpy(rows)
    t.mul_(scale if scale is not None else 127 / t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12))
    return t.round_().to(torch.int8)


def _lists_of(packed8: torch.Tensor, pos: np.ndarray, centroids8t: torch.Tensor, p: int, ordered: bool = True,
              kernel: str = "int8") -> np.ndarray:
    """The ``p`` lists whose centroids ([C, nlist], ``kernels.prepare_scan``) are most similar to
    the int8 rows at ``pos``, best first if ``ordered`` (the scan needs only the set: half the cost)."""
    step = max(1, neighbours.SCAN_BLOCK_ELEMENTS // max(centroids8t.shape))
    # Written into one array: small results kept between block-sized temporaries fragment the heap.
    out = np.empty((len(pos), p), dtype=np.int16 if centroids8t.shape[1] <= np.iinfo(np.int16).max else np.int32)
    for s in range(0, len(pos), step):
        scores = kernels.scan_product(kernel, packed8.index_select(0, torch.from_numpy(pos[s : s + step])), centroids8t)
        out[s : s + step] = scores.topk(p, dim=1, sorted=ordered).indices.numpy()
    return out


def _split16(rows: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows (overwritten) as 16-bit fixed point (``scale * 256`` per unit) in two int8 halves:
    ``high`` is the row rounded at ``scale`` (the scan's int8 copy), ``high * 256 + low`` the row
    to 1/256 of that step (for re-scoring: finer than FP16)."""
    fixed = torch.from_numpy(rows).mul_(scale * 256).round_()  # in place: ``rows`` is spent
    high = fixed.div(256).add_(0.5).floor_()  # so that low stays in [-128, 127]
    return high.to(torch.int8), fixed.sub_(high, alpha=256).to(torch.int8)


def _joined(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Unit FP32 rows from their two int8 halves."""
    rows = high.float().mul_(256).add_(low)
    return rows.div_(rows.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def _by_range(ranges: np.ndarray, n_ranges: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (flat indices of ``ranges``) grouped by range, and where each range's group starts."""
    by = torch.argsort(torch.from_numpy(ranges), stable=True).numpy()  # faster than numpy's stable sort
    return by, np.concatenate([[0], np.cumsum(np.bincount(ranges, minlength=n_ranges))])


def _range_blocks(bounds: np.ndarray, starts: np.ndarray):
    """For each range some pairs ask for: its packed positions ``lo, hi`` and the slices of its
    pairs (in ``_by_range`` order) whose products with its members fill one cache-sized block."""
    for r in np.flatnonzero(np.diff(starts)):
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        step = max(1, neighbours.SCAN_BLOCK_ELEMENTS // max(1, hi - lo))
        yield lo, hi, [slice(a, min(a + step, starts[r + 1])) for a in range(starts[r], starts[r + 1], step)]


def _exclude_self(sims: torch.Tensor, pos: np.ndarray, lo: int, hi: int, value) -> None:
    """Set each query's product with itself (packed positions ``pos``, ascending, the range's own
    members among them one run) to ``value``."""
    a, b = np.searchsorted(pos, [lo, hi])
    if b > a:
        sims[torch.arange(a, b), torch.from_numpy(pos[a:b] - lo)] = value


def _range_maxima(packed8: torch.Tensor, bounds: np.ndarray, query_pos: np.ndarray, ranges: np.ndarray,
                  kernel: str = "int8") -> np.ndarray:
    """Int8 maximum product of each query (packed positions ``query_pos``, ascending) over each of its
    ``ranges`` [Q, p] (packed positions ``bounds[r]:bounds[r+1]``), self excluded; the int32
    minimum where a range holds nothing else. A range is taken once, against all the queries
    that ask for it, as one product."""
    q, p = ranges.shape
    by, starts = _by_range(ranges.reshape(-1), len(bounds) - 1)
    pos_sorted = query_pos[by // p]
    found = np.full(q * p, _INT32_MIN, dtype=np.int32)  # stays where a range is empty
    for lo, hi, blocks in _range_blocks(bounds, starts):
        if hi == lo:
            continue
        members = kernels.prepare_scan(kernel, packed8[lo:hi].T.contiguous())
        for block in blocks:
            pos = pos_sorted[block]
            sims = kernels.scan_product(kernel, packed8.index_select(0, torch.from_numpy(pos)), members)
            _exclude_self(sims, pos, lo, hi, _INT32_MIN)
            # Float kernels' maxima are rounded to integers: ``kernels.scan_margin`` counts it.
            found[block] = sims.amax(dim=1).round().to(torch.int32).numpy()
    out = np.empty_like(found)
    out[by] = found
    return out.reshape(q, p)


def _rescore(packed8: torch.Tensor, low8: torch.Tensor, bounds: np.ndarray, query_pos: np.ndarray,
             pair_query: np.ndarray, pair_range: np.ndarray, best: np.ndarray, arg: np.ndarray) -> None:
    """FP32 products of the 16-bit rows (``_split16``) for the (query, range) pairs; ``best``/``arg``
    (packed positions) of the queries at ``query_pos`` (ascending) are updated in place, self excluded."""
    by, starts = _by_range(pair_range, len(bounds) - 1)
    q_sorted = pair_query[by]
    for lo, hi, blocks in _range_blocks(bounds, starts):
        if hi == lo:
            continue
        members = _joined(packed8[lo:hi], low8[lo:hi]).T
        for block in blocks:
            sub = q_sorted[block]  # each query once per range
            pos = query_pos[sub]
            at = torch.from_numpy(pos)
            sims = _joined(packed8.index_select(0, at), low8.index_select(0, at)) @ members
            _exclude_self(sims, pos, lo, hi, -torch.inf)
            val, top = (t.numpy() for t in sims.max(dim=1))
            better = val > best[sub]
            best[sub[better]] = val[better]
            arg[sub[better]] = top[better] + lo


def _best_in_ranges(packed8: torch.Tensor, low8: torch.Tensor, scale: float, bounds: np.ndarray,
                    query_pos: np.ndarray, ranges: np.ndarray, kernel: str = "int8") -> tuple[np.ndarray, np.ndarray]:
    """First neighbour (packed position, FP32 similarity; -1 / -inf if none) of each query at
    ``query_pos`` (ascending) among the members of its ``ranges`` [Q, p]: int8 products find the ranges that
    can hold it, which are then re-scored in FP32 (``INT8_MARGIN_SIGMAS``)."""
    if np.any(np.diff(query_pos) <= 0):  # _exclude_self relies on it
        raise ValueError("query positions must be strictly ascending")
    approx = _range_maxima(packed8, bounds, query_pos, ranges, kernel)
    # A product of two unit vectors rounded at ``scale`` is off by sd sqrt(1/6)/scale (cosine
    # units); the difference of two such errors, in int8 product units: sqrt(1/3) * scale.
    margin = int(math.ceil(INT8_MARGIN_SIGMAS * math.sqrt(1 / 3) * scale)) + kernels.scan_margin(kernel, scale)
    pair_query, pair_j = np.nonzero(approx >= approx.max(axis=1, keepdims=True).astype(np.int64) - margin)
    best = np.full(len(query_pos), -np.inf, dtype=np.float32)
    arg = np.full(len(query_pos), -1, dtype=np.int64)
    _rescore(packed8, low8, bounds, query_pos, pair_query, ranges[pair_query, pair_j], best, arg)
    return arg, best


def approx_first_neighbours(
    x: np.ndarray, nprobe: int | None = None, nlist: int | None = None, seed: int = 0,
    target: float = RECALL_TARGET, *, kernel: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """First neighbours by an inverted-file (IVF) search run as dense int8 products.

    Spherical k-means (``spherical_kmeans``) cuts the unit vectors into ``nlist`` lists; each point is compared
    with the members of the ``nprobe`` lists whose centroids are most similar to it, as a
    standard IVF does, but list by list as one int8 matrix product with all the queries that
    probe that list; the lists within the int8 error of a query's best are re-scored in FP32 from
    a 16-bit copy, so the neighbour found is the FP32 best of the probed lists (finch.md). A found
    pair (y, x) is then also x's candidate (``_take_reverse_links``). Without ``nprobe`` it is
    calibrated: up to ``RECALL_PROBES`` sampled points get the same search over all lists, and
    nprobe is the smallest at which that exact neighbour is found, directly or through the
    reverse link, for a ``target`` share of them at 95 % one-sided confidence (0.9926 on 4,000
    probes for 0.99).
    If that needs more than ``MAX_PROBE_SHARE`` of the lists, every list is scanned (an exhaustive
    search, nprobe = nlist) up to ``EXHAUSTIVE_LIMIT`` points; above, the nprobe that
    ``IVF_SCAN_OPS`` (times ``_budget_scale``) allows is kept and its recall reported. The products run in the fastest kernel measured (``kernels.choose``) or in
    ``kernel`` if given. Also returns ``{"nlist", "nprobe", "recall", "kernel"}``.
    """
    n, dim = x.shape
    choice = kernels.choose(dim, force=kernel)
    nlist = nlist or max(1, min(n // IVF_TRAIN_PER_LIST, int(round(IVF_LISTS_PER_ROOT * math.sqrt(n)))))
    rng = np.random.default_rng(seed)
    index = _build_index(x, nlist=nlist, rng=rng, kernel=choice.name)
    budget = _budget_scale(choice)
    per_list = n / nlist
    cap = max(1, min(int(MAX_PROBE_SHARE * nlist), int(IVF_SCAN_OPS * budget / (2 * n * per_list * dim))))
    depth = min(nlist, max(cap, nprobe or 1))
    estimate = None
    if nprobe is None:
        nprobe, estimate = _calibrate_nprobe(index, dim=dim, depth=depth, budget=budget, target=target, rng=rng)
    nprobe = min(nprobe, nlist)  # below nlist, within the ranked depth
    idx, best = _scan_all(index, nprobe=nprobe)
    missing = np.flatnonzero(idx < 0)  # alone in every probed list
    if len(missing):
        idx[missing], best[missing] = exact_for_some(x, missing)
    _take_reverse_links(idx, best)
    return idx, best, {"nlist": nlist, "nprobe": nprobe, "recall": estimate, "kernel": choice.record()}


@dataclass
class _Index:
    """The IVF's lists: rows packed in list order as two int8 halves (``_split16``), the int8
    centroids prepared for the scan kernel, and the maps between rows and packed positions."""

    packed8: torch.Tensor  # [N, C] high halves in list order: the scan's int8 copy
    low8: torch.Tensor  # [N, C] low halves, for the FP32 re-scoring
    scale: float  # int8 units per unit of a coordinate
    bounds: np.ndarray  # [nlist + 1] packed positions where each list starts
    order: np.ndarray  # packed position -> row
    where: np.ndarray  # row -> packed position
    home: np.ndarray  # row -> its list
    centroids8t: torch.Tensor  # [C, nlist], ``kernels.prepare_scan``
    nlist: int
    kernel: str

    def search(self, rows: np.ndarray, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_best_in_ranges`` for ``rows`` (in list order) over their ``lists`` [Q, p]."""
        return _best_in_ranges(self.packed8, self.low8, self.scale, self.bounds, self.where[rows], lists, self.kernel)

    def lists_of(self, rows: np.ndarray, p: int, ordered: bool = True) -> np.ndarray:
        """The ``p`` lists nearest each of ``rows``, ranked from the int8 rows (the same way for
        the calibration and the scan)."""
        return _lists_of(self.packed8, self.where[rows], self.centroids8t, p, ordered, self.kernel)

    def every_list(self, count: int) -> np.ndarray:
        """All lists, for each of ``count`` queries (an exhaustive search)."""
        return np.tile(np.arange(self.nlist, dtype=np.int16 if self.nlist < 2**15 else np.int32), (count, 1))


def _build_index(x: np.ndarray, *, nlist: int, rng: np.random.Generator, kernel: str) -> _Index:
    """Train ``nlist`` centroids on a sample of ``x``, assign every row its home list and pack
    the rows in list order (``_Index``)."""
    n, dim = x.shape
    train = unit_sample(x, np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_LIST * nlist), replace=False)))
    centroids = spherical_kmeans(train, nlist, IVF_KMEANS_ITERATIONS, rng)
    del train
    # Transposed once: a transposed view as the second operand costs a copy per product.
    centroids8t = kernels.prepare_scan(kernel, _int8_rows(centroids, 127 / max(float(np.abs(centroids).max()), 1e-12)).T.contiguous())
    step = chunk_rows(x)
    # One pass finds each row's home list and the largest coordinate, which sets the int8 scale.
    home, peak = np.empty(n, dtype=np.int64), 1e-12
    for s in range(0, n, step):
        rows = unit_rows(x, s, s + step)
        peak = max(peak, float(np.abs(rows).max()))
        home[s : s + step] = kernels.scan_product(kernel, _int8_rows(rows), centroids8t).argmax(dim=1).numpy()
    order = np.argsort(home, kind="stable")  # packed position -> row
    bounds = np.searchsorted(home[order], np.arange(nlist + 1))
    where = np.empty(n, dtype=np.int64)  # row -> packed position
    where[order] = np.arange(n)
    scale = 127 / peak
    # The data in list order as 16-bit fixed point in two int8 halves (together the size of FP16):
    # the high half alone is the scan's int8 copy, both re-score. In memory, since rows of a
    # memmap read out of order map whole runs of pages around each row.
    packed8 = torch.empty((n, dim), dtype=torch.int8)
    low8 = torch.empty((n, dim), dtype=torch.int8)
    for s in range(0, n, step):
        at = torch.from_numpy(where[s : s + step])
        packed8[at], low8[at] = _split16(unit_rows(x, s, s + step), scale)
    return _Index(packed8, low8, scale, bounds, order, where, home, centroids8t, nlist, kernel)


def _calibrate_nprobe(index: _Index, *, dim: int, depth: int, budget: float, target: float,
                      rng: np.random.Generator) -> tuple[int, float]:
    """The smallest nprobe whose first-neighbour recall on sampled probes reaches ``target`` at
    95 % one-sided confidence (``approx_first_neighbours``), and that recall estimate."""
    n, nlist, order, where, home = len(index.order), index.nlist, index.order, index.where, index.home
    # A probe is found at depth p when the home list of its exact first neighbour is among
    # its first p lists (another, equally similar neighbour elsewhere would only help), so one
    # exact search of the probes gives the recall at every nprobe without scanning.
    count = int(min(n, RECALL_PROBES, max(RECALL_PROBES_MIN, RECALL_OPS * budget / (2 * n * dim))))
    probes = order[np.sort(where[rng.choice(n, size=count, replace=False)])]  # in list order
    exact_pos, _ = index.search(probes, index.every_list(count))
    hit_rank = _hit_ranks(index.lists_of(probes, depth), home[order[exact_pos]])
    needed = min(1.0, target + RECALL_Z * math.sqrt(target * (1 - target) / count))
    # The reverse repair (``_take_reverse_links``) also finds a probe whose exact neighbour y
    # has the probe as its own exact neighbour, at the depth where y's lists reach the
    # probe's. Counted for the probes found directly only after the depth where the direct
    # recall is REPAIR_CHECK_SHARE short of what is needed (few: one more exact search each;
    # at most all probes not in their first list). For the others the direct rank stands,
    # so the estimate never exceeds the repaired recall and equals it beyond that depth.
    direct_at = np.cumsum(np.bincount(hit_rank, minlength=depth + 1))[:depth] / count
    early = np.flatnonzero(direct_at >= needed - REPAIR_CHECK_SHARE)  # [p - 1]
    late = np.flatnonzero(hit_rank > (int(early[0]) if len(early) else 0))
    if len(late):
        y_pos, y_of_late = np.unique(exact_pos[late], return_inverse=True)
        y_exact, _ = index.search(order[y_pos], index.every_list(len(y_pos)))
        mutual = y_exact[y_of_late] == where[probes[late]]
        y_rank = _hit_ranks(index.lists_of(order[y_pos], depth)[y_of_late], home[probes[late]])
        hit_rank[late] = np.where(mutual, np.minimum(hit_rank[late], y_rank), hit_rank[late])
    recall_at = np.cumsum(np.bincount(hit_rank, minlength=depth + 1))[:depth] / count  # [p-1]
    reached = np.flatnonzero(recall_at >= needed)
    if len(reached):
        nprobe = int(reached[0]) + 1
    elif n <= EXHAUSTIVE_LIMIT:
        nprobe = nlist
    else:
        nprobe = depth
    return nprobe, float(recall_at[nprobe - 1]) if nprobe <= depth else 1.0


def _scan_all(index: _Index, *, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's first neighbour (row, -1 if none) and similarity among its ``nprobe`` lists."""
    n = len(index.order)
    idx = np.empty(n, dtype=np.int64)
    best = np.empty(n, dtype=np.float32)
    per_chunk = max(1, _TABLE_ELEMENTS // nprobe)
    for s in range(0, n, per_chunk):  # bounded [rows, nprobe] tables
        rows = index.order[s : s + per_chunk]  # in list order, as the searches need
        lists = index.every_list(len(rows)) if nprobe == index.nlist else index.lists_of(rows, nprobe, False)
        found, best[rows] = index.search(rows, lists)
        idx[rows] = np.where(found >= 0, index.order[found], -1)
    return idx, best


def _budget_scale(choice: kernels.KernelChoice) -> float:
    """How many times the int8 operations the budgets count the chosen kernel runs in the same
    time (measured side by side; never below 1: a CPU without fast int8 keeps the old budget)."""
    int8 = choice.rates.get("int8", 0.0)
    return max(1.0, choice.rates.get(choice.name, 0.0) / int8) if int8 > 0 else 1.0


def _hit_ranks(ranked_lists: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where ``wanted[i]`` stands in row i of ``ranked_lists`` [Q, depth]; ``depth`` if absent."""
    here = ranked_lists == wanted[:, None]
    return np.where(here.any(axis=1), here.argmax(axis=1), ranked_lists.shape[1])


def _take_reverse_links(idx: np.ndarray, best: np.ndarray) -> None:
    """Every found pair (y, idx[y]) is also a candidate for idx[y], at the known similarity
    best[y]: where it beats that point's own find, take it (in place). Free, and it recovers the
    mutual first neighbours that only one side's probed lists reached (finch.md)."""
    val = torch.from_numpy(best)
    reverse = torch.full_like(val, -torch.inf).scatter_reduce_(0, torch.from_numpy(idx), val, "amax").numpy()
    improved = reverse > best
    if improved.any():
        # The y whose pair gives each improved point its reverse maximum (any one of ties).
        ys = np.flatnonzero(improved[idx] & (best == reverse[idx]))
        idx[idx[ys]] = ys
        best[improved] = reverse[improved]


def spherical_kmeans(unit: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Spherical k-means (Lloyd's iterations on the unit sphere, assignment by cosine) of unit rows:
    ``k`` unit centroids [k, C], started from ``k`` distinct rows drawn with ``rng``; a centroid
    left without rows keeps its place. The same objective as faiss's ``Kmeans(spherical=True)``
    (mean best cosine 0.99715 vs 0.99716 on held-out features), faster because each iteration
    is one FP32 product at full BLAS speed (finch.md)."""
    points = torch.from_numpy(unit)
    if k > len(points):
        raise ValueError(f"{k} centroids need at least as many rows, got {len(points)}")
    centroids = points[torch.from_numpy(np.sort(rng.choice(len(points), size=k, replace=False)))].clone()
    for _ in range(iterations):
        nearest = torch.empty(len(points), dtype=torch.int64)
        step = max(1, neighbours.BLOCK_ELEMENTS // k)
        for s in range(0, len(points), step):  # bounded [rows, k] similarity blocks
            nearest[s : s + step] = (points[s : s + step] @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        filled = torch.bincount(nearest, minlength=k) > 0
        centroids[filled] = sums[filled]
        centroids.div_(centroids.norm(dim=1, keepdim=True).clamp_min_(1e-12))
    return centroids.numpy()
