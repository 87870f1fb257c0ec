"""Product kernels chosen by measuring them on the CPU at hand, and their error models.

The hot products of a build and of an evaluation (FINCH's IVF scan, exact first neighbours, the
kNN baseline and the tiled nearest-patch scorer) can run in FP32, BF16, FP16 or int8
(``torch._int_mm``). Which is fastest depends on the CPU: AVX-512 VNNI makes int8 the fastest,
AMX makes BF16 several times FP32, and a CPU without FP16 arithmetic runs FP16 products at a
tiny fraction of FP32 (``benchmarks/results/kernels.md``). So the kernels are timed once per
process at the scan's shapes (a few hundred milliseconds, cached) and the fastest is used;
every low-precision product is followed by FP32 re-scoring of the candidates within its error
bound (``scan_margin``, ``dense_error``), so the winners are the FP32 winners.

Two families share the timing:

- ``scan``: the IVF's products of int8-rounded rows (``ivf.py``). Integers up to 127 are exact in
  BF16 and FP16 (8 and 11 significant bits), so those kernels add only the rounding of their
  output to the int8 error model (``scan_margin``).
- ``dense``: products of unit FP32 rows rounded to the kernel's dtype (exact search, kNN); int8
  is not offered there (it would need one scale for all rows and a statistical margin).

``PROTOAD_PRODUCT_KERNEL`` (or a ``force`` argument) forces a kernel, for tests and benchmarks.
Torch is imported only when a kernel is timed or used.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

KERNELS = ("fp32", "bf16", "int8", "fp16")
DENSE_KERNELS = ("fp32", "bf16", "fp16")
KERNEL_ENV = "PROTOAD_PRODUCT_KERNEL"
# Unit roundoff (half an ulp at 1, relative) of each float kernel's dtype: BF16 keeps 8
# significant bits, FP16 11, FP32 24.
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
# A low-precision kernel is used only where it measures at least this much faster than FP32:
# its operands are converted per block and its candidates re-scored in FP32, which the timed
# product alone does not include. Dense products of real patch features have many candidates
# within BF16's hard bound: on 20k of them, BF16 products at 2.6x the FP32 rate made exact search
# 1.5-2.4x slower in all (benchmarks/results/kernels.md), so only a far faster kernel can pay.
SCAN_MIN_SPEEDUP = 1.1
DENSE_MIN_SPEEDUP = 8.0
# The scan's typical product: the queries probing one list against its members.
TIMING_ROWS, TIMING_COLS = 2048, 512
_PROBE_ROWS = 256  # a first, small product: a kernel far slower than FP32 is not timed further
_REPS = 5

_CACHE: dict[tuple[str, int], "KernelChoice"] = {}


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a family of products uses, the measured rates (giga-operations per second, one
    multiply-add = 2) it was chosen from, and whether it was forced."""

    family: str
    name: str
    rates: dict
    forced: bool = False

    def record(self) -> dict:
        """What the manifest keeps."""
        return {"kernel": self.name, "rates_gops": {k: round(v, 1) for k, v in self.rates.items()}, "forced": self.forced}

    @property
    def rate(self) -> float:
        """Operations per second of the chosen kernel (for compute budgets)."""
        return self.rates.get(self.name, 0.0) * 1e9


def forced_kernel(force: str | None = None, *, family: str = "scan") -> str | None:
    """The kernel ``force`` or ``PROTOAD_PRODUCT_KERNEL`` names, checked; None to measure."""
    from ..errors import InputError

    name = force or os.environ.get(KERNEL_ENV) or None
    if name is None:
        return None
    allowed = KERNELS if family == "scan" else DENSE_KERNELS
    name = name.lower()
    if name not in KERNELS:
        raise InputError(f"unknown product kernel {name!r} ({KERNEL_ENV}): choose one of {', '.join(KERNELS)}")
    # int8 has no dense form: those products then run in FP32.
    return name if name in allowed else "fp32"


def _interleaved(calls: dict, ops: float, reps: int) -> dict[str, float]:
    """Giga-operations per second of each ``calls[name]()`` (``ops`` each), best of ``reps`` after
    one warm call, the kernels taking turns so that a load change on a shared machine hits all."""
    for f in calls.values():
        f()
    best = dict.fromkeys(calls, math.inf)
    for _ in range(reps):
        for name, f in calls.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: ops / max(s, 1e-9) / 1e9 for name, s in best.items()}


def _operands(kernel: str, family: str, rows: int, dim: int, cols: int):
    """``f()`` that runs one product of ``kernel`` as ``family`` runs it (conversions included)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=g)
    b = torch.randn(dim, cols, generator=g)
    if family == "scan":
        a8 = a.mul(40).round_().clamp_(-127, 127).to(torch.int8)
        b8 = prepare_scan(kernel, b.mul(40).round_().clamp_(-127, 127).to(torch.int8))
        return lambda: scan_product(kernel, a8, b8)
    dtype = dense_dtype(kernel)
    a, b = a.to(dtype), b.to(dtype)
    return lambda: a @ b


def measure_rates(dim: int, *, family: str = "scan", kernels: tuple[str, ...] | None = None) -> dict[str, float]:
    """Measured giga-operations per second of each kernel for ``family`` at [2048 x dim] @ [dim x 512].
    A kernel under half the FP32 rate on a small first product is reported at that rate and not
    timed further (FP16 without hardware support would take seconds)."""
    import torch

    kernels = kernels or (KERNELS if family == "scan" else DENSE_KERNELS)
    with torch.no_grad():
        calls = {name: _operands(name, family, _PROBE_ROWS, dim, TIMING_COLS) for name in kernels}
        probe = _interleaved(calls, 2 * _PROBE_ROWS * dim * TIMING_COLS, 1)
        fast = [n for n in kernels if n == "fp32" or probe[n] >= probe.get("fp32", 0) / 2]
        calls = {name: _operands(name, family, TIMING_ROWS, dim, TIMING_COLS) for name in fast}
        rates = _interleaved(calls, 2 * TIMING_ROWS * dim * TIMING_COLS, _REPS)
    return {name: rates.get(name, probe[name]) for name in kernels}


def choose(dim: int, *, family: str = "scan", force: str | None = None) -> KernelChoice:
    """The kernel for ``family`` ("scan" or "dense") products of ``dim``-wide rows: forced
    (``force`` or ``PROTOAD_PRODUCT_KERNEL``) or the fastest measured, once per process and
    width (cached)."""
    if family not in ("scan", "dense"):
        raise ValueError(f"unknown product family {family!r}")
    forced = forced_kernel(force, family=family)
    key = (family, int(dim))
    if key not in _CACHE:
        rates = measure_rates(dim, family=family)
        _CACHE[key] = KernelChoice(family, _fastest(rates, family), rates)
    choice = _CACHE[key]
    return choice if forced is None else KernelChoice(family, forced, choice.rates, True)


def _fastest(rates: dict[str, float], family: str) -> str:
    need = SCAN_MIN_SPEEDUP if family == "scan" else DENSE_MIN_SPEEDUP
    best = "fp32"
    for name, r in rates.items():
        if name != "fp32" and r >= need * rates["fp32"] and r > rates[best]:
            best = name
    return best


def clear_cache() -> None:
    """Forget the measured choices (tests)."""
    _CACHE.clear()


# --------------------------------------------------------------------------------------------
# The scan family: int8-rounded rows


def prepare_scan(kernel: str, b8):
    """The right operand (int8 [k, n], contiguous) of a scan product in the kernel's dtype, once
    per list. FP16 operands are scaled by 2^-7 (exact) so that the products stay in FP16's range."""
    import torch

    if kernel == "int8":
        return b8
    if kernel == "fp16":
        return b8.to(torch.float16).mul_(2.0**-7)
    return b8.to(torch.float32 if kernel == "fp32" else torch.bfloat16)


def scan_product(kernel: str, a8, b_prepared):
    """Products of int8 rows ``a8`` [m, k] with a ``prepare_scan`` operand, in int8 product units
    (the integer sum of products, up to the kernel's output rounding): int32 for int8, float32
    otherwise."""
    import torch

    if kernel == "int8":
        return torch._int_mm(a8, b_prepared)
    if kernel == "fp16":
        return (a8.to(torch.float16).mul_(2.0**-7) @ b_prepared).float().mul_(2.0**14)
    if kernel == "fp32":
        return a8.float() @ b_prepared
    return (a8.to(torch.bfloat16) @ b_prepared).float()


def scan_margin(kernel: str, scale: float) -> int:
    """Extra margin, in int8 product units, that ``kernel`` adds to the int8 rounding's margin.

    The operands are the int8 integers themselves (exact in BF16 and FP16; FP16's 2^-7 scaling
    is exact too) and the products accumulate in FP32, so the only new error is the rounding of
    each output to the kernel's dtype: at most u * |c|, with |c| <= the product of the rounded
    rows' norms <= (scale + sqrt(dim)/2)^2 ~ 1.01 * scale^2 for the scan's rows. Two products
    compared: twice that, plus one unit for the conversion of the maxima to integers.
    """
    if kernel in ("int8", "fp32"):
        return 0
    return int(math.ceil(2 * UNIT_ROUNDOFF[kernel] * 1.02 * scale * scale)) + 1


# --------------------------------------------------------------------------------------------
# The dense family: unit FP32 rows rounded to the kernel's dtype


def dense_dtype(kernel: str):
    """The torch dtype of a dense kernel."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kernel]


def dense_error(kernel: str, dim: int) -> float:
    """Bound on |computed - exact| for the product of two unit vectors of ``dim`` computed in
    ``kernel`` (each operand rounded to its dtype, FP32 accumulation, output rounded), in cosine.

    Derivation, with u the dtype's unit roundoff (BF16: 2^-8) and a, b unit vectors:
    rounding gives a_i(1 + al_i), b_i(1 + be_i) with |al_i|, |be_i| <= u, so the exact product of
    the rounded rows differs from a.b by sum a_i b_i (al_i + be_i + al_i be_i), at most
    (2u + u^2) sum |a_i b_i| <= 2u + u^2 (Cauchy-Schwarz: sum |a_i b_i| <= |a| |b| = 1).
    Accumulating ``dim`` terms in FP32 adds at most dim * 2^-24 * (1 + u)^2 (the sum of the
    terms' magnitudes is at most (1 + u)^2). Rounding the result, of magnitude at most
    (1 + u)^2 + ..., to the dtype adds at most u times that. Total, rounded up:
    3u + 4u^2 + dim * 2^-23. For BF16 that is 0.0118 (176 dims), i.e. two products compared can
    swap order only if their exact values are within twice that; the FP32 re-scoring of every
    candidate within that margin (``rescore_candidates``) keeps the exact winner. It is a hard
    bound, not a statistical one: no tail can escape it. FP16 subnormals (coordinates below
    6e-5) lose relative precision but add under dim * 2^-25 in all, inside the last term.
    """
    if kernel == "fp32":
        return dim * 2.0**-23
    u = UNIT_ROUNDOFF[kernel]
    return 3 * u + 4 * u * u + dim * 2.0**-23
