"""The kNN baseline's exact search on a CPU: block shapes side by side, in one process.

Queries are one evaluation batch (8 images x 3136 patches), the bank 200k unit rows of 176 dims
(efficientnet_lite0's width; random data: the cost of a dense product does not depend on values).
Each shape runs twice, alternating, so drift on a shared machine shows up in the spread.

    flock /tmp/protoad-bench.lock python benchmarks/knn_tiles.py
"""

from __future__ import annotations

import argparse
import time

import torch

from protoad_export.clustering.neighbours import CPU_TILE, nearest_similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=8 * 3136)
    parser.add_argument("--dim", type=int, default=176)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(args.bank, args.dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    flops = 2 * args.queries * args.bank * args.dim
    shapes = [(4096, 16384), (CPU_TILE, CPU_TILE), (2048, 512), (512, 2048), (256, 4096)]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in shapes}
    reference = None
    for _ in range(args.repeats):
        for shape in shapes:
            t0 = time.perf_counter()
            best = nearest_similarity(queries, bank, *shape)
            times[shape].append(time.perf_counter() - t0)
            if reference is None:
                reference = best
            assert torch.allclose(best, reference, atol=1e-6)  # every tiling finds the same maxima
    base = min(times[shapes[0]])
    print(f"{torch.get_num_threads()} threads, queries {args.queries:,} x bank {args.bank:,} x {args.dim} dims")
    print("| tile (queries x bank rows) | seconds (best, worst) | GFLOPS | speed vs 4096 x 16384 |")
    print("|---|---|---:|---:|")
    for shape in shapes:
        t = times[shape]
        mark = " (default)" if shape == (CPU_TILE, CPU_TILE) else ""
        print(f"| {shape[0]} x {shape[1]}{mark} | {min(t):.2f}, {max(t):.2f} | {flops / min(t) / 1e9:.0f} | {base / min(t):.2f}x |")


if __name__ == "__main__":
    main()
