"""``bench``: is every backend right (fidelity, in the manner of Polygraphy), and how fast is it (trtexec)?

Fidelity compares each backend with the PyTorch FP32 module on the same real images: max and mean
absolute error of the anomaly maps and of the scores, an elementwise ``|out - ref| <= atol + rtol *
|ref|`` check (Polygraphy's ``--atol``/``--rtol``, numpy's ``allclose``), and, where labels exist,
each backend's image and pixel AUROC (a backend may also not lose more than ``auroc_tol``).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..bundle import atomic_write_json, read_manifest
from ..errors import InputError, MissingDependencyError, ProtoADError, ToleranceError
from ..data.datasets import TestSet
from ..options import BACKEND_SPECS, DEFAULT_TOLERANCES
from ..build.resources import check_batch_memory
DEFAULT_AUROC_TOL = 0.01


@dataclass
class TestImages:
    """Bench images: a category's test set (labels, masks, valid pixels) or a plain folder (none)."""

    paths: list[Path]
    source: str
    test: TestSet | None = None
    __test__ = False  # not a pytest class


@dataclass
class Fidelity:
    """One backend against the PyTorch FP32 reference (Polygraphy-style comparison)."""

    backend: str
    precision: str
    providers: list[str] | None
    map_max_abs: float
    map_mean_abs: float
    score_max_abs: float
    score_mean_abs: float
    atol: float
    rtol: float
    allclose: bool
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    auroc_drop: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def load_test_images(manifest: dict, data: str | Path | None, limit: int | None = None) -> TestImages:
    """``data`` (an MVTec-style category or a folder of images), else the manifest's ``test_data``;
    ``limit`` images evenly spread over the sorted set (the rule ``eval`` and the hold-out use)."""
    from ..data.datasets import evenly_spaced, is_mvtec_category, list_images, load_test_set
    from ..data.images import Preprocessing

    if data is None:
        data = manifest.get("test_data")
        if data is None:
            raise InputError("no test images: this bundle records no test data; pass --data DIR")
        if not Path(data).is_dir():
            raise InputError(f"the test data recorded at build time is not on this machine ({data}); pass --data DIR")
    data = Path(data)
    if not data.exists():
        raise InputError(f"data folder not found: {data}")
    if (data / "test").is_dir() or is_mvtec_category(data):
        test = load_test_set(data, Preprocessing.from_manifest(manifest), limit=limit)
        return TestImages([s.path for s in test.samples], str(data), test)
    paths = list_images(data)
    return TestImages(evenly_spaced(paths, limit) if limit else paths, str(data))


def run_all(runtime, images: TestImages, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Predict every test image in batches: (maps [N, H, W], scores [N])."""
    from ..runtime import predict_paths

    pred = predict_paths(runtime, images.paths, batch_size=batch_size)
    return pred.maps, pred.scores


def _aurocs(images: TestImages, maps: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    from .metrics import image_auroc, pixel_auroc

    img = pix = None
    test = images.test
    if test is not None and 0 < test.labels.sum() < len(test.labels):
        img = image_auroc(test.labels, scores)
    if test is not None and test.masks.any():
        # The same pixels as eval: letterbox padding is no part of the product.
        pix = pixel_auroc(test.masks, maps, test.valid)
    return img, pix


def compare(name: str, precision: str, maps: np.ndarray, scores: np.ndarray, ref_maps: np.ndarray,
            ref_scores: np.ndarray, images: TestImages, ref_aurocs: tuple[float | None, float | None],
            atol: float, rtol: float, auroc_tol: float, providers: list[str] | None = None) -> Fidelity:
    """Errors, the allclose check and AUROCs of one backend's outputs against the reference's."""
    map_err = np.abs(maps.astype(np.float64) - ref_maps)
    score_err = np.abs(scores.astype(np.float64) - ref_scores)
    failures = []
    finite = bool(np.isfinite(maps).all() and np.isfinite(scores).all())
    if not finite:
        failures.append("non-finite outputs")
    ok_maps = bool(np.all(map_err <= atol + rtol * np.abs(ref_maps)))
    ok_scores = bool(np.all(score_err <= atol + rtol * np.abs(ref_scores)))
    if not ok_maps:
        failures.append(f"map error {map_err.max():.3g} > atol {atol:g} + rtol {rtol:g} x |ref|")
    if not ok_scores:
        failures.append(f"score error {score_err.max():.3g} > atol {atol:g} + rtol {rtol:g} x |ref|")
    img, pix = _aurocs(images, maps, scores) if finite else (None, None)
    drops = [r - v for r, v in zip(ref_aurocs, (img, pix)) if r is not None and v is not None]
    drop = max(drops) if drops else None
    if drop is not None and drop > auroc_tol:
        failures.append(f"AUROC drop {drop:.4f} > {auroc_tol:g}")
    return Fidelity(name, precision, providers, float(map_err.max()), float(map_err.mean()), float(score_err.max()),
                    float(score_err.mean()), atol, rtol, ok_maps and ok_scores, img, pix, drop, failures)


def machine_info() -> dict[str, Any]:
    """CPU model, core count and GPU name, for the record next to every timing."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def open_backend(bundle_dir: Path, name: str, device: str):
    """Load one backend by its bench name (see BACKEND_SPECS)."""
    from ..runtime import load

    if name not in BACKEND_SPECS:
        raise InputError(f"unknown backend {name!r}: choose from {', '.join(BACKEND_SPECS)}")
    backend, precision, compiled = BACKEND_SPECS[name]
    if backend == "torch":
        return load(bundle_dir, "torch", precision=precision, device="cuda" if precision == "fp16" else device,
                    compile=compiled)
    return load(bundle_dir, backend, precision=precision)


def default_backends(device: str) -> list[str]:
    """Every backend that can run here: ONNX Runtime always, torch FP16 and TensorRT on a GPU."""
    names = ["onnxruntime", "onnxruntime-fp16"]
    if device == "cuda":
        names = ["torch-fp16", "torch-fp16-compile", *names]
        from ..export import tensorrt as engine

        if engine.missing_requirements() is None:
            names.append("tensorrt")
    return names


def bench(
    bundle_dir: str | Path,
    *,
    backends: Sequence[str] | None = None,
    data: str | Path | None = None,
    limit: int | None = None,
    fps: bool = False,
    batch_sizes: Sequence[int] = (1, 8, 32),
    device: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    auroc_tol: float = DEFAULT_AUROC_TOL,
    warmup: int = 10,
    iterations: int = 100,
    min_seconds: float = 0.0,
    batch_size: int = 8,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Fidelity of every backend against PyTorch FP32, then (with ``fps``) speed per batch size.

    Returns the report (as written by ``--json``); raises ToleranceError after reporting when any
    backend exceeds a tolerance. ``atol``/``rtol`` default per precision (DEFAULT_TOLERANCES).
    """
    log = log or (lambda _msg: None)
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, verify=True)
    from ..model.features import resolve_device

    device = resolve_device(device).type
    requested = list(backends or [])
    backends = list(backends or default_backends(device))
    _check_bench_options(backends, batch_sizes)
    if fps:
        # Each timed batch is decoded and held whole: a batch that cannot fit stops here, not at a
        # MemoryError after the fidelity run.
        check_batch_memory(batch_sizes, manifest)
    images = load_test_images(manifest, data, limit)
    log(f"fidelity: {len(images.paths)} images from {images.source}, reference PyTorch FP32 on {device}")

    reference = open_backend(bundle_dir, "torch", device)
    ref_maps, ref_scores = run_all(reference, images, batch_size)
    ref_aurocs = _aurocs(images, ref_maps, ref_scores)
    report: dict[str, Any] = {
        "bundle_dir": str(bundle_dir), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "device": device,
        "model": {"backbone": manifest["backbone"]["name"], "prototypes": manifest["prototypes"]["count"],
                  "crop": manifest["preprocessing"]["crop"],
                  "width": manifest["preprocessing"].get("width", manifest["preprocessing"]["crop"])},
        "data": {"source": images.source, "images": len(images.paths),
                 "defective": None if images.test is None else int(images.test.labels.sum())},
        "reference": {"backend": "torch", "precision": "fp32", "image_auroc": ref_aurocs[0], "pixel_auroc": ref_aurocs[1]},
        "fidelity": [], "speed": [], "skipped": {}, "requested": requested,
    }
    runtimes = _check_fidelity(report, bundle_dir, backends, reference=reference, images=images,
                               reference_outputs=(ref_maps, ref_scores), ref_aurocs=ref_aurocs, device=device,
                               atol=atol, rtol=rtol, auroc_tol=auroc_tol, batch_size=batch_size, log=log)
    if fps:
        _time_backends(report, {"torch": reference, **runtimes}, images, manifest, batch_sizes=batch_sizes,
                       warmup=warmup, iterations=iterations, min_seconds=min_seconds)
    return report


def _check_bench_options(backends: Sequence[str], batch_sizes: Sequence[int]) -> None:
    """Refuse unknown backend names and batch sizes that are not positive integers, before any
    image is decoded."""
    for name in backends:
        if name not in BACKEND_SPECS:
            raise InputError(f"unknown backend {name!r}: choose from {', '.join(BACKEND_SPECS)}")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")


def _check_fidelity(report: dict[str, Any], bundle_dir: Path, backends: Sequence[str], *, reference, images: TestImages,
                    reference_outputs: tuple[np.ndarray, np.ndarray], ref_aurocs: tuple[float | None, float | None],
                    device: str, atol: float | None, rtol: float | None, auroc_tol: float, batch_size: int,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Run each backend on ``images`` and append its comparison with the reference to
    ``report["fidelity"]`` (or its reason to ``report["skipped"]``); returns the runtimes opened."""
    ref_maps64, ref_scores64 = (a.astype(np.float64) for a in reference_outputs)
    runtimes = {}
    for name in backends:
        try:
            rt = reference if name == "torch" else open_backend(bundle_dir, name, device)
        except ProtoADError as exc:
            if name == "tensorrt" or name.startswith("torch-fp16"):
                report["skipped"][name] = str(exc)  # optional backends: say why and go on
                log(f"  {name}: skipped ({exc})")
                continue
            raise
        runtimes[name] = rt
        precision = BACKEND_SPECS[name][1]
        a, r = DEFAULT_TOLERANCES[precision]
        maps, scores = run_all(rt, images, batch_size)
        fid = compare(name, precision, maps, scores, ref_maps64, ref_scores64, images, ref_aurocs,
                      a if atol is None else atol, r if rtol is None else rtol, auroc_tol,
                      getattr(rt, "providers", None))
        report["fidelity"].append(asdict(fid) | {"passed": fid.passed})
    return runtimes


def _time_backends(report: dict[str, Any], timed: dict[str, Any], images: TestImages, manifest: dict, *,
                   batch_sizes: Sequence[int], warmup: int, iterations: int, min_seconds: float) -> None:
    """Time each runtime at each batch size its profile allows, into ``report["speed"]``."""
    from ..runtime import preprocess_paths
    from .timing import time_runtime

    for b in batch_sizes:
        # The first b test images (cycled when there are fewer): timing on real pictures.
        paths = [images.paths[i % len(images.paths)] for i in range(b)]
        batch = preprocess_paths(paths, manifest)
        for name, rt in timed.items():
            lo, hi = getattr(rt, "min_batch", 1), getattr(rt, "max_batch", None)
            if b < lo or (hi is not None and b > hi):
                report["skipped"][f"{name}@{b}"] = f"batch {b} is outside the engine's profile {lo}..{hi}"
                continue
            res = time_runtime(rt, batch, name, warmup, iterations, min_seconds)
            report["speed"].append(res.to_dict())


def check_tolerances(report: dict[str, Any]) -> None:
    """After the report is out: raise ToleranceError naming every backend that failed, or
    MissingDependencyError when a backend named by the caller could not run (a default run skips
    what this machine lacks; a named one that is skipped must not pass as measured)."""
    failed = [f"{f['backend']}: {'; '.join(f['failures'])}" for f in report["fidelity"] if not f["passed"]]
    if failed:
        raise ToleranceError("fidelity check failed: " + " | ".join(failed))
    missed = [f"{name}: {report['skipped'][name]}" for name in report.get("requested", []) if name in report["skipped"]]
    if missed:
        raise MissingDependencyError("requested backend not run: " + " | ".join(missed))


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """The report as JSON (atomically)."""
    atomic_write_json(path, json.loads(json.dumps(report, default=float)))
