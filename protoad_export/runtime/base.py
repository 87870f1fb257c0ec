"""What every backend shares: the input contract, the decision rule and the result type.

A backend implements ``_run(inputs) -> (maps [B, H, W], scores [B])`` on inputs already checked
against the bundle's :class:`~protoad_export.contract.InputContract`; callers use :meth:`Runtime.predict`
or :meth:`Runtime.infer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract import InputContract, check_threshold, manifest_threshold
from ..data.images import Preprocessing
from ..errors import InputError


@dataclass
class Inference:
    """One batch's outputs: maps float32 [B, H, W], scores float32 [B], decisions bool [B] (True =
    defective, ``score > threshold``; None while the bundle has no calibrated threshold)."""

    maps: np.ndarray
    scores: np.ndarray
    decisions: np.ndarray | None
    threshold: float | None


class Runtime:
    """Base of every backend (``backend``, ``precision`` and ``_run`` are the backend's)."""

    backend: str = ""
    precision: str = "fp32"
    on_gpu: bool = False

    def __init__(self, manifest: dict) -> None:
        self.manifest = manifest
        self.contract = InputContract.from_manifest(manifest)
        self.preprocessing = Preprocessing.from_manifest(manifest)

    def _run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def predict(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        """A batch in the bundle's input contract, or PIL images (turned upright by their EXIF tag and
        preprocessed as files are) -> (anomaly maps float32 [B, H, W], scores float32 [B])."""
        return self._run(self.contract.check(self._from_pictures(inputs)))

    def _from_pictures(self, inputs):
        from PIL import Image

        from ..data.images import to_rgb, upright

        if isinstance(inputs, Image.Image):
            inputs = [inputs]
        if not (isinstance(inputs, (list, tuple)) and any(isinstance(i, Image.Image) for i in inputs)):
            return inputs
        if not all(isinstance(i, Image.Image) for i in inputs):
            raise InputError("predict() takes one kind of input: PIL images, or arrays, not a mix")
        return np.stack([self.contract.from_pixels(np.asarray(to_rgb(upright(i)), dtype=np.uint8), self.preprocessing,
                                                   "PIL image") for i in inputs])

    def infer(self, inputs: np.ndarray, threshold: float | None = None) -> Inference:
        """:meth:`predict` plus the decision at ``threshold`` (default: the bundle's calibrated one)."""
        maps, scores = self.predict(inputs)
        threshold = self.threshold if threshold is None else check_threshold(threshold, "threshold")
        decisions = None if threshold is None else scores > threshold
        return Inference(maps, scores, decisions, threshold)

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold in the manifest, or None."""
        return manifest_threshold(self.manifest)

