"""ONNX Runtime backend: ``model.<precision>.onnx`` with the best installed execution provider.

Imports neither torch nor the backbone: what a line PC without PyTorch runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..bundle import verify_file
from ..contract import OUTPUT_NAMES
from ..errors import InputError, MissingDependencyError
from .base import Runtime

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntime(Runtime):
    """One ONNX Runtime session on the bundle's graph of ``precision``."""

    backend = "onnxruntime"

    def __init__(self, bundle_dir: str | Path, manifest: dict, *, precision: str = "fp32",
                 providers: Sequence[str] | None = None) -> None:
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
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.providers = self.session.get_providers()
        self.on_gpu = False  # timed end to end: ONNX Runtime hides its transfers

    def _run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(list(OUTPUT_NAMES), {self.contract.name: inputs})
        return maps[:, 0].astype(np.float32), scores.astype(np.float32)
