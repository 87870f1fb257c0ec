"""ProtoAD vs the exact kNN memory bank on magnetic tile (efficientnet_lite0), per defect type.

Engines:

* ``A`` (main): built from every ``--every``-th training image by sorted name (FINCH on the full
  762 images is too slow on a 2-core CPU today), default hold-out 10 %.
* ``B`` (matched): built with no hold-out from exactly the kNN bank's images, so ProtoAD and kNN
  see the same training patches and differ only in prototypes vs. the exact bank.

The kNN bank is every patch of ``--bank-images`` of A's fitting images, evenly spaced by name
(exact search costs 2 * 3136 * bank_patches * 176 FLOPs per test image). Results go to
``--out/*.json``; the Markdown summary to stdout.

    flock /tmp/protoad-bench.lock python benchmarks/eval_magnetic_tile.py --out /tmp/protoad-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from protoad_export.artifacts import read_manifest
from protoad_export.builder import BuildConfig, build
from protoad_export.evaluate import bank_images, evaluate_engine, format_table

DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "magnetic_tile"


def subset_category(root: Path, out: Path, train: list[Path]) -> Path:
    """An MVTec-style category of symlinks: the given train images, the full test set and masks."""
    (out / "train" / "good").mkdir(parents=True, exist_ok=True)
    for p in train:
        link = out / "train" / "good" / p.name
        if not link.exists():
            link.symlink_to(p)
    for sub in ("test", "ground_truth"):
        if not (out / sub).exists():
            (out / sub).symlink_to(root / sub)
    return out


def engine(data: Path, name: str, out: Path, holdout: float) -> Path:
    path = out / "engines" / name
    if (path / "manifest.json").is_file():
        print(f"reusing {path}")
        return path
    config = BuildConfig(backbone="efficientnet_lite0", batch_size=8, holdout=holdout)
    return build(data, name, out / "engines", config, log=print, progress=False).engine_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/protoad-bench"))
    parser.add_argument("--every", type=int, default=4, help="engine A from every N-th training image")
    parser.add_argument("--bank-images", type=int, default=16)
    args = parser.parse_args()
    train = sorted((DATA / "train" / "good").iterdir())
    t0 = time.perf_counter()
    a = engine(subset_category(DATA, args.out / f"mt_every{args.every}", train[:: args.every]),
               f"mt_every{args.every}", args.out, 0.1)
    bank = bank_images(read_manifest(a), args.bank_images)
    b = engine(subset_category(DATA, args.out / f"mt_bank{args.bank_images}", bank),
               f"mt_bank{args.bank_images}", args.out, 0.0)
    reports = {
        "A": evaluate_engine(a, DATA, progress=False, out_dir=args.out / "eval_A"),
        "B+knn": evaluate_engine(b, DATA, baseline="knn", progress=False, out_dir=args.out / "eval_B"),
    }
    for key, rep in reports.items():
        print(f"\n== {key}: {rep['engine']}\n{format_table(rep)}")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    summary = {"machine": f"{platform.platform()}, {model}, {os.cpu_count()} cores", "total_seconds": time.perf_counter() - t0,
               "engines": {"A": str(a), "B": str(b)}, "bank": [p.name for p in bank]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
