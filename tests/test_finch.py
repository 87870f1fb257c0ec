"""FINCH: equality with finch-clust on exact inputs, the GPU path's logic on a CPU, the IVF path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from protoad_export.errors import InputError
from protoad_export.clustering import finch as finch_module
from protoad_export.clustering import ivf
from protoad_export.clustering.finch import cluster_means, finch, first_neighbours
from protoad_export.clustering.ivf import approx_first_neighbours, spherical_kmeans
from protoad_export.clustering.neighbours import RECHECK_CANDIDATES, block_first_neighbours, exact_first_neighbours



@pytest.fixture(scope="module")
def finch_clust():
    """The reference package, for the tests that compare with it (the others run without it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finch-clust warns at import when pynndescent is missing
        return pytest.importorskip("finch")


def clustered(n: int, dim: int = 32, centres: int = 60, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: continuous values, so no exact ties between distances."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n, dim, seed", [(3000, 32, 0), (6000, 176, 1)])
def test_equals_finch_clust_on_exact_inputs(finch_clust, n, dim, seed):
    x = clustered(n, dim, seed=seed)
    ours = finch(x, method="exact", keep_levels=True)
    labels, sizes, _ = finch_clust.FINCH(x, verbose=False)  # exact below its 20k ann_threshold
    assert ours.partition_sizes == list(sizes)
    for level, lab in enumerate(ours.levels):
        np.testing.assert_array_equal(lab, labels[:, level])
    # The chosen partition's means are the means over the original points.
    np.testing.assert_allclose(ours.means, cluster_means(x, ours.labels, ours.n_clusters), atol=1e-6)


def test_stop_below_picks_first_partition_under_the_limit():
    x = clustered(3000)
    full = finch(x, method="exact")
    limit = full.partition_sizes[1]  # not below: must go one level further
    r = finch(x, stop_below=limit, method="exact")
    assert r.partition_sizes == full.partition_sizes[:3]
    assert r.n_clusters < limit
    with pytest.raises(InputError):
        finch(x, stop_below=1)


def test_ensure_early_exit_is_a_no_op(finch_clust):
    """finch-clust zeroes 'too far' first-neighbour links with explicit zeros, which csgraph still
    counts as edges: its ensure_early_exit never changes a partition."""
    a = sp.csr_matrix((np.ones(4, np.float32), ([0, 1, 2, 3], [1, 0, 3, 2])), shape=(4, 4))
    dist = np.full((4, 4), 0.9, np.float32)
    labels_before = finch_clust.finch.get_clust(a.copy(), dist, min_sim=None)
    labels_after = finch_clust.finch.get_clust(a.copy(), dist, min_sim=0.1)  # every link 'too far'
    assert labels_before[1] == labels_after[1] == 2
    x = clustered(2000, seed=3)
    with_exit = finch_clust.FINCH(x, ensure_early_exit=True, verbose=False)
    without = finch_clust.FINCH(x, ensure_early_exit=False, verbose=False)
    assert list(with_exit[1]) == list(without[1])
    np.testing.assert_array_equal(with_exit[0], without[0])


def test_cpu_tiles_equal_one_big_product_ties_included(monkeypatch):
    """The CPU path's cache-sized tiles (indices only for rows that improve) give what one N x N
    product and a row argmax give, including exact ties across tiles (first index wins)."""
    from protoad_export.clustering import neighbours

    monkeypatch.setattr(neighbours, "_CPU_TILE_ROWS", 700)  # several row tiles and column blocks
    monkeypatch.setattr(neighbours, "SCAN_BLOCK_ELEMENTS", 700 * 300)
    x = clustered(2500, 24, seed=3)
    x[1900] = x[10]  # duplicates: each other's neighbour at similarity 1, in different tiles
    x[2400] = x[10]
    idx, sim = exact_first_neighbours(x)
    s = torch.from_numpy(x) @ torch.from_numpy(x).T
    s.fill_diagonal_(-torch.inf)
    val, top = s.max(dim=1)
    np.testing.assert_array_equal(idx, top.numpy())
    np.testing.assert_allclose(sim, val.numpy(), atol=1e-6)
    assert (idx[10], idx[1900], idx[2400]) == (1900, 10, 10)


def test_fp16_products_with_fp32_recheck_on_cpu():
    """The CUDA path (FP16 products, FP32 re-check) run on CPU tensors gives the exact winners."""
    x = clustered(2000, dim=64, noise=0.05, seed=4)
    exact_idx, exact_sim = exact_first_neighbours(x, low_precision=None)
    idx, sim = exact_first_neighbours(x, low_precision=torch.float16, block_elements=1 << 18)
    np.testing.assert_array_equal(idx, exact_idx)
    np.testing.assert_allclose(sim, exact_sim, atol=1e-6)
    # Without the re-check, FP16 rounding alone does pick wrong winners on such tight clusters.
    base = torch.from_numpy(x)
    s = (base.half() @ base.half().T).float()
    s.fill_diagonal_(-torch.inf)
    assert (s.argmax(dim=1).numpy() != exact_idx).any()


def test_recheck_fixes_a_near_tie_fp16_cannot_separate():
    rng = np.random.default_rng(5)
    q = rng.normal(size=64)
    q /= np.linalg.norm(q)
    # Neighbours at cos 0.99990 and 0.99995: one FP16 step (4.9e-4) apart is far more than that.
    rows = [q]
    for cos in (0.99990, 0.99995, 0.99980):
        d = rng.normal(size=64)
        d -= d @ q * q
        d /= np.linalg.norm(d)
        rows.append(cos * q + np.sqrt(1 - cos**2) * d)
    base = torch.tensor(np.array(rows), dtype=torch.float32)
    top, val = block_first_neighbours(base[:1], base, 0, torch.float16)
    assert int(top[0]) == 2 and abs(float(val[0]) - 0.99995) < 1e-6
    assert RECHECK_CANDIDATES >= 2


@pytest.mark.parametrize("centres, noise, seed", [(200, 0.2, 6), (100, 1.0, 12)])
def test_ivf_calibrates_nprobe_to_the_recall_target(centres, noise, seed):
    # Tight clusters (one list is enough) and loose ones (a dozen lists, and the calibration
    # counts the reverse links for the probes found late).
    x = clustered(12_000, dim=32, centres=centres, noise=noise, seed=seed)
    for data in (x, x.astype(np.float16)):
        unit = data.astype(np.float32)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        _, best = exact_first_neighbours(unit)
        idx, sim, info = approx_first_neighbours(data, target=0.99)
        assert (idx != np.arange(len(x))).all() and (idx >= 0).all()
        recall = np.mean(np.einsum("ij,ij->i", unit, unit[idx]) >= best - 1e-6)
        # The estimate must clear the target with its 95 % margin, and the whole run reach it.
        assert info["recall"] >= 0.99 + 1.645 * np.sqrt(0.99 * 0.01 / 4000) - 1e-9, info
        assert recall >= 0.99, (info, recall)
        assert info["nprobe"] <= info["nlist"] / 4
        # The estimate (exact neighbour's home list among the probed lists, no scan) predicts the
        # scan's recall: within 3 standard errors, and the calibrated run is the run at that nprobe.
        assert abs(recall - info["recall"]) < 3 * np.sqrt(0.99 * 0.01 / 4000) + 1e-3, (info, recall)
        fixed, _, _ = approx_first_neighbours(data, nprobe=info["nprobe"])
        assert (fixed == idx).all()


def assert_fp32_winners(x: np.ndarray, idx: np.ndarray, sim: np.ndarray) -> None:
    """Each found neighbour is the exact one, or as similar within the re-scoring's precision:
    16-bit fixed point (1/256 of the int8 step), products off by sd sqrt(1/6) / (256 * scale)."""
    exact_idx, exact_sim = exact_first_neighbours(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    tol = 12 * np.sqrt(1 / 6) / (256 * 127 / np.abs(unit).max())
    found = np.einsum("ij,ij->i", unit, unit[idx])
    assert (idx != np.arange(len(x))).all()
    assert (found >= exact_sim - tol).all() and np.abs(sim - found).max() < tol
    assert np.mean(idx == exact_idx) > 0.99  # and different points only in near ties


def test_ivf_scans_every_list_when_recall_needs_most_lists(monkeypatch):
    x = np.random.default_rng(8).normal(size=(3000, 64)).astype(np.float32)  # no structure at all
    idx, sim, info = approx_first_neighbours(x)
    assert info["nprobe"] == info["nlist"] and info["recall"] == 1.0
    assert_fp32_winners(x, idx, sim)
    monkeypatch.setattr(finch_module, "EXACT_CPU_LIMIT", 100)
    assert first_neighbours(x)[2].startswith(f"ivf {info['nlist']}/{info['nlist']} recall~1.000")
    # Above the exhaustive limit the IVF keeps the deepest nprobe it ranked and reports its recall.
    monkeypatch.setattr(ivf, "EXHAUSTIVE_LIMIT", 100)
    _, _, capped = approx_first_neighbours(x)
    assert capped["nprobe"] == int(capped["nlist"] * ivf.MAX_PROBE_SHARE) and capped["recall"] < 0.99


def test_int8_products_with_fp32_rescore_find_the_fp32_winner():
    """Neighbours closer than the int8 rounding error: int8 products alone pick another point for
    many queries; with the lists inside the margin re-scored in FP32, every winner is exact."""
    x = clustered(4000, dim=64, centres=400, noise=0.02, seed=11)
    exact_idx, _ = exact_first_neighbours(x)
    idx, sim, info = approx_first_neighbours(x, nprobe=10**6)  # every list: only rounding can err
    assert info["nprobe"] == info["nlist"] > 1
    assert_fp32_winners(x, idx, sim)
    scale = 127 / np.abs(x).max()
    q = np.round(x * scale).astype(np.int32)
    approx = q @ q.T
    np.fill_diagonal(approx, np.iinfo(np.int32).min)
    assert np.mean(approx.argmax(axis=1) != exact_idx) > 0.1  # the test's premise
    # The margin's error model: a product of unit vectors rounded at `scale` is off by sd
    # sqrt(1/6) / scale; the largest of the 8M errors stays under 3/4 of the margin (5.2 sd).
    margin = ivf.INT8_MARGIN_SIGMAS * np.sqrt(1 / 3) / scale
    err = approx[np.triu_indices(len(x), 1)] / scale**2 - (x @ x.T)[np.triu_indices(len(x), 1)]
    assert abs(err.std() * scale / np.sqrt(1 / 6) - 1) < 0.1
    assert np.abs(err).max() < margin * 0.75
    # What the re-scoring relies on: every exact neighbour's int8 product is within the margin of
    # the best int8 product of its query.
    rows = np.arange(len(x))
    assert (approx[rows, exact_idx] >= approx.max(axis=1) - margin * scale**2).all()


def test_reverse_links_repair_what_one_side_missed():
    # 0 found 2 (0.5), but 1 found 0 at 0.9: the pair (1, 0) is the better find for 0. 3 found 1
    # at 0.95, better than 1's own 0.9; 2's find stands (0.8 beats the 0.5 of 0 -> 2).
    idx = np.array([2, 0, 1, 1])
    best = np.array([0.5, 0.9, 0.8, 0.95], dtype=np.float32)
    ivf._take_reverse_links(idx, best)
    assert idx.tolist() == [1, 3, 1, 1] and best.tolist() == pytest.approx([0.9, 0.95, 0.8, 0.95])


def test_reverse_links_only_improve_and_stay_true_products(monkeypatch):
    """Three lists probed per point miss many neighbours (loose clusters); the repair takes each
    point's better reverse find, never a worse one, and each reported similarity is the pair's
    product."""
    x = clustered(3000, dim=32, centres=100, noise=1.0, seed=12)
    direct_idx, direct_best, _ = approx_first_neighbours(x, nprobe=3)
    monkeypatch.setattr(ivf, "_take_reverse_links", lambda idx, best: None)
    plain_idx, plain_best, _ = approx_first_neighbours(x, nprobe=3)
    exact_idx, exact_best = exact_first_neighbours(x)
    assert (direct_best >= plain_best).all() and (direct_best > plain_best).sum() > 10
    np.testing.assert_allclose(np.einsum("ij,ij->i", x, x[direct_idx]), direct_best, atol=1e-3)
    assert (direct_idx != np.arange(len(x))).all()
    assert np.mean(direct_idx == exact_idx) > np.mean(plain_idx == exact_idx)


def test_gpu_without_memory_for_exact_search_falls_back_to_the_cpu(monkeypatch):
    """Exact GPU search holds every row there; where they do not fit, ``auto`` chooses as on a CPU
    (and says why in the method string the manifest keeps) instead of dying of CUDA out-of-memory,
    and ``exact`` stops at once with one line. No GPU is touched: only the free-memory query."""
    monkeypatch.setattr(finch_module, "_gpu_free_bytes", lambda device: 2**30)  # 1 GiB free
    monkeypatch.setattr(finch_module, "exact_gpu_bytes", lambda n, dim: n * 2**20)  # 1 MiB a row
    small, large = clustered(3000, dim=32), clustered(25_000, dim=32, centres=300, seed=2)
    # Small: exact search on the CPU, as ``auto`` does there up to EXACT_CPU_LIMIT rows.
    idx, sim, how = first_neighbours(small, "auto", device="cuda")
    assert how == "exact (on the CPU: exact GPU search needs 2.9 GiB, 1.0 GiB free)"
    np.testing.assert_array_equal(idx, exact_first_neighbours(small)[0])
    idx, sim, how = first_neighbours(large, "auto", device="cuda")
    assert how.startswith("ivf ") and how.endswith("(on the CPU: exact GPU search needs 24.4 GiB, 1.0 GiB free)")
    assert (idx != np.arange(len(large))).all()
    with pytest.raises(InputError, match=r"^exact first neighbours of 25,000 x 32 features need 24.4 GiB of GPU memory, "
                                         r"1.0 GiB is free: use --neighbours auto"):
        first_neighbours(large, "exact", device="cuda")
    # The build's memory plan asks the same question before extracting any feature.
    assert not finch_module.searches_on_cpu(500, 32, "auto", "cuda")  # 500 MiB of 1 GiB free
    assert finch_module.searches_on_cpu(25_000, 32, "auto", "cuda")
    assert not finch_module.searches_on_cpu(25_000, 32, "exact", "cuda")  # exact then stops, as above
    assert finch_module.searches_on_cpu(3000, 32, "approx", "cuda") and finch_module.searches_on_cpu(3000, 32, "auto", "cpu")


def test_ivf_never_returns_self_or_missing():
    # Duplicated points and tiny lists: the fallback exact search fills any point left alone.
    x = np.repeat(clustered(500, dim=16, seed=7), 2, axis=0)
    idx, _, info = approx_first_neighbours(x, nprobe=1, nlist=40)
    assert info["recall"] is None
    assert (idx != np.arange(len(x))).all() and (idx >= 0).all()


def test_auto_method_and_errors():
    x = clustered(100)
    assert first_neighbours(x)[2] == "exact"
    with pytest.raises(InputError):
        first_neighbours(x, method="nope")
    with pytest.raises(InputError):
        first_neighbours(x[:1])


def test_as_float32_converts_fp16_exactly_and_copies():
    from protoad_export.clustering.neighbours import as_float32

    bits = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)  # every FP16 value
    for source in (bits, np.ascontiguousarray(bits[:, ::2]), bits.astype(np.float32)):
        got = as_float32(source)
        assert got.dtype == np.float32 and not np.shares_memory(got, source)
        want = source.astype(np.float32)
        assert np.array_equal(got, want, equal_nan=True) and np.array_equal(np.signbit(got), np.signbit(want))


def test_spherical_kmeans_finds_the_centres():

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(8, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = clustered(4000, dim=32, centres=8, noise=0.05, seed=3)  # the same centres (same seed)
    # Three centroids per centre, as the IVF has many lists per mode: from these random starts
    # every centre gets one (with exactly one per centre, Lloyd's iterations can merge two).
    got = spherical_kmeans(x.copy(), 24, 8, np.random.default_rng(0))
    assert got.shape == (24, 32) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert ((centres @ got.T).max(axis=1) > 0.99).all()  # each centre found
    assert np.array_equal(got, spherical_kmeans(x.copy(), 24, 8, np.random.default_rng(0)))  # seeded
    with pytest.raises(ValueError):
        spherical_kmeans(x[:5].copy(), 8, 1, np.random.default_rng(0))
