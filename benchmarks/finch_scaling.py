"""FINCH at product-line scale: this project's FINCH against ``finch-clust`` 0.2.3 on real features.

Run (heavy: hold the shared lock so runs do not overlap)::

    flock /tmp/protoad-bench.lock python benchmarks/finch_scaling.py --seeds 0,1,2,3,4 --out benchmarks/results/finch_run.json

Features of the magnetic tile train set (762 images, efficientnet_lite0) and test set (582 images)
are extracted once into ``--cache``. For each N a seeded uniform sample of train rows (the rule of
``--max-train-patches``) is clustered by both implementations, each in a fresh subprocess so that
peak RSS and start-up costs (numba compilation for finch-clust) are per method. Reported:
seconds, peak RSS, partition sizes, level-0 first-neighbour recall on 20k queries against exact
search (a hit: the found neighbour is as similar as the exact one, within 1e-6), and the image
AUROC of the prototypes (first partition under 10,000 clusters, re-normalised means as the build
makes them) on the 582 test images, scored as ``ProtoADNetwork`` scores: 1 - max cos, bilinear
upsample to 224, Gaussian blur, max. Each implementation is timed several times in its process:
the first call pays start-up costs (numba compilation for finch-clust), the later ones
(``--warm-calls``, default 3) do not; their median is the warm time, since single calls on a
shared machine vary by tens of percent.

``exact`` (this project's FINCH with exact first neighbours, up to ``--exact-up-to`` points) is the
reference both approximate searches are judged against: its prototypes are true FINCH's. Image
AUROC differences between two sets of prototypes are noisy (which rows are sampled moves them by
tenths of a point), so ``--seeds`` repeats the sizes in ``--seeded-sizes`` on several samples and
``--table`` prints the mean and spread of the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from protoad_export.model.backbones import get_spec

DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "magnetic_tile"
MAX_PROTOTYPES = 10_000
RECALL_QUERIES = 20_000
# Cached features are named after the model that made them, so a change of host is never read
# from a stale cache (features of the plain efficientnet_lite0 host differ; RESULTS.md section 11).
_HOST = get_spec("efficientnet_lite0").architecture
TRAIN_FILE, TEST_FILE = f"train_{_HOST}.npy", f"test_{_HOST}.npy"


def extract(backbone: str, paths: list[Path], out: Path, weights: str | None = None) -> np.ndarray:
    """Cached FP16 patch features of ``paths`` (the build's own extractor)."""
    from protoad_export.model.backbones import load_backbone
    from protoad_export.model.features import FeatureExtractor, PatchFeatures, extract_features
    from protoad_export.data.images import Preprocessing
    from protoad_export.model.network import patch_grid

    if not out.exists():
        bb = load_backbone(backbone, weights)
        prep = bb.spec.preprocessing(Preprocessing())
        grid = patch_grid(prep.crop, bb.spec.strides[0])
        tmp = out.with_suffix(".part.npy")
        t0 = time.perf_counter()
        ex = extract_features(FeatureExtractor(PatchFeatures(bb.module, "bilinear", grid), prep), paths, prep, tmp,
                              batch_size=16, progress=False)
        assert not ex.skipped
        del ex
        os.replace(tmp, out)
        print(f"extracted {len(paths)} images -> {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return np.load(out, mmap_mode="r")


def cache_features(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from protoad_export.data.datasets import category_test_set, training_images

    cache.mkdir(parents=True, exist_ok=True)
    train = extract("efficientnet_lite0", training_images(DATA), cache / TRAIN_FILE)
    tests = category_test_set(DATA)
    test = extract("efficientnet_lite0", [t.path for t in tests], cache / TEST_FILE)
    labels = np.array([t.label for t in tests])
    return train, test, labels


def sample(cache: Path, n: int, seed: int = 0) -> np.ndarray:
    """The ``--max-train-patches`` sample of the cached train features, read with plain file reads
    block by block (no mapping), so the 0.8 GB file does not count in this process's peak RSS."""
    from protoad_export.clustering.prototypes import sample_rows

    path = cache / TRAIN_FILE
    full = np.load(path, mmap_mode="r")
    total, dim, offset = len(full), full.shape[1], full.offset
    del full
    rows = sample_rows(total, n, seed)
    rows = np.arange(total) if rows is None else rows
    out = np.empty((len(rows), dim), dtype=np.float16)
    step = 65536
    with open(path, "rb") as f:
        for start in range(0, total, step):
            lo, hi = np.searchsorted(rows, [start, start + step])
            if hi > lo:
                f.seek(offset + start * dim * 2)
                block = np.fromfile(f, dtype=np.float16, count=min(step, total - start) * dim).reshape(-1, dim)
                out[lo:hi] = block[rows[lo:hi] - start]
    return out


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM): unlike ru_maxrss it does not inherit the parent's peak
    across fork + exec."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, cache: Path, n: int, seed: int, out: Path, warm_calls: int = 3) -> None:
    """In a fresh process: cluster N sampled rows with one implementation, save prototypes + stats."""
    x = sample(cache, n, seed)
    rss_before = peak_rss_mib()
    if method in ("ours", "exact"):
        from protoad_export.clustering.finch import finch

        how = "auto" if method == "ours" else "exact"
        t0 = time.perf_counter()
        r = finch(x, stop_below=MAX_PROTOTYPES, method=how)
        seconds = time.perf_counter() - t0
        warm = []
        if method == "ours":  # the reference is not timed again
            for _ in range(warm_calls):
                t0 = time.perf_counter()
                finch(x, stop_below=MAX_PROTOTYPES)
                warm.append(time.perf_counter() - t0)
        sizes, protos, nn = r.partition_sizes, r.means, r.first_neighbours
        extra = {"neighbour_methods": r.neighbour_methods, "seconds_per_level": [round(s, 2) for s in r.seconds],
                 "product_kernels": r.kernels}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import finch as fc
        captured = []
        original = fc.finch.clust_rank

        def spy(*args, **kwargs):
            result = original(*args, **kwargs)
            captured.append(np.asarray(result[2]).copy())
            return result

        fc.finch.clust_rank = spy
        t0 = time.perf_counter()
        c, num_clust, _ = fc.FINCH(x.astype(np.float32), verbose=False)  # defaults, as a user calls it
        seconds = time.perf_counter() - t0
        # Again in the same process: numba's compilation is paid once per process (its on-disk
        # cache does not cover finch-clust's pynndescent calls, most of a cold call at 100k).
        fc.finch.clust_rank = original
        warm = []
        for _ in range(warm_calls):
            t0 = time.perf_counter()
            fc.FINCH(x.astype(np.float32), verbose=False)
            warm.append(time.perf_counter() - t0)
        sizes = [int(v) for v in num_clust]
        # ProtoAD's rule on finch-clust's hierarchy: the first partition with fewer than 10,000 clusters.
        level = next((i for i, k in enumerate(sizes) if k < MAX_PROTOTYPES), len(sizes) - 1)
        labels = c[:, level]
        from protoad_export.clustering.finch import cluster_means

        protos = cluster_means(x, labels, int(labels.max()) + 1)
        nn = captured[0]
        extra = {"chosen_level": level}
    np.save(out.with_suffix(".protos.npy"), protos.astype(np.float32))
    np.save(out.with_suffix(".nn.npy"), np.asarray(nn, dtype=np.int64))
    rss = peak_rss_mib()
    out.write_text(json.dumps({"method": method, "n": n, "seed": seed, "seconds": seconds,
                               "warm_seconds": float(np.median(warm)) if warm else float("nan"), "warm_calls": warm,
                               "partition_sizes": sizes,
                               "prototypes": int(len(protos)), "peak_rss_mib": rss,
                               "rss_before_mib": rss_before, **extra}))


def exact_best(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact best similarity (self excluded) of rows ``queries`` of ``x`` against all of ``x``."""
    from protoad_export.clustering.neighbours import unit_matrix

    u = torch.from_numpy(unit_matrix(x))
    best = torch.empty(len(queries))
    for s in range(0, len(queries), 1024):
        q = torch.from_numpy(queries[s : s + 1024])
        sims = u[q] @ u.T
        sims[torch.arange(len(q)), q] = -torch.inf
        best[s : s + len(q)] = sims.max(dim=1).values
    return best.numpy()


def recall(x: np.ndarray, queries: np.ndarray, best: np.ndarray, nn: np.ndarray) -> float:
    from protoad_export.clustering.neighbours import unit_matrix

    q = unit_matrix(x[queries])
    found = np.einsum("ij,ij->i", q, unit_matrix(x[nn[queries]]))
    return float(np.mean(found >= best - 1e-6))


def image_auroc(protos: np.ndarray, test: np.ndarray, labels: np.ndarray, grid: int = 56, crop: int = 224) -> float:
    """Image AUROC as the exported network scores: 1 - max cos to the re-normalised prototypes, upsampled, blurred, max."""
    from protoad_export.evaluation.metrics import image_auroc as auroc
    from protoad_export.model.network import ScoreTail

    score_tail = ScoreTail(crop)
    p = torch.from_numpy(np.ascontiguousarray(protos, dtype=np.float32))
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)  # the build's default
    per_image = grid * grid
    scores = np.empty(len(labels), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(labels), 8):
            f = torch.from_numpy(np.asarray(test[i * per_image : (i + 8) * per_image], dtype=np.float32))
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
            nearest = (f @ p.T).amax(dim=1).view(-1, 1, grid, grid)
            scores[i : i + len(nearest)] = score_tail(1 - nearest)[1].numpy()
    return auroc(labels, scores) * 100


def table(run: dict) -> str:
    """Markdown tables of a run: every row, then per N the image AUROC differences over the seeds."""
    calls = max((len(r.get("warm_calls", [0])) for r in run["rows"]), default=1)
    later = "second call" if calls == 1 else f"later calls, median of {calls}"
    lines = [f"| N | seed | implementation | seconds (first call) | seconds ({later}) | peak RSS MiB (before) | partition sizes | first-nb recall | image AUROC % | level-0 search |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in run["rows"]:
        how = ", ".join(r.get("neighbour_methods", [])) or "pynndescent k=2 / exact <= 20k"
        warm = r.get("warm_seconds", float("nan"))
        warm = "-" if warm != warm else f"{warm:.1f}"
        lines.append(f"| {r['n']:,} | {r.get('seed', 0)} | {r['method']} | {r['seconds']:.1f} | {warm} | "
                     f"{r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) | {r['partition_sizes']} | {r['recall']:.4f} | "
                     f"{r['image_auroc']:.2f} | {how} |")
    lines += ["", f"| N | seeds | AUROC ours - finch-clust: mean (sd, range) | ours - exact | finch-clust - exact | speed-up, first call | speed-up, {later} |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    by = {(r["n"], r.get("seed", 0), r["method"]): r for r in run["rows"]}
    for n in sorted({r["n"] for r in run["rows"]}):
        seeds = sorted({s for (m, s, _) in by if m == n})

        def diff(a: str, b: str) -> str:
            d = np.array([by[n, s, a]["image_auroc"] - by[n, s, b]["image_auroc"] for s in seeds if (n, s, a) in by and (n, s, b) in by])
            if not len(d):
                return "-"
            spread = f" ({d.std(ddof=1):.2f}, {d.min():+.2f} to {d.max():+.2f})" if len(d) > 1 else ""
            return f"{d.mean():+.2f}{spread}"

        def ratio(key: str) -> str:
            q = [by[n, s, "finch-clust"][key] / by[n, s, "ours"][key] for s in seeds if (n, s, "ours") in by and (n, s, "finch-clust") in by]
            if not q:
                return "-"
            lo, hi = f"{min(q):.1f}x", f"{max(q):.1f}x"
            return lo if lo == hi else f"{lo} to {hi}"

        lines.append(f"| {n:,} | {len(seeds)} | {diff('ours', 'finch-clust')} | {diff('ours', 'exact')} | {diff('finch-clust', 'exact')} | "
                     f"{ratio('seconds')} | {ratio('warm_seconds')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/finchbench"))
    ap.add_argument("--sizes", default="20000,100000,300000")
    ap.add_argument("--methods", default="ours,finch-clust,exact")
    ap.add_argument("--exact-up-to", type=int, default=100_000, help="run the exact reference up to this N")
    ap.add_argument("--seeds", default="0", help="sample seeds for the sizes in --seeded-sizes (others use the first)")
    ap.add_argument("--seeded-sizes", default="100000")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/finch_run.json"))
    ap.add_argument("--warm-calls", type=int, default=3, help="timed calls after the first, in the same process (median reported)")
    ap.add_argument("--table", type=Path, help="print the markdown table of a finished run's JSON")
    ap.add_argument("--run", nargs=4, metavar=("METHOD", "N", "SEED", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.run:
        run_one(args.run[0], args.cache, int(args.run[1]), int(args.run[2]), Path(args.run[3]), args.warm_calls)
        return
    _, test, labels = cache_features(args.cache)
    rows = []
    seeds = [int(v) for v in args.seeds.split(",")]
    seeded = {int(v) for v in args.seeded_sizes.split(",") if v}
    for n in (int(v) for v in args.sizes.split(",")):
        for seed in seeds if n in seeded else seeds[:1]:
            x = sample(args.cache, n, seed)
            queries = np.sort(np.random.default_rng(1).choice(len(x), min(len(x), RECALL_QUERIES), replace=False))
            best = exact_best(x, queries)
            for method in args.methods.split(","):
                if method == "exact" and n > args.exact_up_to:
                    continue
                out = args.cache / f"run_{method}_{n}_{seed}.json"
                t0 = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--cache", str(args.cache), "--warm-calls", str(args.warm_calls),
                                "--run", method, str(n), str(seed), str(out)], check=True)
                row = json.loads(out.read_text())
                row["process_seconds"] = time.perf_counter() - t0
                row["recall"] = recall(x, queries, best, np.load(out.with_suffix(".nn.npy")))
                row["image_auroc"] = image_auroc(np.load(out.with_suffix(".protos.npy")), test, labels)
                print(json.dumps(row), flush=True)
                rows.append(row)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from product_kernels import cpu_description

    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "cpu": cpu_description(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
