"""``eval``: an engine on a labelled MVTec-style category, optionally beside the exact kNN baseline.

Per defect type (that type's images against the good images) and overall: image AUROC, pixel
AUROC and PRO (``metrics.py``), throughput, and plots. Masks go through the engine's own
``Preprocessing.mask_array``, so maps and masks are compared at the crop resolution with the same
geometry. Defective images whose mask is missing or empty after preprocessing count at image
level only (their pixels would otherwise pass for normal ones).

The kNN baseline (``knn.py``) is PatchCore without coreset subsampling on the very same features.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import metrics
from ..bundle import atomic_write_json, output_folder
from ..errors import InputError
from ..options import BASELINES
from ..data.datasets import TestSet, load_test_set
from ..contract import manifest_threshold



def _metrics_for(test: TestSet, select: np.ndarray, scores: np.ndarray, maps: np.ndarray) -> dict:
    labels = test.labels[select]
    out = {"images": int(select.sum()), "defective": int(labels.sum()),
           "image_auroc": metrics.image_auroc(labels, scores[select])}
    pix = select & test.pixel_ok
    if test.masks[pix].any():
        # Letterbox padding is no part of the product: it must not count as easy normal pixels.
        out["pixel_auroc"] = metrics.pixel_auroc(test.masks[pix], maps[pix], test.valid[pix])
        out["pro"] = metrics.pro_score(test.masks[pix], maps[pix], valid=test.valid[pix])
    else:
        out["pixel_auroc"] = out["pro"] = None
    out["pixel_images"] = int(pix.sum())
    return out


def score_metrics(test: TestSet, scores: np.ndarray, maps: np.ndarray) -> dict:
    """``{"overall": {...}, "per_defect": {type: {...}}}``; each type is scored against the good images."""
    good = test.labels == 0
    defects = np.array([s.defect for s in test.samples])
    per = {d: _metrics_for(test, good | (defects == d), scores, maps) for d in test.defects}
    return {"overall": _metrics_for(test, np.ones(len(test.samples), bool), scores, maps), "per_defect": per}


def at_threshold(test: TestSet, scores: np.ndarray, threshold: float) -> dict:
    """Decision rates on the test set at a threshold (defective if score > threshold)."""
    rejected = scores > threshold
    defects = np.array([s.defect for s in test.samples])
    return {
        "threshold": float(threshold),
        "false_reject_rate": float(rejected[test.labels == 0].mean()),
        "detection_rate": float(rejected[test.labels == 1].mean()),
        "detection_rate_per_defect": {d: float(rejected[defects == d].mean()) for d in test.defects},
    }


# --------------------------------------------------------------------------------------------
# The whole evaluation


def image_auroc_differences(defects: Sequence[str], scores: np.ndarray, reference: np.ndarray) -> dict:
    """Image AUROC of ``scores`` minus ``reference``'s on the same images (``defects``: each image's
    type, "good" for normal ones), overall and per defect type (each type against the good images),
    with 95 % paired bootstrap intervals (``metrics.paired_auroc_difference``): on a few dozen
    defective images a point of AUROC can be sampling noise."""
    defects = np.asarray(defects)
    scores, reference = np.asarray(scores), np.asarray(reference)
    out = {}
    for d in sorted(set(defects.tolist()) - {"good"}) + ["overall"]:
        sel = np.ones(len(defects), bool) if d == "overall" else (defects == "good") | (defects == d)
        out[d] = metrics.paired_auroc_difference((defects[sel] != "good").astype(int), scores[sel], reference[sel])
    return out


def evaluate_bundle(
    bundle_dir: str | Path,
    data: str | Path,
    *,
    backend: str = "onnxruntime",
    precision: str | None = None,
    batch_size: int = 8,
    baseline: str | None = None,
    baseline_train_images: int | None = None,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate an engine (and optionally the kNN baseline) on an MVTec-style category.

    Returns the report dict (also written to ``out_dir/evaluation.json`` with the plots when
    ``out_dir`` is given). Images per second include decoding and preprocessing.
    """
    from ..runtime import load

    log = log or (lambda _m: None)
    if out_dir is not None:
        out_dir = output_folder(out_dir)
    if baseline is not None and baseline not in BASELINES:
        raise InputError(f"unknown baseline {baseline!r}: choose one of {', '.join(BASELINES)}")
    # --device is the torch backend's and the kNN baseline's: ONNX Runtime takes its best providers
    # (a CUDA kNN search beside a CPU-only onnxruntime is a normal set-up).
    runtime = load(bundle_dir, backend, precision=precision, device=device if backend == "torch" else "cpu")
    manifest = runtime.manifest
    threshold = manifest_threshold(manifest, bundle_dir)  # a bad one stops here, before any image is read
    test = load_test_set(data, runtime.preprocessing)
    # A production category may have no masks at all: image AUROC still means something, pixel
    # metrics cannot; say so once rather than fail or print a silent "n/a".
    pixel_metrics = "available" if any(s.mask_path is not None for s in test.samples) else "not available: no ground-truth masks"
    if pixel_metrics != "available":
        log(f"warning: no ground-truth masks in {Path(data) / 'ground_truth'}: image metrics only "
            "(pixel AUROC and PRO are not available)")
    log(f"evaluating {len(test.samples)} test images ({', '.join(test.defects)} + good) with {backend}")
    protoad, maps, scores = _evaluate_runtime(runtime, test, backend=backend, batch_size=batch_size, progress=progress)
    if threshold is not None:
        protoad["at_threshold"] = at_threshold(test, scores, threshold)
    methods, all_scores = {"protoad": protoad}, {"protoad": scores}
    # ONNX Runtime's idle worker threads spin for a while and would slow the baseline's matmuls.
    del runtime
    if baseline == "knn":
        methods["knn"], all_scores["knn"] = _evaluate_knn(bundle_dir, manifest, test, device=device, batch_size=batch_size,
                                                          train_images=baseline_train_images, progress=progress, log=log)
        protoad["image_auroc_minus_knn"] = image_auroc_differences([s.defect for s in test.samples], scores,
                                                                   all_scores["knn"])
    report = _report(bundle_dir, data, test, device=device, map_shape=maps.shape, pixel_metrics=pixel_metrics,
                     threshold=threshold, methods=methods, all_scores=all_scores)
    if out_dir is not None:
        from .plots import write_plots

        report["plots"] = write_plots(out_dir, test.labels, [s.defect for s in test.samples], all_scores, threshold)
        atomic_write_json(out_dir / "evaluation.json", report)
    return report


def _evaluate_runtime(runtime, test: TestSet, *, backend: str, batch_size: int,
                      progress: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """The engine's report entry (metrics, speed, prototypes), maps [N, H, W] and scores [N] on
    the test set."""
    from ..runtime import predict_paths

    paths = [s.path for s in test.samples]
    t0 = time.perf_counter()
    pred = predict_paths(runtime, paths, batch_size, progress=progress, desc="ProtoAD")
    maps, scores, secs = pred.maps, pred.scores, time.perf_counter() - t0
    protos = runtime.manifest["prototypes"]
    entry = {
        "metrics": score_metrics(test, scores, maps), "seconds": round(secs, 2),
        "images_per_second": round(len(paths) / secs, 2), "backend": backend, "precision": runtime.precision,
        "prototypes": protos["count"], "prototypes_mib_fp32": round(protos["count"] * protos["dim"] * 4 / 2**20, 2),
    }
    return entry, maps, scores


def _evaluate_knn(bundle_dir: str | Path, manifest: dict, test: TestSet, *, device: str, batch_size: int,
                  train_images: int | None, progress: bool, log: Callable[[str], None]) -> tuple[dict, np.ndarray]:
    """The exact kNN baseline's report entry and scores [N] on the test set (``knn.py``)."""
    from ..runtime import predict_paths
    from .knn import KnnBaseline, bank_images

    paths = [s.path for s in test.samples]
    bank = bank_images(manifest, train_images)
    log(f"kNN baseline: memory bank of all patches of {len(bank)} training images")
    knn = KnnBaseline(bundle_dir, manifest, bank, device=device, batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    kpred = predict_paths(knn, paths, batch_size, progress=progress, desc="kNN")
    kmaps, kscores, ksecs = kpred.maps, kpred.scores, time.perf_counter() - t0
    grid = manifest["train"]["grid"]
    per_image = 2 * grid[0] * grid[1] * knn.bank.shape[0] * knn.bank.shape[1]
    entry = {
        "metrics": score_metrics(test, kscores, kmaps), "seconds": round(ksecs, 2),
        "images_per_second": round(len(paths) / ksecs, 2), **knn.info(),
        "search_gflop_per_image": round(per_image / 1e9, 1),
        "bank_subsampled": train_images is not None,
    }
    return entry, kscores


def _report(bundle_dir: str | Path, data: str | Path, test: TestSet, *, device: str, map_shape: tuple[int, ...],
            pixel_metrics: str, threshold: float | None, methods: dict, all_scores: dict[str, np.ndarray]) -> dict:
    """The evaluation report (``evaluation.json``) around the methods' entries."""
    return {
        "engine": str(Path(bundle_dir).resolve()), "data": str(Path(data).resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": device},
        "test_images": {"total": len(test.samples), "good": int((test.labels == 0).sum()),
                        "per_defect": {d: sum(s.defect == d for s in test.samples) for d in test.defects},
                        "image_level_only": [str(s.path) for s, ok in zip(test.samples, test.pixel_ok) if not ok]},
        "map_resolution": [int(map_shape[1]), int(map_shape[2])],
        "pixel_metrics": pixel_metrics,
        "threshold": threshold,
        "methods": methods,
        # Per image, so that differences between methods can be tested image by image (paired).
        "image_scores": [{"image": os.path.relpath(s.path, data), "defect": s.defect,
                          **{name: float(v[i]) for name, v in all_scores.items()}}
                         for i, s in enumerate(test.samples)],
    }


def format_table(report: dict) -> str:
    """The terminal table: one row per defect type and overall, one column group per method."""
    methods = report["methods"]
    head = f"{'defect':<14}{'images':>7}"
    for name in methods:
        head += f" | {name + ' img':>11} {'pix':>6} {'PRO':>6}"
    lines = [head, "-" * len(head)]
    first = next(iter(methods.values()))["metrics"]
    rows = [(d, first["per_defect"][d]["images"]) for d in first["per_defect"]] + [("overall", first["overall"]["images"])]

    def fmt(v):
        return f"{100 * v:6.1f}" if v is not None else "   n/a"

    for key, n in rows:
        line = f"{key:<14}{n:>7}"
        for m in methods.values():
            r = m["metrics"]["overall"] if key == "overall" else m["metrics"]["per_defect"][key]
            line += f" | {fmt(r['image_auroc']):>11} {fmt(r['pixel_auroc'])} {fmt(r['pro'])}"
        lines.append(line)
    lines.append("")
    for name, m in methods.items():
        size = (f"{m['prototypes']:,} prototypes ({m['prototypes_mib_fp32']} MiB)" if name == "protoad"
                else f"bank {m['bank_patches']:,} patches of {m['bank_images']} images ({m['bank_mib_fp32']} MiB), "
                     f"{m['search_gflop_per_image']} GFLOP/image search, bank built in {m['bank_seconds']} s")
        lines.append(f"{name}: {m['images_per_second']} images/s; {size}")
    diffs = methods["protoad"].get("image_auroc_minus_knn")
    if diffs:
        lines.append("protoad - knn image AUROC, 95 % paired bootstrap interval: " + "; ".join(
            f"{k} {100 * v['difference']:+.1f} [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}]" for k, v in diffs.items()))
    if "at_threshold" in methods["protoad"]:
        t = methods["protoad"]["at_threshold"]
        lines.append(f"at threshold {t['threshold']:.4f}: false-reject rate {100 * t['false_reject_rate']:.1f} %, "
                     f"detection rate {100 * t['detection_rate']:.1f} %")
    return "\n".join(lines)
