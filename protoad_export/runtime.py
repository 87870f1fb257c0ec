"""One interface for every backend: ``load(engine_dir, backend)`` -> ``predict(images)``.

All backends take float32 RGB in [0, 1] at the crop size (preprocessing comes from the manifest,
see :func:`preprocess_paths`) and return ``(anomaly_maps [B, S, S], scores [B])`` as float32 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .artifacts import load_array, read_manifest, verify_file
from .errors import ArtifactError, InputError, MissingDependencyError
from .images import Preprocessing, load_batch

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
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
        """float32 [B, 3, S, S] in [0, 1] -> (maps float32 [B, S, S], scores float32 [B])."""
        ...


def preprocessing(manifest: dict) -> Preprocessing:
    """The manifest's preprocessing, shared by every backend."""
    return Preprocessing.from_dict(manifest["preprocessing"])


def _check_input(images: np.ndarray, crop: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (3, crop, crop):
        raise InputError(f"expected images of shape [B, 3, {crop}, {crop}], got {list(images.shape)}")
    return np.ascontiguousarray(images, dtype=np.float32)


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
        x = self.torch.from_numpy(_check_input(images, self.crop)).to(self.device)
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

    def __init__(self, engine_dir: str | Path, manifest: dict, precision: str = "fp32", providers: Sequence[str] | None = None,
                 *, device: str | None = None) -> None:
        """``device``: ``cuda`` refuses to run without a GPU execution provider (rather than fall
        back to the CPU unseen); ``None`` or ``cpu`` takes the best installed providers."""
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
        if device == "cuda" and not any(p in GPU_PROVIDERS for p in providers):
            raise MissingDependencyError(f"--device cuda was asked for, but ONNX Runtime has no GPU execution provider here "
                                         f"(available: {', '.join(available)}): use --device cpu or install onnxruntime-gpu")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.providers = self.session.get_providers()
        if device == "cuda" and not any(p in GPU_PROVIDERS for p in self.providers):
            # Listed but not loadable (a CUDA library missing): ONNX Runtime fell back to the CPU.
            raise MissingDependencyError(f"--device cuda was asked for, but ONNX Runtime could not start a GPU execution "
                                         f"provider (running on {', '.join(self.providers)}): use --device cpu or fix the CUDA install")
        self.on_gpu = False  # timed end to end: ONNX Runtime hides its transfers
        self.crop = manifest["preprocessing"]["crop"]
        # The manifest is not under sha256: an edited crop would reach ONNX Runtime as INVALID_ARGUMENT.
        shape = self.session.get_inputs()[0].shape
        if list(shape[2:]) != [self.crop, self.crop]:
            raise ArtifactError(f"{Path(engine_dir) / 'manifest.json'}: preprocessing.crop {self.crop} does not match "
                                f"{path.name}'s input {shape[2]}x{shape[3]}: the manifest was edited or is damaged; rebuild the engine")

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(["anomaly_map", "score"], {"image": _check_input(images, self.crop)})
        return maps[:, 0].astype(np.float32), scores.astype(np.float32)


def load(engine_dir: str | Path, backend: str = "onnxruntime", precision: str | None = None, device: str = "cpu",
         compile: bool = False, providers: Sequence[str] | None = None) -> Runtime:
    """Open an engine directory (the manifest checked against its schema, the files the backend
    opens by sha256) with one backend.

    ``torch``: FP32 reference or FP16 (CUDA), on ``device``, optionally ``compile``d;
    ``onnxruntime``: ``model.<precision>.onnx`` with the best installed (or the given) providers;
    ``tensorrt``: the engine compiled for this GPU, refused with the reason when it cannot run here.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    # Each backend checks the sha256 of the files it opens, and only those: a missing FP16 model
    # must not block the FP32 one.
    manifest = read_manifest(engine_dir, verify=False)
    if backend == "torch":
        return TorchRuntime(engine_dir, manifest, precision or "fp32", device, compile)
    if backend == "onnxruntime":
        return OnnxRuntime(engine_dir, manifest, precision or "fp32", providers, device=device)
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
