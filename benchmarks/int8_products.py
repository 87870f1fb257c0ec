"""Matrix products on the running CPU in FP32, FP16, BF16 and int8 at the shapes of the FINCH IVF scan.

Run::

    flock /tmp/protoad-bench.lock python benchmarks/int8_products.py

Why FINCH's IVF multiplies in int8 (``protoad_export/clustering/ivf.py``): the products of one list
against the queries that probe it are [queries x C] @ [C x members] with C = 176
(efficientnet_lite0) or 1792 (wide_resnet50_2) and a few hundred to a few thousand members.
All four dtypes run side by side in one process; each figure is the best of ``--repeats``
timings of ``--reps`` products (2 x m x k x n operations per product).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

SHAPES = [(4096, 176, 256), (2048, 176, 2048), (8192, 176, 512), (1024, 1792, 1024)]


def rate(f, a: torch.Tensor, b: torch.Tensor, reps: int, repeats: int) -> float:
    """Giga-operations per second of ``f(a, b)``, best of ``repeats``."""
    f(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            f(a, b)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| m x k x n | FP32 GFLOP/s | FP16 | BF16 | int8 GOP/s (`torch._int_mm`) | int8 / FP32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        mm = lambda x, y: x @ y  # noqa: E731
        fp32 = rate(mm, a, b, args.reps, args.repeats)
        fp16 = rate(mm, a.half(), b.half(), args.reps, args.repeats)
        bf16 = rate(mm, a.bfloat16(), b.bfloat16(), args.reps, args.repeats)
        a8 = (a * 20).round().clamp(-127, 127).to(torch.int8)
        b8 = (b * 20).round().clamp(-127, 127).to(torch.int8)
        int8 = rate(torch._int_mm, a8, b8, args.reps, args.repeats)
        print(f"| {m} x {k} x {n} | {fp32:.0f} | {fp16:.0f} | {bf16:.0f} | {int8:.0f} | {int8 / fp32:.1f}x |")


if __name__ == "__main__":
    main()
