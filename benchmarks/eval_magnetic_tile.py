"""ProtoAD vs the exact kNN memory bank on magnetic tile (efficientnet_lite0), like for like.

For each bank size M (``--bank-images``), M training images evenly spaced by sorted name
(``datasets.evenly_spaced``) make a category of symlinks (the real test set and masks). ProtoAD
engines are built on exactly those images with no hold-out, once per prototype budget
(``--max-prototypes``: FINCH stops at the first partition below it), and the kNN baseline's bank
is every patch of the same M images: both see the same training patches and differ only in
prototypes vs. the exact bank. All use ``--resize-mode`` (letterbox by default: the best mode on
these non-square parts, RESULTS.md section 4), re-normalised prototypes, ONNX Runtime FP32, and
all 582 test images; pixel metrics leave the letterbox padding out.

Exact kNN costs 2 * 3136 * M * 3136 * 176 FLOPs per test image, so the full bank (M = 762, 2.4M
patches) is a long CPU run, about 48x the 16-image bank's (RESULTS.md sections 6 and 7). Budgets
above ``--tiled-above`` are scored by ``TiledPrototypes`` (the network's formula in the kNN's
cache-sized tiles) instead of ONNX Runtime, whose [B, K, 56, 56] similarity tensor crawls on a CPU
at 100k+ prototypes; ``--check-tiled BUDGET`` scores an ONNX-evaluated engine both ways. A rerun
into the same ``--out`` reuses finished engines and evaluations.

    flock /tmp/protoad-bench.lock python benchmarks/eval_magnetic_tile.py --out /tmp/protoad-bench
    flock /tmp/protoad-bench.lock python benchmarks/eval_magnetic_tile.py --out /tmp/full --bank-images 762 \
        --max-prototypes 10000,50000,200000 --tiled-above 50000 --check-tiled 50000
    python benchmarks/eval_magnetic_tile.py --out /tmp/protoad-bench --table   # Markdown of a finished run
    python benchmarks/eval_magnetic_tile.py --out /tmp/full --scores-csv scores.csv   # every image's score
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


from protoad_export.build.pipeline import BuildConfig, build
from protoad_export.evaluation.evaluate import evaluate_bundle, image_auroc_differences
from protoad_export.evaluation.knn import KnnBaseline
from protoad_export.data.images import Preprocessing
from protoad_export.data.datasets import training_images
from protoad_export.data.datasets import evenly_spaced

DATA = Path(os.environ.get("PROTOAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "magnetic_tile"
METRICS = ("image_auroc", "pixel_auroc", "pro")


def subset_category(root: Path, out: Path, train: list[Path]) -> Path:
    """An MVTec-style category of symlinks: the given train images, the full test set and masks."""
    (out / "train" / "good").mkdir(parents=True, exist_ok=True)
    for p in train:
        link = out / "train" / "good" / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    for sub in ("test", "ground_truth"):
        if not (out / sub).exists():
            (out / sub).symlink_to(root / sub)
    return out


def engine(data: Path, name: str, out: Path, config: BuildConfig) -> tuple[Path, float]:
    path = out / "engines" / name
    if (path / "manifest.json").is_file():
        print(f"reusing {path}", flush=True)
        return path, float("nan")
    t0 = time.perf_counter()
    built = build(data, name, out / "engines", config, log=print, progress=False)
    return built.bundle_dir, time.perf_counter() - t0


def tiled_prototypes(bundle_dir: Path, manifest: dict) -> KnnBaseline:
    """ProtoAD's formula (1 - max_k <u, p_k>, bilinear upsample, blur, max) with the bundle's
    prototypes searched in the kNN baseline's cache-sized tiles: the network's numbers without its
    [B, K, 56, 56] similarity tensor, which makes ONNX Runtime on a CPU crawl past ~50k prototypes
    (``--tiled-above``; ``--check-tiled`` compares it with ONNX Runtime on one bundle)."""
    from protoad_export.bundle import load_array

    return KnnBaseline(bundle_dir, manifest, bank=load_array(bundle_dir, manifest, manifest["prototypes"]["file"]))


def evaluate_tiled(bundle_dir: Path, report_path: Path | None = None) -> dict:
    """``evaluate_bundle``'s ProtoAD entry, scored by ``TiledPrototypes``; with ``report_path`` (an
    ONNX Runtime report of the same engine) also the largest score difference between the two."""
    from protoad_export.bundle import read_manifest
    from protoad_export.data.datasets import load_test_set
    from protoad_export.evaluation.evaluate import score_metrics
    from protoad_export.runtime import predict_paths

    manifest = read_manifest(bundle_dir)
    scorer = tiled_prototypes(bundle_dir, manifest)
    test = load_test_set(DATA, scorer.preprocessing)
    t0 = time.perf_counter()
    pred = predict_paths(scorer, [t.path for t in test.samples], 8)
    maps, scores, secs = pred.maps, pred.scores, time.perf_counter() - t0
    protos = manifest["prototypes"]
    out = {"metrics": score_metrics(test, scores, maps), "seconds": round(secs, 2),
           "images_per_second": round(len(scores) / secs, 2), "backend": "torch, tiled max-cosine search", "precision": "fp32",
           "prototypes": protos["count"], "prototypes_mib_fp32": round(protos["count"] * protos["dim"] * 4 / 2**20, 2)}
    rows = [{"image": os.path.relpath(t.path, DATA), "defect": t.defect, "protoad": float(v)} for t, v in zip(test.samples, scores)]
    if report_path is not None:
        onnx = json.loads(report_path.read_text())["image_scores"]
        out["max_score_difference_vs_onnxruntime"] = float(max(abs(a["protoad"] - b["protoad"]) for a, b in zip(rows, onnx)))
    return {"methods": {"protoad": out}, "image_scores": rows}


def run(args) -> dict:
    train = training_images(DATA)
    rows, checks = [], []
    for m in args.bank_images:
        cat = subset_category(DATA, args.out / f"cat{m}", evenly_spaced(train, m))
        seen: dict[int, dict] = {}
        for i, budget in enumerate(args.max_prototypes):
            # "auto" chooses its level on a hold-out (the build's default 10 %), so it fits on fewer images than the bank holds.
            config = BuildConfig(input="tensor", backbone="efficientnet_lite0", batch_size=8, max_prototypes=budget,
                                 holdout=0.1 if budget == "auto" else 0.0, preprocessing=Preprocessing(mode=args.resize_mode))
            path, build_s = engine(cat, f"{args.resize_mode}{m}_p{budget}", args.out, config)
            baseline = "knn" if i == 0 else None  # the bank does not depend on the budget
            report = args.out / f"eval_{m}_{budget}.json"
            if report.is_file() and math.isnan(build_s):  # engine reused and its evaluation done: resume
                print(f"reusing {report}", flush=True)
                rep = json.loads(report.read_text())
            elif args.tiled_above is not None and not baseline and (budget == "auto" or budget > args.tiled_above):
                rep = evaluate_tiled(path)
                report.write_text(json.dumps(rep, indent=1))
            else:
                rep = evaluate_bundle(path, DATA, baseline=baseline, progress=args.progress, out_dir=args.out / f"eval_{m}_{budget}")
                report.write_text(json.dumps(rep, indent=1))
            ours = rep["methods"]["protoad"]
            if ours["prototypes"] in seen:  # same FINCH partition as a smaller budget
                print(f"M={m}: budget {budget} gives the same {ours['prototypes']} prototypes", flush=True)
                continue
            seen[ours["prototypes"]] = ours
            rows.append({"bank_images": m, "method": "protoad", "max_prototypes": budget, "build_seconds": build_s, **ours})
            if baseline:
                rows.append({"bank_images": m, "method": "knn", **rep["methods"]["knn"]})
            print(json.dumps(rows[-1])[:400], flush=True)
        if args.check_tiled is not None:
            path = args.out / "engines" / f"{args.resize_mode}{m}_p{args.check_tiled}"
            chk = evaluate_tiled(path, args.out / f"eval_{m}_{args.check_tiled}.json")["methods"]["protoad"]
            checks.append({"bank_images": m, "max_prototypes": args.check_tiled, "prototypes": chk["prototypes"],
                           "image_auroc_tiled": chk["metrics"]["overall"]["image_auroc"],
                           "max_score_difference_vs_onnxruntime": chk["max_score_difference_vs_onnxruntime"]})
            print(json.dumps(checks[-1]), flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, {model}, {os.cpu_count()} cores", "resize_mode": args.resize_mode,
            "command": "python benchmarks/eval_magnetic_tile.py " + " ".join(args.argv), "rows": rows,
            "tiled_checks": checks}


def _intervals(out: Path, m: int, budget: int, knn_budget: int) -> dict:
    """Paired bootstrap intervals of ProtoAD minus kNN image AUROC per defect type, from the
    per-image scores of the two evaluation reports (empty for runs that predate them)."""
    try:
        ours, ref = (json.loads((out / f"eval_{m}_{b}.json").read_text())["image_scores"] for b in (budget, knn_budget))
    except (OSError, KeyError):
        return {}
    assert [r["image"] for r in ours] == [r["image"] for r in ref]
    return image_auroc_differences([r["defect"] for r in ours], [r["protoad"] for r in ours], [r["knn"] for r in ref])


def table(run: dict, out: Path | None = None) -> str:
    """Markdown: overall metrics and per-type image AUROC, each ProtoAD row's gap to its bank's kNN
    (with its 95 % paired bootstrap interval where the reports hold per-image scores)."""
    rows = run["rows"]
    knn = {r["bank_images"]: r for r in rows if r["method"] == "knn"}
    first_budget = {r["bank_images"]: r["max_prototypes"] for r in reversed(rows) if r["method"] == "protoad"}
    defects = sorted(rows[0]["metrics"]["per_defect"])
    head = ["bank images", "method", "prototypes / bank patches", "image AUROC %", "pixel AUROC %", "PRO %",
            *[f"{d} image AUROC %" for d in defects], "images/s", "size MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(value, ref, ci=None):
        text = f"{100 * value:.1f}"
        if ref is None:
            return text
        text += f" ({100 * (value - ref):+.1f}"
        return text + (f" [{100 * ci['low']:+.1f}, {100 * ci['high']:+.1f}])" if ci else ")")

    for r in rows:
        ref = knn.get(r["bank_images"]) if r["method"] == "protoad" else None
        cis = _intervals(out, r["bank_images"], r["max_prototypes"], first_budget[r["bank_images"]]) if out and ref else {}
        size = r.get("prototypes_mib_fp32", r.get("bank_mib_fp32"))
        count = f"{r['prototypes']:,}" if r["method"] == "protoad" else f"{r['bank_patches']:,}"
        name = "kNN (exact bank)" if r["method"] == "knn" else f"ProtoAD, --max-prototypes {r['max_prototypes']}"
        name += " (tiled)" if r.get("backend", "").endswith("tiled max-cosine search") else ""
        o = r["metrics"]["overall"]
        vals = [cell(o[k], ref and ref["metrics"]["overall"][k], cis.get("overall") if k == "image_auroc" else None)
                for k in METRICS]
        per = [cell(r["metrics"]["per_defect"][d]["image_auroc"], ref and ref["metrics"]["per_defect"][d]["image_auroc"],
                    cis.get(d)) for d in defects]
        lines.append(f"| {r['bank_images']} | {name} | {count} | " + " | ".join(vals + per)
                     + f" | {r['images_per_second']:.1f} | {size:.1f} |")
    if any("[" in line for line in lines):
        lines.append("\nIn square brackets: 95 % paired, stratified bootstrap interval of the image AUROC difference "
                     "(`metrics.paired_auroc_difference`, 2,000 resamples).")
    return "\n".join(lines)


def scores_csv(run: dict, out: Path) -> str:
    """CSV of every test image's score under each method of a finished run (one column per
    prototype count and one for each bank), from the evaluation reports in ``out``."""
    columns: dict[str, list] = {}
    first_budget = {r["bank_images"]: r["max_prototypes"] for r in reversed(run["rows"]) if r["method"] == "protoad"}
    images = None
    for r in run["rows"]:
        budget = r["max_prototypes"] if r["method"] == "protoad" else first_budget[r["bank_images"]]
        rows = json.loads((out / f"eval_{r['bank_images']}_{budget}.json").read_text())["image_scores"]
        if images is None:
            images = [(row["image"], row["defect"]) for row in rows]
        assert [row["image"] for row in rows] == [i for i, _ in images]
        size = r["prototypes"] if r["method"] == "protoad" else r["bank_patches"]
        columns[f"{r['method']}_{size}"] = [row[r["method"]] for row in rows]
    lines = [",".join(["image", "defect", *columns])]
    lines += [",".join([img, defect, *(f"{col[i]:.7f}" for col in columns.values())]) for i, (img, defect) in enumerate(images)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/protoad-bench"))
    parser.add_argument("--bank-images", default="16,64", help="comma-separated bank sizes (training images)")
    parser.add_argument("--max-prototypes", default="10000,50000", help="comma-separated FINCH budgets ('auto': the level chosen on a 10 %% hold-out); the first is the paper's")
    parser.add_argument("--resize-mode", default="letterbox", choices=("crop", "squash", "letterbox"))
    parser.add_argument("--tiled-above", type=int, help="score budgets above this with TiledPrototypes, not ONNX Runtime")
    parser.add_argument("--check-tiled", type=int, metavar="BUDGET",
                        help="also score the BUDGET engine (evaluated by ONNX Runtime) tiled and report the score difference")
    parser.add_argument("--progress", action="store_true", help="progress bars (stderr) for the long kNN runs")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out/run.json")
    parser.add_argument("--scores-csv", type=Path, metavar="FILE", help="write every image's score under each method of --out/run.json")
    args = parser.parse_args()
    if args.table or args.scores_csv:
        run_json = json.loads((args.out / "run.json").read_text())
        if args.scores_csv:
            args.scores_csv.write_text(scores_csv(run_json, args.out))
        if args.table:
            print(table(run_json, args.out))
        return
    args.argv = sys.argv[1:]
    args.bank_images = [int(v) for v in args.bank_images.split(",")]
    args.max_prototypes = [v if v == "auto" else int(v) for v in args.max_prototypes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "run.json").write_text(json.dumps(result, indent=1))
    print(table(result, args.out))


if __name__ == "__main__":
    main()
