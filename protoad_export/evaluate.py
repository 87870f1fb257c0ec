"""``eval``: an engine on a labelled MVTec-style category, optionally beside the exact kNN baseline.

Per defect type (that type's images against the good images) and overall: image AUROC, pixel
AUROC and PRO (``metrics.py``), throughput, and plots. Masks go through the engine's own
``Preprocessing.mask_array``, so maps and masks are compared at the crop resolution with the same
geometry. Defective images whose mask is missing or empty after preprocessing count at image
level only (their pixels would otherwise pass for normal ones).

The kNN baseline is PatchCore without coreset subsampling on the very same features: every patch
of the training images in a memory bank, anomaly = 1 - max cosine to the bank, then the network's
own bilinear upsampling and Gaussian blur. Exact search by blocked matrix products (CUDA if asked).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import metrics
from .artifacts import atomic_write_json, output_folder
from .errors import InputError
from .images import LabelledImage, category_test_set, image_size, mask_for, training_images
from .thresholds import evenly_spaced, manifest_threshold

BASELINES = ("knn",)
CPU_TILE = 1024  # rows and bank rows per tile of the kNN search on a CPU (nearest_similarity)


@dataclass
class TestSet:
    """Labelled test images with masks at the crop resolution."""

    samples: list[LabelledImage]
    labels: np.ndarray  # int [N]
    masks: np.ndarray  # bool [N, S, S]
    pixel_ok: np.ndarray  # bool [N]: usable for pixel metrics
    valid: np.ndarray  # bool [N, S, S]: pixels of the part (False on letterbox padding)

    @property
    def defects(self) -> list[str]:
        return sorted({s.defect for s in self.samples if s.defect != "good"})


def load_test_set(data: str | Path, prep) -> TestSet:
    """The category's test images, labels and masks through ``prep`` (the engine's geometry)."""
    samples = category_test_set(data, require_masks=False)
    masks = np.zeros((len(samples), prep.crop, prep.crop), dtype=bool)
    valid = np.zeros_like(masks)
    for i, s in enumerate(samples):
        masks[i] = mask_for(s, prep)  # scaled to its image first, then the image's geometry
        valid[i] = prep.valid_mask(*image_size(s.path))
    labels = np.array([s.label for s in samples])
    pixel_ok = (labels == 0) | masks.any(axis=(1, 2))
    if labels.all() or not labels.any():
        raise InputError(f"{data}: evaluation needs both good and defective test images")
    return TestSet(samples, labels, masks, pixel_ok, valid)


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
# kNN baseline


def bank_images(manifest: dict, max_images: int | None = None) -> list[Path]:
    """The engine's fitting images (training folder minus hold-out and skipped), evenly subsampled to ``max_images``."""
    data = Path(manifest["train"]["data"])
    if not data.exists():
        raise InputError(f"the kNN baseline needs the engine's training images, not found at {data}")
    excluded = set(manifest.get("holdout", {}).get("images", [])) | set(manifest["train"].get("skipped", []))
    paths = [p for p in training_images(data) if p.name not in excluded]
    if max_images is not None:
        if max_images < 1:
            raise InputError(f"--baseline-train-images must be >= 1, got {max_images}")
        paths = evenly_spaced(paths, min(max_images, len(paths)))
    return paths


def nearest_similarity(queries, bank, query_block: int | None = None, bank_block: int | None = None, *,
                       kernel: str | None = None, bank_low=None):
    """Max cosine of each unit query row [Q, C] to the unit ``bank`` rows [M, C] (torch tensors, same
    device), exactly, in blocks of at most query_block x bank_block similarities.

    On a CPU the products run in the fastest dense kernel measured (``kernels.choose``, or
    ``kernel``); a low-precision one's candidates within its error bound are re-scored in FP32
    (``neighbours.rescore_candidates``), so the result is FP32's. ``bank_low``: the bank already
    in that kernel's dtype (saves a conversion per call).

    On a CPU the default tiles (1024 x 1024) keep the 4 MiB of similarities in cache between the
    product and its row maxima: 286 GFLOPS on this project's 2-core machine against 149 with
    4096 x 16384 (RESULTS.md section 4c). A GPU gets large blocks (kernel launches limit it there).
    """
    import torch

    from . import kernels
    from .neighbours import rescore_candidates

    cpu = queries.device.type == "cpu"
    query_block = query_block or (CPU_TILE if cpu else 4096)
    bank_block = bank_block or (CPU_TILE if cpu else 16384)
    kern = kernels.choose(bank.shape[1], family="dense", force=kernel).name if cpu else "fp32"
    if kern != "fp32":
        dtype = kernels.dense_dtype(kern)
        bank_low = bank.to(dtype) if bank_low is None or bank_low.dtype != dtype else bank_low
        err = kernels.dense_error(kern, bank.shape[1])
    best = torch.full((len(queries),), -torch.inf, device=queries.device)
    for q in range(0, len(queries), query_block):
        rows = queries[q : q + query_block]
        rows_low = rows.to(bank_low.dtype) if kern != "fp32" else None
        for b in range(0, len(bank), bank_block):
            if kern == "fp32":
                sim = (rows @ bank[b : b + bank_block].T).amax(dim=1)
            else:
                approx = (rows_low @ bank_low[b : b + bank_block].T).float()
                sim = rescore_candidates(approx, rows, bank[b : b + bank_block], best[q : q + query_block], err).amax(dim=1)
            best[q : q + query_block] = torch.maximum(best[q : q + query_block], sim)
    return best


class NearestPatchScorer:
    """Scores each patch as 1 - its max cosine to the rows of ``self.bank`` (set by a subclass),
    then upsamples, blurs and takes the max exactly as ProtoAD's network does."""

    def __init__(self, engine_dir: str | Path, manifest: dict, device: str = "cpu") -> None:
        import torch

        from .features import FeatureExtractor
        from .network import GaussianBlur
        from .runtime import build_torch_network, preprocessing

        self.torch = torch
        self.device = torch.device(device)
        self.prep = preprocessing(manifest)
        net = build_torch_network(engine_dir, manifest, "fp32")
        self.extractor = FeatureExtractor(net.patch_features, self.prep).to(self.device).eval()
        self.blur = GaussianBlur(self.prep.crop, self.prep.crop).to(self.device)
        self.bank = None
        self.bank_low = None  # the bank in the dense kernel's dtype, once (False: FP32 products)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, S, S] in [0, 1] -> (maps [B, S, S], scores [B]), like ``Runtime.predict``."""
        torch = self.torch
        import torch.nn.functional as F

        with torch.no_grad():
            feats = self.extractor(torch.from_numpy(images).to(self.device))
            b, c, h, w = feats.shape
            if self.bank_low is None and self.device.type == "cpu":
                from . import kernels

                kern = kernels.choose(c, family="dense").name
                self.bank_low = self.bank.to(kernels.dense_dtype(kern)) if kern != "fp32" else False
            sim = nearest_similarity(feats.permute(0, 2, 3, 1).reshape(-1, c), self.bank,
                                     bank_low=self.bank_low if self.bank_low is not False else None)
            patch = (1.0 - sim).view(b, 1, h, w)
            size = (self.prep.crop, self.prep.crop)
            maps = self.blur(F.interpolate(patch, size=size, mode="bilinear", align_corners=False))
            scores = torch.amax(maps, dim=(1, 2, 3))
        return maps[:, 0].cpu().numpy(), scores.cpu().numpy()


class KnnBaseline(NearestPatchScorer):
    """Exact nearest-neighbour memory bank over all patches of ``paths`` (no subsampling)."""

    def __init__(self, engine_dir: str | Path, manifest: dict, paths: Sequence[Path], device: str = "cpu",
                 batch_size: int = 8, progress: bool = False) -> None:
        from .features import as_float32, extract_features

        super().__init__(engine_dir, manifest, device)
        torch = self.torch
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="protoad-knn-") as tmp, torch.no_grad():
            # Stored as FP16 like the features the prototypes were fitted on, then searched in FP32.
            feats = extract_features(self.extractor, list(paths), self.prep, Path(tmp) / "bank.npy",
                                     batch_size=batch_size, device=self.device, progress=progress, desc="kNN bank")
            self.bank = torch.from_numpy(as_float32(feats.array)).to(self.device)
            self.images = len(feats.used)
            del feats
        self.bank_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        rows, dim = self.bank.shape
        return {"bank_images": self.images, "bank_patches": int(rows), "dim": int(dim),
                "bank_mib_fp32": round(rows * dim * 4 / 2**20, 1), "bank_seconds": round(self.bank_seconds, 2),
                "search": f"exact, blocked torch matmul on {self.device.type}",
                "product_kernel": self._kernel()}

    def _kernel(self) -> str:
        from . import kernels

        if self.device.type != "cpu":
            return "fp32"
        return kernels.choose(self.bank.shape[1], family="dense").name


# --------------------------------------------------------------------------------------------
# The whole evaluation


def run_predictor(predictor, manifest: dict, paths: Sequence[Path], batch_size: int, progress: bool, desc: str):
    """Predict all paths in batches; returns (maps, scores, seconds) with decoding included in the time."""
    from tqdm.auto import tqdm

    from .runtime import preprocess_paths

    maps, scores = [], []
    t0 = time.perf_counter()
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            m, s = predictor.predict(preprocess_paths(chunk, manifest))
            maps.append(m.astype(np.float32))
            scores.append(s.astype(np.float32))
            bar.update(len(chunk))
    return np.concatenate(maps), np.concatenate(scores), time.perf_counter() - t0


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


def evaluate_engine(
    engine_dir: str | Path,
    data: str | Path,
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
    from .runtime import fitting_batch, load, preprocessing

    log = log or (lambda _m: None)
    if out_dir is not None:
        out_dir = output_folder(out_dir)
    if baseline is not None and baseline not in BASELINES:
        raise InputError(f"unknown baseline {baseline!r}: choose one of {', '.join(BASELINES)}")
    runtime = load(engine_dir, backend, precision, device)
    manifest = runtime.manifest
    test = load_test_set(data, preprocessing(manifest))
    paths = [s.path for s in test.samples]
    log(f"evaluating {len(paths)} test images ({', '.join(test.defects)} + good) with {backend}")
    # The prototype-similarity tensor bounds ProtoAD's batch; the kNN blocks its own search.
    maps, scores, secs = run_predictor(runtime, manifest, paths, fitting_batch(manifest, batch_size), progress, "ProtoAD")
    protos = manifest["prototypes"]
    methods = {"protoad": {
        "metrics": score_metrics(test, scores, maps), "seconds": round(secs, 2),
        "images_per_second": round(len(paths) / secs, 2), "backend": backend, "precision": runtime.precision,
        "prototypes": protos["count"], "prototypes_mib_fp32": round(protos["count"] * protos["dim"] * 4 / 2**20, 2),
    }}
    threshold = manifest_threshold(manifest)
    if threshold is not None:
        methods["protoad"]["at_threshold"] = at_threshold(test, scores, threshold)
    all_scores = {"protoad": scores}
    # ONNX Runtime's idle worker threads spin for a while and would slow the baseline's matmuls.
    del runtime
    if baseline == "knn":
        bank = bank_images(manifest, baseline_train_images)
        log(f"kNN baseline: memory bank of all patches of {len(bank)} training images")
        knn = KnnBaseline(engine_dir, manifest, bank, device, batch_size, progress)
        kmaps, kscores, ksecs = run_predictor(knn, manifest, paths, batch_size, progress, "kNN")
        grid = manifest["train"]["grid"]
        per_image = 2 * grid[0] * grid[1] * knn.bank.shape[0] * knn.bank.shape[1]
        methods["knn"] = {
            "metrics": score_metrics(test, kscores, kmaps), "seconds": round(ksecs, 2),
            "images_per_second": round(len(paths) / ksecs, 2), **knn.info(),
            "search_gflop_per_image": round(per_image / 1e9, 1),
            "bank_subsampled": baseline_train_images is not None,
        }
        all_scores["knn"] = kscores
        methods["protoad"]["image_auroc_minus_knn"] = image_auroc_differences([s.defect for s in test.samples], scores, kscores)
        del knn, kmaps
    report = {
        "engine": str(Path(engine_dir).resolve()), "data": str(Path(data).resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "device": device},
        "test_images": {"total": len(paths), "good": int((test.labels == 0).sum()),
                        "per_defect": {d: sum(s.defect == d for s in test.samples) for d in test.defects},
                        "image_level_only": [str(s.path) for s, ok in zip(test.samples, test.pixel_ok) if not ok]},
        "map_resolution": [int(maps.shape[1]), int(maps.shape[2])],
        "threshold": threshold,
        "methods": methods,
        # Per image, so that differences between methods can be tested image by image (paired).
        "image_scores": [{"image": os.path.relpath(s.path, data), "defect": s.defect,
                          **{name: float(v[i]) for name, v in all_scores.items()}}
                         for i, s in enumerate(test.samples)],
    }
    if out_dir is not None:
        from .plots import write_plots

        report["plots"] = write_plots(out_dir, test.labels, [s.defect for s in test.samples], all_scores, threshold)
        atomic_write_json(out_dir / "evaluation.json", report)
    return report


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
