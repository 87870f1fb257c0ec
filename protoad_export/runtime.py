"""One interface for every backend: ``load(engine_dir, backend)`` -> ``predict(images)``.

All backends take float32 RGB in [0, 1] at the crop size (preprocessing comes from the manifest,
see :func:`preprocess_paths`; PIL images are preprocessed so) and refuse other dtypes, NaN and
out-of-range values with an InputError; they return ``(anomaly_maps [B, S, S], scores [B])`` as float32 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .artifacts import load_array, read_manifest, verify_file
from .errors import InputError, MissingDependencyError
from .images import Preprocessing, load_batch

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# The network's largest intermediate is the prototype similarity, batch x K x h x w FP32 (K up to
# network.PROTOTYPE_CHUNK since the conv is chunked; before, a 51k-prototype eval at batch 8 was
# killed for memory at 24 GB). Batches are cut to keep one chunk's under this.
SIMILARITY_BUDGET_BYTES = 2 << 30


class Runtime(Protocol):
    """What every backend offers."""

    backend: str
    precision: str
    manifest: dict

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, S, S] in [0, 1] (or PIL images, preprocessed with the manifest's
        preprocessing) -> (maps float32 [B, S, S], scores float32 [B]); anything else is an InputError."""
        ...


def preprocessing(manifest: dict) -> Preprocessing:
    """The manifest's preprocessing, shared by every backend."""
    return Preprocessing.from_dict(manifest["preprocessing"])


def _pil_batch(images: Sequence, manifest: dict) -> np.ndarray:
    """PIL images of any size and mode -> the engine's input, preprocessed as the engine was built."""
    from .images import to_rgb, upright

    prep = preprocessing(manifest)
    return np.stack([prep.image_array(to_rgb(upright(image))) for image in images])


def _check_input(images, manifest: dict) -> np.ndarray:
    """The network's input as float32 [B, 3, S, S] in [0, 1], or InputError saying what is wrong.

    A PIL image or a list of them (any sizes) is preprocessed with the manifest's preprocessing.
    Arrays are taken as they are and refused when they could only give a silently wrong answer:
    another dtype than the graph's float32 (uint8 0-255 would score every part defective), bool,
    NaN or inf, values outside [0, 1].
    """
    from PIL import Image

    crop = int(manifest["preprocessing"]["crop"])
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and any(isinstance(i, Image.Image) for i in images):
        if not all(isinstance(i, Image.Image) for i in images):
            raise InputError("predict() takes one kind of input: PIL images, or float32 arrays, not a mix")
        return _pil_batch(images, manifest)
    try:
        images = np.asarray(images)
    except ValueError:
        raise InputError(f"expected float32 images of shape [B, 3, {crop}, {crop}]: the arrays given differ in shape "
                         "(pass PIL images, which are preprocessed, or use predict_paths)") from None
    hint = "float32 RGB in [0, 1]"
    if images.dtype != np.float32:
        what = "bool" if images.dtype == np.bool_ else str(images.dtype)
        fix = " (uint8 pixels: divide by 255)" if images.dtype == np.uint8 else ""
        raise InputError(f"expected {hint} (the graph's input), got {what}{fix}; or pass PIL images or use "
                         "predict_paths, which preprocess")
    if images.ndim != 4 or images.shape[1:] != (3, crop, crop):
        raise InputError(f"expected images of shape [B, 3, {crop}, {crop}], got {list(images.shape)}")
    if images.size:
        # min and max propagate NaN, so two passes find NaN, inf and out-of-range values alike.
        low, high = float(images.min()), float(images.max())
        if not (0.0 <= low and high <= 1.0):
            if not np.isfinite(images).all():
                raise InputError(f"expected {hint}: the images hold NaN or infinite values")
            raise InputError(f"expected {hint}, got values from {low:.4g} to {high:.4g} (normalisation is done inside "
                             "the graph: pass plain RGB / 255)")
    return np.ascontiguousarray(images)


def build_torch_network(engine_dir: str | Path, manifest: dict, precision: str = "fp32"):
    """Rebuild the ProtoAD module from the manifest (backbone weights checked by sha256) and prototypes."""
    from .backbones import LEGACY_ARCHITECTURES, RANDOM_WEIGHTS, load_backbone
    from .features import PatchFeatures
    from .network import ProtoADNetwork, patch_grid

    info = manifest["backbone"]
    weights = info["weights"]
    if weights != RANDOM_WEIGHTS and not Path(weights).is_file():
        raise MissingDependencyError(f"the torch backend needs the backbone weights {weights}, which are not on this machine")
    backbone = load_backbone(info["name"], weights, info.get("architecture", LEGACY_ARCHITECTURES.get(info["name"])))
    if backbone.weights_sha256 != info["weights_sha256"]:
        raise InputError(f"backbone weights {weights} differ from those the engine was built with (sha256)")
    prep = preprocessing(manifest)
    protos = load_array(engine_dir, manifest, manifest["prototypes"]["file"])
    grid = patch_grid(prep.crop, backbone.spec.strides[0])
    chunk = manifest["prototypes"].get("chunk", len(protos))  # engines from before chunking: one conv
    return ProtoADNetwork(PatchFeatures(backbone.module, manifest["align"], grid), protos, prep, precision, chunk=chunk).eval()


class TorchRuntime:
    """The PyTorch module: FP32 reference (CPU or CUDA), FP16 on CUDA, optionally ``torch.compile``d.

    ``compile=True`` uses ``mode="reduce-overhead"``, which replays CUDA graphs (CUDA only).
    On CUDA the runtime also offers the timed steps of the bench (set_batch, upload, execute,
    download) on the current stream.
    """

    backend = "torch"

    def __init__(self, engine_dir: str | Path, manifest: dict, precision: str = "fp32", device: str = "cpu",
                 compile: bool = False) -> None:
        import torch

        if precision not in ("fp32", "fp16"):
            raise InputError(f"unknown precision {precision!r}: choose fp32 or fp16")
        if device not in ("cpu", "cuda"):
            raise InputError(f"unknown device {device!r}: choose cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise MissingDependencyError("--device cuda was asked for, but no CUDA GPU is visible")
        if precision == "fp16" and device != "cuda":
            raise InputError("the torch FP16 backend runs on CUDA only (CPU FP16 convolutions are emulated and slow)")
        if compile and device != "cuda":
            raise InputError("torch.compile with CUDA graphs runs on CUDA only")
        self.torch = torch
        self.manifest = manifest
        self.precision = precision
        self.compiled = compile
        self.device = torch.device(device)
        self.on_gpu = device == "cuda"
        self.network = build_torch_network(engine_dir, manifest, precision).to(self.device)
        if compile:
            self.network = torch.compile(self.network, mode="reduce-overhead", dynamic=False)
        self.crop = manifest["preprocessing"]["crop"]
        self._batch = None

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.torch.from_numpy(_check_input(images, self.manifest)).to(self.device)
        with self.torch.no_grad():
            maps, scores = self.network(x)
        return maps[:, 0].float().cpu().numpy(), scores.float().cpu().numpy()

    # Timed steps (CUDA only), mirroring TensorRTRuntime's.

    @property
    def stream(self):
        return self.torch.cuda.current_stream()

    def set_batch(self, batch: int) -> None:
        """Allocate pinned host and device buffers for ``batch`` images."""
        if batch == self._batch:
            return
        t, s = self.torch, self.crop
        self._host_in = t.empty((batch, 3, s, s), dtype=t.float32).pin_memory()
        self._dev_in = t.empty((batch, 3, s, s), dtype=t.float32, device=self.device)
        self._host_maps = t.empty((batch, 1, s, s), dtype=t.float32).pin_memory()
        self._host_scores = t.empty((batch,), dtype=t.float32).pin_memory()
        self._batch = batch

    def upload(self, images: np.ndarray) -> None:
        self._host_in.copy_(self.torch.from_numpy(images))
        self._dev_in.copy_(self._host_in, non_blocking=True)

    def execute(self) -> None:
        with self.torch.no_grad():
            self._out = self.network(self._dev_in)

    def download(self) -> None:
        maps, scores = self._out
        self._host_maps.copy_(maps.float(), non_blocking=True)
        self._host_scores.copy_(scores.float(), non_blocking=True)

    def synchronize(self) -> None:
        self.stream.synchronize()


class OnnxRuntime:
    """ONNX Runtime on ``model.<precision>.onnx`` with the best installed execution provider."""

    backend = "onnxruntime"

    def __init__(self, engine_dir: str | Path, manifest: dict, precision: str = "fp32", providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime is not installed") from None
        self.manifest = manifest
        self.precision = precision
        entry = manifest["onnx"].get(precision)
        if entry is None:
            raise InputError(f"no {precision} ONNX file in {engine_dir}")
        path = verify_file(engine_dir, manifest, entry["file"])
        available = ort.get_available_providers()
        if providers is None:
            # Best first; ONNX Runtime falls back along the list for nodes a provider cannot run.
            providers = [p for p in PREFERRED_PROVIDERS if p in available]
        else:
            unknown = [p for p in providers if p not in available]
            if unknown:
                raise MissingDependencyError(f"ONNX Runtime execution providers not installed: {', '.join(unknown)} (available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.providers = self.session.get_providers()
        self.on_gpu = False  # timed end to end: ONNX Runtime hides its transfers
        self.crop = manifest["preprocessing"]["crop"]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(["anomaly_map", "score"], {"image": _check_input(images, self.manifest)})
        return maps[:, 0].astype(np.float32), scores.astype(np.float32)


def load(engine_dir: str | Path, backend: str = "onnxruntime", precision: str | None = None, device: str = "cpu",
         compile: bool = False, providers: Sequence[str] | None = None) -> Runtime:
    """Open an engine directory (manifest and every listed file checked by sha256) with one backend.

    ``torch``: FP32 reference or FP16 (CUDA), on ``device``, optionally ``compile``d;
    ``onnxruntime``: ``model.<precision>.onnx`` with the best installed (or the given) providers;
    ``tensorrt``: the engine compiled for this GPU, refused with the reason when it cannot run here.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    manifest = read_manifest(engine_dir, verify=True)
    if backend == "torch":
        return TorchRuntime(engine_dir, manifest, precision or "fp32", device, compile)
    if backend == "onnxruntime":
        return OnnxRuntime(engine_dir, manifest, precision or "fp32", providers)
    if precision not in (None, "fp16"):
        raise InputError("TensorRT engines are FP16 (strongly typed from model.fp16.onnx)")
    from .engine import TensorRTRuntime  # noqa: PLC0415  (TensorRT is optional)

    return TensorRTRuntime(engine_dir, manifest)


def preprocess_paths(paths: Sequence[Path], manifest: dict) -> np.ndarray:
    """Decode and preprocess image files exactly as the engine was built: float32 [B, 3, S, S]."""
    return load_batch(paths, preprocessing(manifest))


@dataclass
class Predictions:
    """Outputs of :func:`predict_paths`, in the order of ``paths``."""

    paths: list[Path]
    maps: np.ndarray
    scores: np.ndarray


def similarity_batch(prototypes: int, grid: Sequence[int], batch_size: int, chunk: int | None = None) -> int:
    """``batch_size``, cut so the batch's prototype-similarity tensor (one conv chunk's: ``chunk``
    prototypes, ``network.PROTOTYPE_CHUNK`` by default) fits ``SIMILARITY_BUDGET_BYTES``."""
    from .network import PROTOTYPE_CHUNK

    per_image = min(int(prototypes), chunk or PROTOTYPE_CHUNK) * int(grid[0]) * int(grid[1]) * 4
    return max(1, min(batch_size, SIMILARITY_BUDGET_BYTES // per_image))


def fitting_batch(manifest: dict, batch_size: int) -> int:
    """:func:`similarity_batch` for an engine directory's manifest."""
    protos = manifest["prototypes"]
    # Engines written before the conv was chunked have one conv over all prototypes.
    return similarity_batch(protos["count"], manifest["train"]["grid"], batch_size, protos.get("chunk", protos["count"]))


def predict_paths(runtime: Runtime, paths: Sequence[Path], batch_size: int = 8, progress: bool = False) -> Predictions:
    """Run a list of image files through a runtime in batches (cut by :func:`fitting_batch`)."""
    from tqdm.auto import tqdm

    batch_size = fitting_batch(runtime.manifest, batch_size)

    maps, scores = [], []
    with tqdm(total=len(paths), unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            m, s = runtime.predict(preprocess_paths(chunk, runtime.manifest))
            maps.append(m)
            scores.append(s)
            bar.update(len(chunk))
    return Predictions(list(paths), np.concatenate(maps), np.concatenate(scores))
