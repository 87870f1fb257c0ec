"""The product kernels chosen at run time (``kernels.py``): timing cached once per process, forced
choices, error bounds whose FP32 re-scoring keeps every FP32 winner, and the record in the manifest."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from protoad_export.clustering import finch as finch_module, ivf, kernels
from protoad_export.errors import InputError
from protoad_export.clustering.neighbours import nearest_similarity
from protoad_export.clustering.neighbours import exact_first_neighbours
from tests.test_finch import clustered


@pytest.fixture(autouse=True)
def _no_forced_kernel(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)


def tie_free(n: int, dim: int, seed: int, gap: float = 1e-4) -> np.ndarray:
    """Unit rows in loose clusters whose first and second neighbours differ by more than ``gap``
    for every row (the premise of "the same partitions": no near tie for rounding to break)."""
    x = clustered(n, dim=dim, centres=n // 20, noise=0.5, seed=seed)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    top2 = np.sort(s, axis=1)[:, -2:]
    keep = top2[:, 1] - top2[:, 0] > gap
    return np.ascontiguousarray(x[keep])


def test_importing_kernels_needs_no_torch():
    code = "import sys; import protoad_export.clustering.kernels; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_choice_is_measured_once_per_process_and_width(monkeypatch):
    kernels.clear_cache()
    calls = []
    real = kernels.measure_rates

    def counting(dim, **kw):
        calls.append((dim, kw.get("family")))
        return real(dim, **kw)

    monkeypatch.setattr(kernels, "measure_rates", counting)
    first = kernels.choose(64)
    assert kernels.choose(64) is first and len(calls) == 1
    assert set(first.rates) == set(kernels.KERNELS) and all(r > 0 for r in first.rates.values())
    assert first.name in kernels.KERNELS and not first.forced
    kernels.choose(64, family="dense")
    kernels.choose(32)
    assert calls == [(64, "scan"), (64, "dense"), (32, "scan")]
    # Forcing reuses the measured rates (the manifest records them beside the forced kernel).
    forced = kernels.choose(64, force="bf16")
    assert forced.name == "bf16" and forced.forced and forced.rates == first.rates and len(calls) == 3
    monkeypatch.setenv(kernels.KERNEL_ENV, "FP16")
    assert kernels.choose(64).name == "fp16" and len(calls) == 3
    # int8 has no dense form: forcing it there runs FP32.
    monkeypatch.setenv(kernels.KERNEL_ENV, "int8")
    assert kernels.choose(64, family="dense").name == "fp32"


def test_the_fastest_kernel_wins_only_by_a_clear_margin():
    assert kernels._fastest({"fp32": 100, "bf16": 105, "int8": 300, "fp16": 1}, "scan") == "int8"
    assert kernels._fastest({"fp32": 100, "bf16": 500, "int8": 300, "fp16": 1}, "scan") == "bf16"
    assert kernels._fastest({"fp32": 100, "bf16": 105, "int8": 90, "fp16": 1}, "scan") == "fp32"
    # Dense products pay conversions and re-scoring of many candidates: 3x FP32 is not enough there.
    assert kernels._fastest({"fp32": 100, "bf16": 300, "fp16": 1}, "dense") == "fp32"
    assert kernels._fastest({"fp32": 100, "bf16": 900, "fp16": 1}, "dense") == "bf16"


def test_an_unknown_kernel_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, "fp8")
    with pytest.raises(InputError, match="unknown product kernel 'fp8'"):
        kernels.choose(64)


@pytest.mark.parametrize("kernel", ["bf16", "fp16"])
def test_dense_error_bound_holds_and_rescoring_keeps_every_fp32_winner(kernel):
    """On a sample of tight clusters, every low-precision product of unit rows is within
    ``dense_error`` of FP32, the low-precision argmax alone picks other points (the premise), and
    search with re-scoring returns the FP32 winner of every row."""
    x = clustered(3000, dim=176, centres=300, noise=0.03, seed=21)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = torch.from_numpy(x)
    exact = t @ t.T
    low = t.to(kernels.dense_dtype(kernel))
    approx = (low @ low.T).float()
    err = kernels.dense_error(kernel, 176)
    assert (approx - exact).abs().max() <= err
    exact.fill_diagonal_(-torch.inf)
    approx.fill_diagonal_(-torch.inf)
    winners = exact.argmax(dim=1)
    if kernel == "bf16":
        assert (approx.argmax(dim=1) != winners).float().mean() > 0.05  # BF16 alone errs
    # The re-scoring's rule keeps every exact winner among the candidates.
    rows = torch.arange(len(x))
    assert (approx[rows, winners] >= approx.amax(dim=1) - 2 * err).all()
    ref_idx, ref_sim = exact_first_neighbours(x, kernel="fp32")
    idx, sim = exact_first_neighbours(x, kernel=kernel)
    np.testing.assert_array_equal(np.einsum("ij,ij->i", x, x[idx]) >= ref_sim - 1e-6, True)
    np.testing.assert_allclose(sim, ref_sim, atol=1e-6)
    q, bank = torch.from_numpy(x[:500]), torch.from_numpy(x[500:])
    np.testing.assert_allclose(nearest_similarity(q, bank, kernel=kernel).numpy(),
                               nearest_similarity(q, bank, kernel="fp32").numpy(), atol=1e-6)


@pytest.mark.parametrize("kernel", ["bf16", "fp16", "fp32"])
def test_scan_margin_covers_the_output_rounding_of_int8_valued_products(kernel):
    """The IVF's rows are int8 integers, exact in BF16/FP16: their products differ from int8's
    only by the output rounding, which ``scan_margin`` bounds (one side: half of it)."""
    x = clustered(2000, dim=176, centres=200, noise=0.03, seed=22)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scale = 127 / np.abs(x).max()
    q8 = torch.from_numpy(np.round(x * scale).astype(np.int8))
    exact = torch._int_mm(q8, q8.T.contiguous()).double()
    got = kernels.scan_product(kernel, q8, kernels.prepare_scan(kernel, q8.T.contiguous())).double()
    assert (got - exact).abs().max() <= kernels.scan_margin(kernel, scale) / 2
    if kernel == "bf16":
        assert (got - exact).abs().max() > 0  # the premise: BF16's output is rounded


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_ivf_with_every_kernel_keeps_the_fp32_winners(kernel):
    """Every list scanned, so only rounding can err: with each forced kernel the IVF finds the
    same neighbours as with int8 and as exact FP32 search (the re-scoring covers each kernel's
    error), on data whose neighbours are closer than the int8 rounding error."""
    x = clustered(4000, dim=64, centres=400, noise=0.02, seed=11)
    ref, _, _ = ivf.approx_first_neighbours(x, nprobe=10**6, kernel="int8")
    idx, sim, info = ivf.approx_first_neighbours(x, nprobe=10**6, kernel=kernel)
    assert info["kernel"]["kernel"] == kernel and info["kernel"]["forced"]
    np.testing.assert_array_equal(idx, ref)
    exact_idx, exact_sim = exact_first_neighbours(x, kernel="fp32")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    found = np.einsum("ij,ij->i", unit, unit[idx])
    assert (found >= exact_sim - 2e-4).all() and np.mean(idx == exact_idx) > 0.99


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_a_forced_kernel_gives_the_fp32_partitions_on_tie_free_data(kernel, monkeypatch):
    x = tie_free(3000, 48, seed=23)
    assert len(x) > 2500
    # Exact search (levels up to EXACT_CPU_LIMIT) and the IVF (level 0 above a lowered limit).
    for limit in (10**9, 1000):
        monkeypatch.setattr(finch_module, "EXACT_CPU_LIMIT", limit)
        ref = finch_module.finch(x, kernel="fp32")
        got = finch_module.finch(x, kernel=kernel)
        assert got.partition_sizes == ref.partition_sizes
        np.testing.assert_array_equal(got.labels, ref.labels)
        family = "scan" if limit == 1000 else "dense"
        expected = "fp32" if family == "dense" and kernel == "int8" else kernel
        assert got.kernels[family]["kernel"] == expected and got.kernels[family]["forced"]


def test_finch_records_the_measured_choice():
    result = finch_module.finch(clustered(600, dim=16, seed=3))
    record = result.kernels["dense"]
    assert not record["forced"] and record["kernel"] in kernels.DENSE_KERNELS
    assert set(record["rates_gops"]) == set(kernels.DENSE_KERNELS)


def test_a_kernel_faster_than_int8_buys_more_lists(monkeypatch):
    """The scan budget is int8 operations times how much faster than int8 the chosen kernel
    measured (never less): 4x int8's rate allows 4x the lists; a forced slower kernel keeps int8's."""
    x = clustered(6000, dim=32, centres=60, noise=1.0, seed=24)
    monkeypatch.setattr(ivf, "EXHAUSTIVE_LIMIT", 0)  # keep the capped nprobe
    nlist = ivf.approx_first_neighbours(x, nprobe=1)[2]["nlist"]
    n = len(x)
    monkeypatch.setattr(ivf, "IVF_SCAN_OPS", 2 * n * (n / nlist) * 32 * 3.5)  # 3 lists of int8 work
    nprobes = []
    for name, rates in (("int8", {"fp32": 1.0, "bf16": 2.0, "int8": 4.0}), ("bf16", {"fp32": 1.0, "bf16": 16.0, "int8": 4.0}),
                        ("fp32", {"fp32": 1.0, "bf16": 0.5, "int8": 2.0})):
        fake = kernels.KernelChoice("scan", name, rates, True)
        monkeypatch.setattr(kernels, "choose", lambda dim, family="scan", force=None, fake=fake: fake)
        nprobes.append(ivf.approx_first_neighbours(x, target=1.0)[2]["nprobe"])
    # (the calibration may stop before the cap of 14 once every probe is found)
    assert nprobes[0] == nprobes[2] == 3 and 9 < nprobes[1] <= 14
