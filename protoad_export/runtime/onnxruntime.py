"""ONNX Runtime backend: ``model.<precision>.onnx`` with the best installed execution provider.

Imports neither torch nor the backbone: what a line PC without PyTorch runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import verify_file
from ..contract import OUTPUT_NAMES
from ..errors import ArtifactError, InputError, MissingDependencyError
from .base import Runtime

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRuntime(Runtime):
    """One ONNX Runtime InferenceSession on the bundle's graph of ``precision``."""

    backend = "onnxruntime"

    def __init__(self, bundle_dir: str | Path, manifest: dict, *, precision: str = "fp32",
                 providers: Sequence[str] | None = None, device: str | None = None) -> None:
        """``device``: ``cuda`` refuses to run without a GPU execution provider (rather than fall
        back to the CPU unseen); ``None`` or ``cpu`` takes the best installed providers."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime is not installed") from None
        super().__init__(manifest)
        self.precision = precision
        entry = manifest["onnx"].get(precision)
        if entry is None:
            raise InputError(f"no {precision} ONNX file in {bundle_dir}")
        path = verify_file(bundle_dir, manifest, entry["file"])
        available = ort.get_available_providers()
        if providers is None:
            # Best first; ONNX Runtime falls back along the list for nodes a provider cannot run.
            providers = [p for p in PREFERRED_PROVIDERS if p in available]
        else:
            unknown = [p for p in providers if p not in available]
            if unknown:
                raise MissingDependencyError(f"ONNX Runtime execution providers not installed: {', '.join(unknown)} (available: {', '.join(available)})")
        if device == "cuda" and not any(p in GPU_PROVIDERS for p in providers):
            raise MissingDependencyError(f"device cuda was asked for, but ONNX Runtime has no GPU execution provider here "
                                         f"(available: {', '.join(available)}): use device cpu or install onnxruntime-gpu")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.inference = ort.InferenceSession(str(path), options, providers=list(providers))
        self.providers = self.inference.get_providers()
        if device == "cuda" and not any(p in GPU_PROVIDERS for p in self.providers):
            # Listed but not loadable (a CUDA library missing): ONNX Runtime fell back to the CPU.
            raise MissingDependencyError(f"device cuda was asked for, but ONNX Runtime could not start a GPU execution "
                                         f"provider (running on {', '.join(self.providers)}): use device cpu or fix the CUDA install")
        self.on_gpu = False  # timed end to end: ONNX Runtime hides its transfers
        # The manifest is not under sha256: an edited geometry would reach ONNX Runtime as INVALID_ARGUMENT.
        graph_input = self.inference.get_inputs()[0]
        if graph_input.name != self.contract.name or list(graph_input.shape[1:]) != list(self.contract.shape()[1:]):
            if self.contract.kind == "tensor" and graph_input.name == self.contract.name:
                width, height = self.contract.model_input
                fields = (f"preprocessing.crop {height}" if self.contract.model_width is None
                          else f"preprocessing.crop {height} and width {width}")
                what = f"{fields} does not match {path.name}'s input {graph_input.shape[2]}x{graph_input.shape[3]}"
            else:
                what = f"its input ({self.contract.describe()}) does not match {path.name}'s {graph_input.name} {graph_input.shape}"
            raise ArtifactError(f"{Path(bundle_dir) / 'manifest.json'}: {what}: the manifest was edited or is damaged; "
                                "rebuild the bundle")

    def _run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.inference.run(list(OUTPUT_NAMES), {self.contract.name: inputs})
        return maps[:, 0].astype(np.float32), scores.astype(np.float32)
