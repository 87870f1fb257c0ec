"""``build``: a folder of normal images -> a bundle (prototypes, ONNX FP32 and FP16, manifest).

The Python API behind ``protoad-export build``. Everything is assembled in a staging directory
beside the destination and swapped in at the end, so a failed or killed build leaves any earlier
bundle of the same name untouched.
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from .. import __version__
from ..bundle import (atomic_path, build_lock, commit_directory, output_folder, read_manifest, replaceable_bundle,
                      staging_directory, write_manifest)
from ..model.backbones import get_spec, load_backbone
from ..errors import InputError
from ..model.features import FeatureExtractor, PatchFeatures, extract_features, resolve_device
from ..clustering.finch import searches_on_cpu
from ..clustering.kernels import forced_kernel
from ..data.geometry import choose_geometry
from ..data.images import Preprocessing, image_size
from ..data.datasets import is_mvtec_category, training_images
from ..model.network import ProtoADNetwork, patch_grid_hw
from ..contract import DECISION_RULE, InputContract, output_shapes
from ..export.onnx import inspect_graph, export_onnx
from ..clustering.levels import format_table, sample_patches
from ..clustering.prototypes import fit_prototypes, near_miss, sample_rows
from ..model.frames import FrameInput, FrameNetwork
from ..options import (ALIGN_MODES, AUTO, AUTO_MARGIN, AUTO_PROTOTYPE_CAP, CHANNEL_ORDERS, DEFAULT_BACKBONE,
                       DEFAULT_BATCH_PROFILE, DEFAULT_HOLDOUT, DEFAULT_INPUT, DEFAULT_MAX_PROTOTYPES, DEVICES, INPUT_CHOICES,
                       NEIGHBOUR_METHODS, PAPER_MAX_PROTOTYPES, PROTOTYPE_CHUNK, similarity_batch)
from .golden import write_golden
from .resources import check_build_resources, engine_file_bytes
from .holdout import empty_holdout_reason, score_holdout, split_holdout

MIN_TRAIN_IMAGES = 5
MAX_UPSCALE = 4.0  # a median upscaling above this is warned about (_warn_if_upscaling)
MAX_SKIPPED_SHARE = 0.1
PROTOTYPES_FILE = "prototypes.npy"
ONNX_FILES = {"fp32": "model.fp32.onnx", "fp16": "model.fp16.onnx"}
# File names end at 255 bytes on Linux, macOS and Windows file systems; the hidden staging folder
# of a build (``.NAME.<pid>.<random>.staging``) adds up to 27 bytes to the name.
MAX_NAME_BYTES = 200


def check_bundle_name(name: str) -> None:
    """InputError unless ``name`` can be a bundle folder beside its hidden staging folders."""
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"bundle name must be a plain folder name, got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InputError(f"bundle name is {len(name.encode())} bytes long; at most {MAX_NAME_BYTES} are allowed")


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

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    max_prototypes: int | str = DEFAULT_MAX_PROTOTYPES  # an int: the paper's rule; "auto": clustering/levels.py
    prototype_cap: int = AUTO_PROTOTYPE_CAP  # "auto" keeps at most this many prototypes
    align: str = ALIGN_MODES[0]
    normalize_prototypes: bool = True  # measured better on every metric (benchmarks/RESULTS.md)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    device: str = DEVICES[0]
    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE
    batch_size: int = 16
    neighbours: str = NEIGHBOUR_METHODS[0]
    max_train_patches: int | None = None  # off: cluster every patch; else a seeded uniform sample
    holdout: float = DEFAULT_HOLDOUT  # share of normal images kept back for threshold calibration
    prototype_chunk: int = PROTOTYPE_CHUNK  # prototypes per conv of the graph (network.py)
    # "frames": uint8 camera frames, preprocessing in the graph; "tensor": a float tensor; "auto": frames
    # when the training images share one size (a camera's), else tensor (a folder of crops)
    input: str = DEFAULT_INPUT
    input_size: tuple[int, int] | None = None  # (width, height) of the frames; None: the images' own
    channel_order: str = CHANNEL_ORDERS[0]

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        if self.align not in ALIGN_MODES:
            raise InputError(f"unknown align mode {self.align!r}: choose one of {', '.join(ALIGN_MODES)}")
        if self.max_prototypes != AUTO and (isinstance(self.max_prototypes, bool) or not isinstance(self.max_prototypes, int)
                                            or self.max_prototypes < 2):
            raise InputError(f"max prototypes must be '{AUTO}' or an integer >= 2, got {self.max_prototypes!r}")
        if isinstance(self.prototype_cap, bool) or not isinstance(self.prototype_cap, int) or self.prototype_cap < 2:
            raise InputError(f"prototype cap must be an integer >= 2, got {self.prototype_cap!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.neighbours not in NEIGHBOUR_METHODS:
            raise InputError(f"unknown neighbour method {self.neighbours!r}")
        forced_kernel()  # a bad PROTOAD_PRODUCT_KERNEL stops the build before any work
        if self.max_train_patches is not None and (
            isinstance(self.max_train_patches, bool) or not isinstance(self.max_train_patches, int)
            or self.max_train_patches < (2 if self.max_prototypes == AUTO else self.max_prototypes)
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
        if self.device not in DEVICES:
            raise InputError(f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if self.input not in INPUT_CHOICES:
            raise InputError(f"unknown input {self.input!r}: choose one of {', '.join(INPUT_CHOICES)}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise InputError(f"unknown channel order {self.channel_order!r}: choose one of {', '.join(CHANNEL_ORDERS)}")
        if self.input_size is not None:
            if self.input == "tensor":
                raise InputError("input_size is the camera frame's size: it needs input 'frames'")
            if len(self.input_size) != 2 or not all(isinstance(v, int) and 1 <= v <= 30_000 for v in self.input_size):
                raise InputError(f"input size must be (width, height) in pixels, got {self.input_size!r}")


    @property
    def prototype_limit(self) -> int:
        """The most prototypes this build can keep: ``max_prototypes``, or the cap under ``auto``."""
        return self.prototype_cap if self.max_prototypes == AUTO else self.max_prototypes


@dataclass
class BuildResult:
    """A finished build: the bundle's folder, its manifest, its input contract and the FP32 network
    (``ProtoADNetwork``, behind ``FrameInput`` for a frames bundle)."""

    bundle_dir: Path
    manifest: dict
    contract: InputContract
    network: torch.nn.Module


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


def _image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(width, height) of every readable image, from its header (no pixel is decoded)."""
    sizes = []
    for path in paths:
        try:
            sizes.append(image_size(path))
        except InputError:
            continue  # reported with the other unreadable files during feature extraction
    return sizes


def _warn_if_cropping_parts(sizes: list[tuple[int, int]], prep: Preprocessing, log: Callable[[str], None]) -> None:
    """The centre crop keeps crop/resize of the shorter side and the middle of the longer one: on
    elongated parts it throws most of the part away (58 % of the magnetic tiles' defect pixels)."""
    if not sizes:
        return
    aspect = float(np.median([max(w, h) / min(w, h) for w, h in sizes]))
    if aspect > 1.25:
        kept = prep.crop / (prep.resize * aspect)
        log(f"warning: the images are not square (median aspect 1:{aspect:.1f}); the centre crop keeps about "
            f"{kept:.0%} of each part's long side: consider --resize-mode letterbox, with --width for an input "
            f"of the parts' aspect ratio (see benchmarks/RESULTS.md)")


def _warn_if_upscaling(sizes: list[tuple[int, int]], prep: Preprocessing, log: Callable[[str], None]) -> None:
    """Images far smaller than the network's input are interpolated up: the prototypes then model
    the interpolation's blur, and defects of a pixel or two are smeared over many patches."""
    if not sizes:
        return
    scales = [max(rw / w, rh / h) for (w, h), ((rw, rh), _, _) in ((s, prep.geometry(*s)) for s in sizes)]
    scale = float(np.median(scales))
    if scale > MAX_UPSCALE:
        w, h = sizes[int(np.argsort(scales)[len(scales) // 2])]
        log(f"warning: the images are small ({w}x{h} pixels) and are upscaled {scale:.0f}x to the "
            f"{prep.input_size[0]}x{prep.input_size[1]} "
            f"input: small defects are blurred over many patches; a smaller --crop and --resize (at least 32) fit them better")


def _replacing_message(name: str, old: dict) -> str:
    """What a rebuild of ``name`` loses: a threshold is calibrated on the old prototypes' score scale."""
    threshold = old.get("threshold")
    value = threshold.get("value") if isinstance(threshold, dict) else None
    if isinstance(value, (int, float)):
        return f"warning: replacing bundle {name} (threshold {value:.6g} will be lost; re-run calibrate)"
    return f"replacing bundle {name}"


def _check_finite(values: np.ndarray, stage: str, remedy: str) -> None:
    """Stop a build whose ``stage`` produced NaN or infinite values: such a bundle would pass every part."""
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(f"{stage}: {bad:,} of {np.size(values):,} values are NaN or infinite ({remedy}); nothing was written")


def frame_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The one (width, height) every training image has; InputError listing the sizes otherwise."""
    counts = Counter(sizes)
    if len(counts) == 1:
        return next(iter(counts))
    seen = ", ".join(f"{w}x{h} ({n})" for (w, h), n in counts.most_common(3))
    raise InputError(f"the training images have {len(counts)} different sizes ({seen}{', ...' if len(counts) > 3 else ''}): "
                     "pass the camera frame's size (--input-size WxH) or --input tensor")


def _input_contract(config: BuildConfig, prep: Preprocessing, sizes: list[tuple[int, int]],
                    log) -> tuple[InputContract, dict]:
    """The graph's input: ``config.input``, with ``auto`` resolved (frames for one camera size), and
    the manifest's record of the choice."""
    kind, record = config.input, {"requested": config.input}
    if kind == "auto":
        kind = "frames" if config.input_size or len(set(sizes)) == 1 else "tensor"
        record["reason"] = ("the frame size given" if config.input_size else "one image size: a camera's frames"
                            if kind == "frames" else f"{len(set(sizes))} image sizes: not one camera's frames")
        if kind == "tensor":
            log(f"input: the training images come in {len(set(sizes))} sizes (not one camera's frames): a float "
                "tensor input, preprocessed by the runtime; --input-size WxH makes a frames graph for one camera")
    record["chosen"] = kind
    if kind == "frames":
        width, height = config.input_size or frame_size(sizes)
        return InputContract("frames", prep.crop, width, height, config.channel_order, prep.width), record
    return InputContract("tensor", prep.crop, model_width=prep.width), record


@dataclass
class _Plan:
    """What a build knows before it reads a pixel."""

    paths: list[Path]
    held_out: list[Path]
    found: int
    no_holdout: str | None
    device: torch.device
    prep: Preprocessing
    contract: InputContract
    backbone: object
    patch_features: PatchFeatures
    grid: tuple[int, int]  # (rows, columns)
    choices: dict  # what "auto" options became and why, for the manifest


def _plan(data: str | Path, out: str | Path, config: BuildConfig, log: Callable[[str], None]) -> _Plan:
    """Images, hold-out, geometry, input contract and backbone; stops before any work when the
    build cannot fit in memory or on disk."""
    paths = training_images(data)
    if len(paths) < MIN_TRAIN_IMAGES:
        raise InputError(f"{len(paths)} normal images found in {data}; at least {MIN_TRAIN_IMAGES} are needed")
    found = len(paths)
    paths, held_out = split_holdout(paths, config.holdout, MIN_TRAIN_IMAGES)
    no_holdout = empty_holdout_reason(config.holdout, found, MIN_TRAIN_IMAGES, len(held_out))
    if no_holdout and config.holdout > 0:
        log(f"warning: no hold-out kept: {no_holdout}; calibrate will need --data, or predict a --threshold")
    device = resolve_device(config.device)
    sizes = _image_sizes(paths + held_out)
    prep, geometry = choose_geometry(get_spec(config.backbone).preprocessing(config.preprocessing), sizes)
    if "reason" in geometry:
        log(f"geometry: {geometry['reason']}")
    contract, input_choice = _input_contract(config, prep, sizes, log)
    if prep.mode == "crop":
        _warn_if_cropping_parts(sizes, prep, log)
    _warn_if_upscaling(sizes, prep, log)
    backbone = load_backbone(config.backbone, config.weights)
    grid = patch_grid_hw(prep, backbone.spec.strides[0])
    # Before any work: a build that cannot fit stops here, not at an out-of-memory kill later.
    n_features = len(paths) * grid[0] * grid[1]
    n_clustered, dim = min(n_features, config.max_train_patches or n_features), backbone.spec.feature_dim
    engine_bytes = engine_file_bytes(sum(p.numel() for p in backbone.module.parameters()),
                                     min(n_clustered, config.prototype_limit), dim)
    check_build_resources(n_features, n_clustered, dim, out, searches_on_cpu(n_clustered, dim, config.neighbours, device),
                          config.prototype_limit, engine_bytes=engine_bytes)
    return _Plan(paths, held_out, found, no_holdout, device, prep, contract, backbone,
                 PatchFeatures(backbone.module, config.align, grid), grid,
                 {"resize_mode": geometry, "input": input_choice})


def _extract(plan: _Plan, config: BuildConfig, workdir: Path, log, progress: bool):
    """[1/4] Patch features of the fitting images into a disk-backed FP16 file."""
    log(f"[1/4] features: {len(plan.paths)} images, {config.backbone} on {plan.device.type}")
    torch.manual_seed(0)
    extracted = extract_features(
        FeatureExtractor(plan.patch_features, plan.prep), plan.paths, plan.prep, workdir / "features.npy",
        batch_size=config.batch_size, device=plan.device, progress=progress,
    )
    if extracted.skipped:
        listed = "; ".join(f"{p.name}" for p, _ in extracted.skipped[:10])
        log(f"warning: skipped {len(extracted.skipped)} unreadable images: {listed}")
        if len(extracted.skipped) > MAX_SKIPPED_SHARE * len(plan.paths) or len(extracted.used) < MIN_TRAIN_IMAGES:
            # Counted against the images read for fitting; the held-out ones are read later.
            where = f"{plan.found} in the folder, {len(plan.held_out)} held out; " if plan.held_out else ""
            raise InputError(f"{len(extracted.skipped)} of the {len(plan.paths)} images kept for fitting are unreadable "
                             f"({where}first: {extracted.skipped[0][1]})")
    log(f"      {extracted.array.shape[0]:,} patch features of {extracted.array.shape[1]} dims")
    return extracted


def _inside_patches(prep: Preprocessing, path: Path, grid: tuple[int, int]) -> np.ndarray:
    """bool [h * w]: the feature grid's cells whose centre lies on the image (not on letterbox padding)."""
    valid = prep.valid_mask(*image_size(path))
    rows = ((np.arange(grid[0]) + 0.5) * valid.shape[0] / grid[0]).astype(int)
    cols = ((np.arange(grid[1]) + 0.5) * valid.shape[1] / grid[1]).astype(int)
    return valid[np.ix_(rows, cols)].ravel()


def _holdout_patches(plan: _Plan, config: BuildConfig, workdir: Path, log, progress: bool) -> np.ndarray | None:
    """A seeded sample of the held-out images' unit patch features on the image itself (what
    ``auto`` measures the FINCH levels on), or None without a readable hold-out."""
    if not plan.held_out:
        return None
    extracted = extract_features(
        FeatureExtractor(plan.patch_features, plan.prep), plan.held_out, plan.prep, workdir / "holdout_features.npy",
        batch_size=config.batch_size, device=plan.device, progress=progress, desc="hold-out features",
    )
    if not extracted.used:
        return None
    inside = np.concatenate([_inside_patches(plan.prep, path, extracted.grid) for path in extracted.used])
    patches = sample_patches(extracted.array[np.flatnonzero(inside)])
    log(f"      {len(patches):,} patches of {len(extracted.used)} held-out images to choose the FINCH level on")
    return patches


def _cluster(extracted, plan: _Plan, config: BuildConfig, staging: Path, workdir: Path, log, progress: bool):
    """[2/4] FINCH on the features (or a seeded sample of them); the prototypes into the staging folder.
    Returns the fit, the near miss passed over, the rows clustered and the manifest's ``selection``."""
    train_features = extracted.array
    rows = sample_rows(len(train_features), config.max_train_patches)
    if rows is not None:
        train_features = train_features[rows]  # reads only the sampled rows
        log(f"      --max-train-patches: a seeded uniform sample of {len(rows):,} patches")
    rule, holdout_patches = config.max_prototypes, None
    if rule == AUTO:
        holdout_patches = _holdout_patches(plan, config, workdir, log, progress)
        if holdout_patches is None:
            rule = PAPER_MAX_PROTOTYPES
            why = plan.no_holdout or "every held-out image is unreadable"
            log(f"warning: no held-out images to choose the FINCH level on ({why}): the paper's rule is used instead "
                f"(the first partition under {rule:,} clusters)")
    log("[2/4] FINCH: " + ("the whole hierarchy, then the level chosen on the hold-out" if rule == AUTO
                            else f"stop below {rule:,} clusters"))
    fit = fit_prototypes(train_features, rule, config.normalize_prototypes, config.neighbours, plan.device,
                         log=lambda m: log("      " + m), holdout_patches=holdout_patches,
                         grid=tuple(extracted.grid), cap=config.prototype_cap)
    _check_finite(fit.prototypes, "[2/4] prototypes", "the features they were fitted on are broken")
    with atomic_path(staging / PROTOTYPES_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, fit.prototypes, allow_pickle=False)
    selection = {"rule": "first partition under max_prototypes" if rule != AUTO else AUTO, "max_prototypes": rule}
    if fit.levels is not None:
        log(f"      FINCH levels (distance: mean 1 - cos of held-out patches; excess over level 0; kept: the coarsest "
            f"within {AUTO_MARGIN:.0%}, at most {config.prototype_cap:,} prototypes, no coarser than the paper's rule's "
            f"(< {PAPER_MAX_PROTOTYPES:,}); where none is, level L merged to the cap, 'L-(L+1)'):")
        for line in format_table(fit.levels):
            log("        " + line)
        selection.update(margin=AUTO_MARGIN, cap=config.prototype_cap, floor=PAPER_MAX_PROTOTYPES,
                         holdout_patches=int(len(holdout_patches)),
                         levels=[level.to_dict() for level in fit.levels])
    log(f"      {len(fit.prototypes):,} prototypes")
    passed = near_miss(fit.finch.partition_sizes, rule) if rule != AUTO else None
    if passed is not None:
        log(f"warning: FINCH passed over a partition of {passed:,} clusters, just above --max-prototypes "
            f"{rule:,}, for {len(fit.prototypes):,}; fewer prototypes usually score lower "
            f"(--max-prototypes {passed + 1} keeps the {passed:,})")
    return fit, passed, len(train_features), selection


def _graph_metadata(plan: _Plan, fit) -> dict[str, str]:
    """What the ONNX files say about themselves (``metadata_props``): enough for a program that has
    only the file to feed it and place its map. The threshold is not among them: ``calibrate``
    changes the manifest only, never a graph or a compiled engine."""
    meta = {
        "tool_version": __version__, "input": json.dumps(plan.contract.to_manifest()),
        "preprocessing": json.dumps(plan.prep.to_dict()), "backbone": plan.backbone.spec.name,
        "prototypes": str(len(fit.prototypes)), "outputs": "anomaly_map float32 [B,1,{1},{0}]; score float32 [B]".format(*plan.prep.input_size),
        "decision_rule": DECISION_RULE,
    }
    if plan.contract.kind == "frames":
        meta["geometry"] = json.dumps(plan.prep.geometry_entry(plan.contract.width, plan.contract.height))
    return meta


def _export(plan: _Plan, config: BuildConfig, fit, staging: Path, log):
    """[3/4] The complete network traced into ONNX, FP32 and strongly typed FP16; returns the FP32
    module (the reference) and the manifest's ``onnx`` entry."""
    log(f"[3/4] ONNX: tracing the complete network, FP32 and FP16 (input: {plan.contract.describe()})")
    graphs, reference = {}, None
    metadata = _graph_metadata(plan, fit)
    for precision, filename in ONNX_FILES.items():
        # ProtoADNetwork casts its feature module in place: the FP16 graph gets its own copy.
        features = copy.deepcopy(plan.patch_features) if precision == "fp16" else plan.patch_features
        net = ProtoADNetwork(features, fit.prototypes, plan.prep, precision, chunk=config.prototype_chunk).eval()
        if plan.contract.kind == "frames":
            c = plan.contract
            net = FrameNetwork(FrameInput(plan.prep, c.width, c.height, c.channel_order), net).eval()
        export_onnx(net, staging / filename, plan.contract, metadata={**metadata, "precision": precision})
        report = inspect_graph(onnx.load(str(staging / filename)))
        graphs[precision] = {"file": filename, "opset": report.opset, "ops": report.ops,
                             "casts": report.cast_targets, "conv_input_dtypes": report.conv_dtypes}
        if precision == "fp32":
            reference = net
    return reference, graphs


def _manifest(data, plan: _Plan, config: BuildConfig, extracted, fit, passed, clustered: int, graphs: dict,
              holdout: dict, timings: dict) -> dict:
    """The bundle's manifest (the files' sha256 are filled in by ``write_manifest``)."""
    prep, backbone, contract = plan.prep, plan.backbone, plan.contract
    manifest = {
        "tool": "protoad-export",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": {
            "name": backbone.spec.name, "architecture": backbone.spec.architecture, "weights": backbone.weights_source,
            "weights_sha256": backbone.weights_sha256, "channels": list(backbone.spec.channels),
            "feature_dim": backbone.spec.feature_dim,
        },
        "preprocessing": prep.to_dict(),
        "choices": plan.choices,
        "align": config.align,
        "input": contract.to_manifest(),
        "outputs": {name: ["batch", *shape[1:]] for name, shape in output_shapes(contract).items()},
        "prototypes": {"file": PROTOTYPES_FILE, "count": int(len(fit.prototypes)),
                       "dim": int(fit.prototypes.shape[1]), "normalized": fit.normalized,
                       "max_prototypes": config.max_prototypes, "chunk": config.prototype_chunk},
        "finch": {"partition_sizes": fit.finch.partition_sizes, "neighbours": fit.finch.neighbour_methods,
                  "seconds_per_level": [round(s, 3) for s in fit.finch.seconds], "passed_over_near_miss": passed,
                  "product_kernels": fit.finch.kernels},
        "onnx": graphs,
        "batch_profile": dict(zip(("min", "opt", "max"), config.batch_profile)),
        "train": {"data": str(Path(data).resolve()), "images": len(extracted.used),
                  "skipped": [p.name for p, _ in extracted.skipped], "patches": int(extracted.array.shape[0]),
                  "patches_clustered": int(clustered), "max_train_patches": config.max_train_patches,
                  "grid": list(extracted.grid)},
        "test_data": str(Path(data).resolve()) if is_mvtec_category(data) else None,
        "holdout": holdout,
        "build": {"device": plan.device.type, "seconds": {k: round(v, 3) for k, v in timings.items()},
                  "peak_rss_mib": round(peak_rss_mib(), 1)},
        "versions": _versions(),
        "files": {PROTOTYPES_FILE: None, **{f: None for f in ONNX_FILES.values()}},
    }
    if contract.kind == "frames":
        manifest["geometry"] = prep.geometry_entry(contract.width, contract.height)
    return manifest


def build(
    data: str | Path,
    name: str,
    out: str | Path = "engines",
    config: BuildConfig | None = None,
    *,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> BuildResult:
    """Fit prototypes on the normal images in ``data`` and write the bundle ``out/name`` (README: bundle).

    The bundle is assembled in a hidden staging folder and swapped in whole under a lock on the
    name; only a bundle of this tool is ever replaced.
    """
    config = config or BuildConfig()
    log = log or (lambda _msg: None)
    check_bundle_name(name)
    output_folder(out)
    final_dir = Path(out) / name
    with build_lock(final_dir):
        # Under the lock, so the folder checked is the one replaced (commit_directory checks again).
        old = replaceable_bundle(final_dir, data)
        if old is not None:
            log(_replacing_message(name, old))
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        plan = _plan(data, out, config, log)
        timings["plan"] = time.perf_counter() - t0
        staging = staging_directory(final_dir)
        workdir = staging_directory(final_dir, kind="scratch")
        try:
            t0 = time.perf_counter()
            extracted = _extract(plan, config, workdir, log, progress)
            timings["features"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fit, passed, clustered, selection = _cluster(extracted, plan, config, staging, workdir, log, progress)
            timings["clustering"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            network, graphs = _export(plan, config, fit, staging, log)
            timings["export"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # Scored with the FP32 network just fitted, so calibration needs no second pass over the data.
            batch = similarity_batch(len(fit.prototypes), extracted.grid, config.batch_size, config.prototype_chunk)
            holdout = score_holdout(getattr(network, "network", network), plan.held_out, plan.prep, config.holdout,
                                    plan.device, batch)
            _check_finite(np.asarray(holdout["scores"], dtype=np.float64), "hold-out scores",
                          "the network gives no usable scores: check --weights")
            if plan.no_holdout:
                holdout["empty_reason"] = plan.no_holdout
            timings["holdout"] = time.perf_counter() - t0
            log("[4/4] manifest")
            manifest = _manifest(data, plan, config, extracted, fit, passed, clustered, graphs, holdout, timings)
            manifest["prototypes"]["selection"] = selection
            # Golden outputs for `verify` on the target: PyTorch FP32 on hold-out images and synthetic defects.
            manifest["golden"] = write_golden(network, plan.contract, plan.prep, staging, holdout=plan.held_out,
                                              fitting=extracted.used)
            manifest["files"].update(dict.fromkeys(manifest["golden"]["files"]))
            write_manifest(staging, manifest)
            del extracted
            commit_directory(staging, final_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return BuildResult(final_dir, read_manifest(final_dir), plan.contract, network)
