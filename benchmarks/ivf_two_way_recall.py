"""Recall of a one-way and a two-way IVF at each nprobe, from list ranks alone (finch.md, "Tried and not kept").

One-way (plain IVF, what ``protoad_export.clustering.finch`` runs): a point finds its exact first neighbour
when the neighbour's list is among the point's ``nprobe`` best-ranked lists. Two-way: also when the
point's own list is among the *neighbour's* ``nprobe`` lists, i.e. when the scan's products are
read by columns as well as by rows. Uses the exact neighbours that ``finch_scaling.py`` saved::

    python benchmarks/ivf_two_way_recall.py --cache /tmp/s4/finchbench --n 100000 --seed 0
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from finch_scaling import sample
from protoad_export.clustering.ivf import IVF_KMEANS_ITERATIONS, IVF_LISTS_PER_ROOT, IVF_TRAIN_PER_LIST, spherical_kmeans
from protoad_export.clustering.neighbours import normalised


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/finchbench"))
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--depths", default="20,30,40,50,83")
    args = ap.parse_args()
    exact = np.load(args.cache / f"run_exact_{args.n}_{args.seed}.nn.npy")
    unit = normalised(np.asarray(sample(args.cache, args.n, args.seed), dtype=np.float32))
    n, dim = unit.shape
    nlist = int(round(IVF_LISTS_PER_ROOT * math.sqrt(n)))
    rng = np.random.default_rng(0)
    train = np.ascontiguousarray(unit[np.sort(rng.choice(n, IVF_TRAIN_PER_LIST * nlist, replace=False))])
    centroids = spherical_kmeans(train, nlist, IVF_KMEANS_ITERATIONS, rng)
    scores = torch.from_numpy(unit) @ torch.from_numpy(centroids).T
    home = scores.argmax(dim=1)
    sizes = np.bincount(home.numpy(), minlength=nlist)
    # Rank of the neighbour's list among the point's lists, and of the point's list among the neighbour's.
    forward = (scores > scores.gather(1, home[exact][:, None])).sum(dim=1).numpy()
    theirs = scores[torch.from_numpy(exact)]
    backward = (theirs > theirs.gather(1, home[:, None])).sum(dim=1).numpy()
    print(f"N {n:,}, {dim} dims, nlist {nlist}, seed {args.seed}")
    print("| nprobe | share of pairs scanned | recall, one-way (plain IVF) | recall, two-way |")
    print("| ---: | ---: | ---: | ---: |")
    for p in (int(v) for v in args.depths.split(",")):
        share = sizes[scores.topk(p, dim=1).indices.numpy()].sum() / n / n
        print(f"| {p} | {share:.3f} | {np.mean(forward < p):.3f} | {np.mean(np.minimum(forward, backward) < p):.3f} |")


if __name__ == "__main__":
    main()
