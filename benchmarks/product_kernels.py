"""The product kernels on this CPU: FP32, BF16, int8 and FP16 rates at FINCH's shapes, the kernel
``protoad_export.clustering.kernels`` chooses, and (``--exact-vs-ivf N``) exact search in the dense kernels
against the IVF on N real patch features.

Run::

    flock /tmp/protoad-cpu.lock python benchmarks/product_kernels.py [--exact-vs-ivf 100000]

All kernels run side by side in one process, taking turns (a shared machine's load hits them
alike); each figure is the best of ``--repeats`` timings of one product (2 x m x k x n operations).
"scan" products are those of the IVF (int8-rounded rows, converted to the kernel's dtype per
block, as ``ivf.py`` runs them); "dense" ones those of exact search and the kNN baseline (unit
FP32 rows pre-converted). ``--exact-vs-ivf`` reads the features cached by
``benchmarks/finch_scaling.py`` (``--cache``).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from protoad_export.clustering import kernels

SHAPES = [(4096, 176, 256), (2048, 176, 2048), (8192, 176, 512), (1024, 1792, 1024)]
FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni", "avx512f", "avx2")


def cpu_description() -> str:
    """The CPU's model name and the flags that decide the kernels (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    present = [f for f in FLAGS if f in flags]
    absent = [f for f in FLAGS[:6] if f not in flags]
    return f"{model}; flags: {' '.join(present) or '-'} (absent: {' '.join(absent) or '-'})"


def table(repeats: int) -> None:
    print("| family | m x k x n | FP32 GFLOP/s | BF16 | int8 GOP/s | FP16 | BF16 / FP32 | int8 / FP32 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family in ("scan", "dense"):
        names = kernels.KERNELS if family == "scan" else kernels.DENSE_KERNELS
        for m, k, n in SHAPES:
            calls = {name: kernels._operands(name, family, m, k, n) for name in names if name != "fp16"}
            rates = kernels._interleaved(calls, 2 * m * k * n, repeats)
            # FP16 without hardware support takes seconds here: one small product is enough.
            rates["fp16"] = kernels._interleaved({"fp16": kernels._operands("fp16", family, 256, k, n)}, 2 * 256 * k * n, 1)["fp16"]
            int8 = f"{rates['int8']:.0f}" if "int8" in rates else "-"
            ratio = f"{rates['int8'] / rates['fp32']:.1f}x" if "int8" in rates else "-"
            print(f"| {family} | {m} x {k} x {n} | {rates['fp32']:.0f} | {rates['bf16']:.0f} | {int8} | {rates['fp16']:.0f} | "
                  f"{rates['bf16'] / rates['fp32']:.1f}x | {ratio} |")


def choices() -> None:
    for dim in (176, 1792):
        for family in ("scan", "dense"):
            kernels.clear_cache()
            t = time.perf_counter()
            c = kernels.choose(dim, family=family)
            took = time.perf_counter() - t
            rates = ", ".join(f"{k} {v:.0f}" for k, v in c.rates.items())
            print(f"- {family}, {dim} dims: **{c.name}** (rates GOP/s: {rates}; measured in {took:.2f} s)")


def exact_vs_ivf(cache: Path, n: int) -> None:
    """Exact first neighbours of ``n`` sampled real features in each dense kernel, and the IVF."""
    from benchmarks.finch_scaling import sample
    from protoad_export.clustering.ivf import approx_first_neighbours
    from protoad_export.clustering.neighbours import exact_first_neighbours

    x = sample(cache, n, 0)
    kernels.choose(x.shape[1], family="dense")
    kernels.choose(x.shape[1])
    ref = None
    print("| search | seconds | first neighbours equal to FP32 exact |")
    print("| --- | ---: | ---: |")
    for name in ("fp32", "bf16"):
        t = time.perf_counter()
        idx, _ = exact_first_neighbours(x, kernel=name)
        took = time.perf_counter() - t
        ref = idx if ref is None else ref
        print(f"| exact, {name} products (+ FP32 re-scoring) | {took:.1f} | {np.mean(idx == ref):.4f} |")
    for _ in range(2):  # the second call is the warm one
        t = time.perf_counter()
        idx, _, info = approx_first_neighbours(x)
        took = time.perf_counter() - t
    print(f"| IVF {info['nprobe']}/{info['nlist']}, {info['kernel']['kernel']} products (second call) | {took:.1f} | "
          f"{np.mean(idx == ref):.4f} (estimate {info['recall']:.4f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact-vs-ivf", type=int, metavar="N", help="also time exact search against the IVF on N features")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/finchbench"))
    args = parser.parse_args()
    print(f"{cpu_description()}\n{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    with torch.no_grad():
        table(args.repeats)
        print()
        choices()
        if args.exact_vs_ivf:
            print()
            exact_vs_ivf(args.cache, args.exact_vs_ivf)


if __name__ == "__main__":
    main()
