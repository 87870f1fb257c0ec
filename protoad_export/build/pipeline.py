"""``build``: a folder of normal images -> an engine directory (prototypes, ONNX FP32 and FP16, manifest).

The Python API behind ``protoad-export build``. Everything is assembled in a staging directory
beside the destination and swapped in at the end, so a failed or killed build leaves any earlier
engine directory of the same name untouched.
"""

from __future__ import annotations

import copy
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from .. import __version__
from ..bundle import atomic_path, commit_directory, output_folder, staging_directory, write_manifest
from ..model.backbones import get_spec, load_backbone
from ..errors import InputError
from ..model.features import FeatureExtractor, PatchFeatures, extract_features, resolve_device
from ..clustering.finch import searches_on_cpu
from ..data.images import Preprocessing, image_size
from ..data.datasets import is_mvtec_category, training_images
from ..model.network import ProtoADNetwork, patch_grid
from ..contract import InputContract
from ..export.onnx import inspect_graph, export_onnx
from ..clustering.prototypes import fit_prototypes, near_miss, sample_rows
from ..options import ALIGN_MODES, DEFAULT_MAX_PROTOTYPES, NEIGHBOUR_METHODS, PROTOTYPE_CHUNK, similarity_batch
from .golden import write_golden
from .resources import check_build_resources
from ..evaluation.thresholds import score_holdout, split_holdout

MIN_TRAIN_IMAGES = 5
MAX_SKIPPED_SHARE = 0.1
PROTOTYPES_FILE = "prototypes.npy"
ONNX_FILES = {"fp32": "model.fp32.onnx", "fp16": "model.fp16.onnx"}


def parse_batch_profile(text: str) -> tuple[int, int, int]:
    """``MIN:OPT:MAX`` -> ints with 1 <= MIN <= OPT <= MAX."""
    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"batch profile must be MIN:OPT:MAX integers, got {text!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {text}")
    return lo, opt, hi


@dataclass
class BuildConfig:
    """Every option of a build, validated on construction (scikit-learn style: fail early, say why)."""

    backbone: str = "wide_resnet50_2"
    weights: str | None = None
    max_prototypes: int = DEFAULT_MAX_PROTOTYPES
    align: str = "bilinear"
    normalize_prototypes: bool = True  # measured better on every metric (benchmarks/RESULTS.md)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    device: str = "auto"
    batch_profile: tuple[int, int, int] = (1, 8, 32)
    batch_size: int = 16
    neighbours: str = "auto"
    max_train_patches: int | None = None  # off: cluster every patch; else a seeded uniform sample
    holdout: float = 0.1  # share of normal images kept back for threshold calibration
    prototype_chunk: int = PROTOTYPE_CHUNK  # prototypes per conv of the graph (network.py)

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        if self.align not in ALIGN_MODES:
            raise InputError(f"unknown align mode {self.align!r}: choose one of {', '.join(ALIGN_MODES)}")
        if not isinstance(self.max_prototypes, int) or self.max_prototypes < 2:
            raise InputError(f"max prototypes must be an integer >= 2, got {self.max_prototypes!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.neighbours not in NEIGHBOUR_METHODS:
            raise InputError(f"unknown neighbour method {self.neighbours!r}")
        if self.max_train_patches is not None and (
            isinstance(self.max_train_patches, bool) or not isinstance(self.max_train_patches, int)
            or self.max_train_patches < self.max_prototypes
        ):
            raise InputError(
                f"max train patches must be an integer >= max prototypes ({self.max_prototypes}), got {self.max_train_patches!r}"
            )
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0.0 <= self.holdout < 1.0:
            raise InputError(f"holdout must be a share in [0, 1), got {self.holdout!r}")
        if isinstance(self.prototype_chunk, bool) or not isinstance(self.prototype_chunk, int) or self.prototype_chunk < 1:
            raise InputError(f"prototype chunk must be a positive integer, got {self.prototype_chunk!r}")
        lo, opt, hi = self.batch_profile
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")


@dataclass
class BuildResult:
    engine_dir: Path
    manifest: dict
    network: ProtoADNetwork


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "protoad_export": __version__}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warn_if_cropping_parts(paths: list[Path], prep: Preprocessing, log: Callable[[str], None]) -> None:
    """The centre crop keeps crop/resize of the shorter side and the middle of the longer one: on
    elongated parts it throws most of the part away (58 % of the magnetic tiles' defect pixels)."""
    sizes = []
    for path in paths[:: max(1, len(paths) // 50)]:
        try:
            sizes.append(image_size(path))
        except InputError:
            continue  # reported with the other unreadable files during feature extraction
    if not sizes:
        return
    aspect = float(np.median([max(w, h) / min(w, h) for w, h in sizes]))
    if aspect > 1.25:
        kept = prep.crop / (prep.resize * aspect)
        log(f"warning: the images are not square (median aspect 1:{aspect:.1f}); the centre crop keeps about "
            f"{kept:.0%} of each part's long side: consider --resize-mode letterbox (see benchmarks/RESULTS.md)")


def build(
    data: str | Path,
    name: str,
    out: str | Path = "engines",
    config: BuildConfig | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> BuildResult:
    """Fit prototypes on the normal images in ``data`` and write ``out/name`` (see README: artifacts)."""
    config = config or BuildConfig()
    log = log or (lambda _msg: None)
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"engine name must be a plain folder name, got {name!r}")
    output_folder(out)
    paths = training_images(data)
    if len(paths) < MIN_TRAIN_IMAGES:
        raise InputError(f"{len(paths)} normal images found in {data}; at least {MIN_TRAIN_IMAGES} are needed")
    paths, held_out = split_holdout(paths, config.holdout, MIN_TRAIN_IMAGES)
    device = resolve_device(config.device)
    prep = get_spec(config.backbone).preprocessing(config.preprocessing)
    if prep.mode == "crop":
        _warn_if_cropping_parts(paths, prep, log)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    backbone = load_backbone(config.backbone, config.weights)
    grid = patch_grid(prep.crop, backbone.spec.strides[0])
    patch_features = PatchFeatures(backbone.module, config.align, grid)
    timings["backbone"] = time.perf_counter() - t0
    # Before any work: a build that cannot fit stops here, not at an out-of-memory kill later.
    n_features = len(paths) * grid * grid
    n_clustered, dim = min(n_features, config.max_train_patches or n_features), backbone.spec.feature_dim
    check_build_resources(n_features, n_clustered, dim, out, searches_on_cpu(n_clustered, dim, config.neighbours, device),
                          config.max_prototypes)

    final_dir = Path(out) / name
    staging = staging_directory(final_dir)
    workdir = staging_directory(final_dir, kind="scratch")
    try:
        t0 = time.perf_counter()
        log(f"[1/4] features: {len(paths)} images, {config.backbone} on {device.type}")
        torch.manual_seed(0)
        extracted = extract_features(
            FeatureExtractor(patch_features, prep), paths, prep, workdir / "features.npy",
            batch_size=config.batch_size, device=device, progress=progress,
        )
        if extracted.skipped:
            listed = "; ".join(f"{p.name}" for p, _ in extracted.skipped[:10])
            log(f"warning: skipped {len(extracted.skipped)} unreadable images: {listed}")
            if len(extracted.skipped) > MAX_SKIPPED_SHARE * len(paths) or len(extracted.used) < MIN_TRAIN_IMAGES:
                raise InputError(
                    f"{len(extracted.skipped)} of {len(paths)} images are unreadable (first: {extracted.skipped[0][1]})"
                )
        timings["features"] = time.perf_counter() - t0
        log(f"      {extracted.array.shape[0]:,} patch features of {extracted.array.shape[1]} dims ({timings['features']:.1f} s)")

        t0 = time.perf_counter()
        train_features = extracted.array
        rows = sample_rows(len(train_features), config.max_train_patches)
        if rows is not None:
            train_features = train_features[rows]  # reads only the sampled rows
            log(f"      --max-train-patches: a seeded uniform sample of {len(rows):,} patches")
        log(f"[2/4] FINCH: stop below {config.max_prototypes:,} clusters")
        fit = fit_prototypes(
            train_features, config.max_prototypes, config.normalize_prototypes, config.neighbours,
            device, log=lambda m: log("      " + m),
        )
        timings["clustering"] = time.perf_counter() - t0
        with atomic_path(staging / PROTOTYPES_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, fit.prototypes, allow_pickle=False)
        log(f"      {len(fit.prototypes):,} prototypes ({timings['clustering']:.1f} s)")
        passed = near_miss(fit.finch.partition_sizes, config.max_prototypes)
        if passed is not None:
            log(f"warning: FINCH passed over a partition of {passed:,} clusters, just above --max-prototypes "
                f"{config.max_prototypes:,}, for {len(fit.prototypes):,}; fewer prototypes usually score lower "
                f"(--max-prototypes {passed + 1} keeps the {passed:,})")

        t0 = time.perf_counter()
        log("[3/4] ONNX: tracing the complete network, FP32 and FP16")
        contract = InputContract("tensor", prep.crop)
        graphs = {}
        network = None
        for precision, filename in ONNX_FILES.items():
            # ProtoADNetwork casts its feature module in place: the FP16 graph gets its own copy.
            features = copy.deepcopy(patch_features) if precision == "fp16" else patch_features
            net = ProtoADNetwork(features, fit.prototypes, prep, precision, chunk=config.prototype_chunk).eval()
            export_onnx(net, staging / filename, contract)
            report = inspect_graph(onnx.load(str(staging / filename)))
            graphs[precision] = {"file": filename, "opset": report.opset, "ops": report.ops,
                                 "casts": report.cast_targets, "conv_input_dtypes": report.conv_dtypes}
            if precision == "fp32":
                network = net
        timings["export"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # Scored with the FP32 network just fitted, so calibration needs no second pass over the data.
        batch = similarity_batch(len(fit.prototypes), extracted.grid, config.batch_size, config.prototype_chunk)  # bounded memory
        holdout = score_holdout(network, held_out, prep, config.holdout, device, batch)
        timings["holdout"] = time.perf_counter() - t0

        log("[4/4] manifest")
        manifest = {
            "tool": "protoad-export",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backbone": {
                "name": backbone.spec.name, "architecture": backbone.spec.architecture, "weights": backbone.weights_source,
                "weights_sha256": backbone.weights_sha256, "channels": list(backbone.spec.channels),
                "feature_dim": backbone.spec.feature_dim,
            },
            "preprocessing": prep.to_dict(),
            "align": config.align,
            "input": contract.to_manifest(),
            "outputs": {"anomaly_map": ["batch", 1, prep.crop, prep.crop], "score": ["batch"]},
            "prototypes": {"file": PROTOTYPES_FILE, "count": int(len(fit.prototypes)),
                           "dim": int(fit.prototypes.shape[1]), "normalized": fit.normalized,
                           "max_prototypes": config.max_prototypes, "chunk": config.prototype_chunk},
            "finch": {"partition_sizes": fit.finch.partition_sizes, "neighbours": fit.finch.neighbour_methods,
                      "seconds_per_level": [round(s, 3) for s in fit.finch.seconds], "passed_over_near_miss": passed},
            "onnx": graphs,
            "batch_profile": {"min": config.batch_profile[0], "opt": config.batch_profile[1], "max": config.batch_profile[2]},
            "train": {"data": str(Path(data).resolve()), "images": len(extracted.used),
                      "skipped": [p.name for p, _ in extracted.skipped], "patches": int(extracted.array.shape[0]),
                      "patches_clustered": int(len(train_features)), "max_train_patches": config.max_train_patches,
                      "grid": list(extracted.grid)},
            "test_data": str(Path(data).resolve()) if is_mvtec_category(data) else None,
            "holdout": holdout,
            "build": {"device": device.type, "seconds": {k: round(v, 3) for k, v in timings.items()},
                      "peak_rss_mib": round(peak_rss_mib(), 1)},
            "versions": _versions(),
            "files": {PROTOTYPES_FILE: None, **{f: None for f in ONNX_FILES.values()}},
        }

        # Golden outputs for `verify` on the target: PyTorch FP32 on hold-out images and synthetic defects.
        manifest["golden"] = write_golden(network, contract, prep, staging, holdout=held_out, fitting=extracted.used)
        manifest["files"].update(dict.fromkeys(manifest["golden"]["files"]))

        write_manifest(staging, manifest)
        del extracted
        commit_directory(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from ..bundle import read_manifest

    return BuildResult(final_dir, read_manifest(final_dir), network)
