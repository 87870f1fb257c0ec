"""Run a bundle: ``load(bundle_dir, backend)`` -> ``predict(inputs)`` / ``infer(inputs)``.

Every backend takes the bundle's input contract (``contract.InputContract``: uint8 camera frames,
or float32 preprocessed tensors) and returns ``(anomaly_maps [B, H, W], scores [B])`` as float32
numpy; ``infer`` adds the decisions at the calibrated threshold. One backend per module:
``pytorch`` (the FP32 reference; needs torch and the backbone weights), ``onnxruntime`` and
``tensorrt`` (neither imports torch at load time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import read_manifest
from ..contract import InputContract
from ..data.images import Preprocessing, load_image
from ..errors import InputError, MissingDependencyError
from ..options import RUNTIME_BACKENDS, similarity_batch
from .base import Inference, Runtime

__all__ = ["Inference", "Predictions", "Runtime", "fitting_batch", "load", "predict_paths", "preprocess_paths"]


def load(bundle_dir: str | Path, backend: str = "onnxruntime", *, precision: str | None = None, device: str = "cpu",
         compile: bool = False, providers: Sequence[str] | None = None) -> Runtime:
    """Open a bundle (the manifest checked against its schema, the files the backend opens by
    sha256: a missing FP16 model must not block the FP32 one) with one backend.

    ``torch``: FP32 reference or FP16 (CUDA), on ``device``, optionally ``compile``d;
    ``onnxruntime``: ``model.<precision>.onnx`` with the best installed (or the given) providers;
    ``tensorrt``: the engine compiled for this GPU, refused with the reason when it cannot run here.
    """
    if backend not in RUNTIME_BACKENDS:
        raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(RUNTIME_BACKENDS)}")
    manifest = read_manifest(bundle_dir, verify=False)
    if backend == "torch":
        if not _torch_importable():
            raise MissingDependencyError("the torch backend needs PyTorch, which is not installed here: "
                                         "use --backend onnxruntime (or tensorrt)")
        from .pytorch import TorchRuntime

        return TorchRuntime(bundle_dir, manifest, precision=precision or "fp32", device=device, compile=compile)
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntime

        return OnnxRuntime(bundle_dir, manifest, precision=precision or "fp32", providers=providers, device=device)
    if precision not in (None, "fp16"):
        raise InputError("TensorRT engines are FP16 (strongly typed from model.fp16.onnx)")
    # TensorRTRuntime still allocates through torch.cuda; runtime/cuda_memory.py is the torch-free memory.
    if not _torch_importable():
        raise MissingDependencyError("the tensorrt backend still needs PyTorch for its CUDA buffers on this version: "
                                     "use --backend onnxruntime")
    from .tensorrt import TensorRTRuntime

    return TensorRTRuntime(bundle_dir, manifest)


def _torch_importable() -> bool:
    import importlib

    try:
        importlib.import_module("torch")
    except ImportError:
        return False
    return True


def decode(path: Path, contract: InputContract, prep: Preprocessing) -> np.ndarray:
    """One image file as the bundle's input for one image (see ``InputContract.from_pixels``)."""
    return contract.from_pixels(np.asarray(load_image(path), dtype=np.uint8), prep, path)


def preprocess_paths(paths: Sequence[Path], manifest: dict) -> np.ndarray:
    """Decode image files into one batch of the bundle's input, exactly as the bundle was built."""
    contract, prep = InputContract.from_manifest(manifest), Preprocessing.from_manifest(manifest)
    return np.stack([decode(p, contract, prep) for p in paths])


def fitting_batch(manifest: dict, batch_size: int) -> int:
    """``batch_size`` cut so one batch's prototype similarities fit in memory (``options.similarity_batch``)."""
    protos = manifest["prototypes"]
    # Bundles written before the conv was chunked have one conv over all prototypes.
    return similarity_batch(protos["count"], manifest["train"]["grid"], batch_size, protos.get("chunk", protos["count"]))


@dataclass
class Predictions:
    """Outputs of :func:`predict_paths`, in the order of the readable ``paths``.

    ``errors``: (path, message) of every file that could not be decoded (skipped, not scored);
    ``seconds``: wall time of each batch's ``predict`` (decoding excluded).
    """

    paths: list[Path]
    maps: np.ndarray
    scores: np.ndarray
    errors: list[tuple[Path, str]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def predict_paths(runtime: Runtime, paths: Sequence[Path], batch_size: int = 8, *, progress: bool = False,
                  skip_unreadable: bool = False, desc: str | None = None) -> Predictions:
    """Run image files through a runtime in batches (cut by :func:`fitting_batch`): the one loop
    behind eval, calibrate, predict and bench.

    An unreadable file raises, unless ``skip_unreadable``: then it is listed in ``errors``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    batch_size = fitting_batch(runtime.manifest, batch_size)
    paths = list(paths)

    def _decode(path):
        try:
            return decode(path, runtime.contract, runtime.preprocessing)
        except InputError as exc:
            if not skip_unreadable:
                raise
            return exc

    kept, maps, scores, errors, seconds = [], [], [], [], []
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    # Decoding the next batch overlaps the model's run on this one.
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=len(paths), unit="img", disable=not progress,
                                                         leave=False, desc=desc) as bar:
        pending = [pool.submit(_decode, p) for p in batches[0]] if batches else []
        for index, chunk in enumerate(batches):
            decoded = [f.result() for f in pending]
            if index + 1 < len(batches):
                pending = [pool.submit(_decode, p) for p in batches[index + 1]]
            good = [(p, a) for p, a in zip(chunk, decoded) if not isinstance(a, InputError)]
            errors += [(p, str(a)) for p, a in zip(chunk, decoded) if isinstance(a, InputError)]
            if good:
                t0 = time.perf_counter()
                m, s = runtime.predict(np.stack([a for _, a in good]))
                seconds.append(time.perf_counter() - t0)
                kept += [p for p, _ in good]
                maps.append(m)
                scores.append(s)
            bar.update(len(chunk))
    if not maps:
        width, height = runtime.contract.model_input
        return Predictions([], np.zeros((0, height, width), np.float32), np.zeros(0, np.float32), errors, seconds)
    return Predictions(kept, np.concatenate(maps), np.concatenate(scores), errors, seconds)
