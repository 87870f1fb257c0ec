"""The bundle's input/output contract: what a caller feeds the graph and what it gets back.

Torch-free (numpy and PIL only), so that a line PC's runtime, ``verify`` and the serving configs
read it without PyTorch. The graph's tensor names are defined here and nowhere else.

Two graph inputs exist:

- ``frames``: camera frames, uint8 [B, H, W, C], C = 3 (``rgb`` or ``bgr``) or 1 (``gray``), of the
  one frame size the bundle was built for; the graph resizes, crops or letterboxes and normalises.
- ``image``: float32 [B, 3, S, S] RGB in [0, 1], already preprocessed (``build --input tensor``).

Outputs: ``anomaly_map`` float32 [B, 1, S, S] and ``score`` float32 [B] (the map's maximum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from .errors import ArtifactError, InputError

FRAMES_INPUT = "frames"
TENSOR_INPUT = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
DECISION_RULE = "defective if score > threshold"


@dataclass(frozen=True)
class InputContract:
    """The graph input of one bundle (from its manifest's ``input`` entry)."""

    kind: str  # "frames" or "tensor"
    size: int  # side of the model input S
    width: int | None = None  # frame size, for "frames"
    height: int | None = None
    channel_order: str = "rgb"

    @property
    def name(self) -> str:
        return FRAMES_INPUT if self.kind == "frames" else TENSOR_INPUT

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "gray" else 3

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.kind == "frames" else np.dtype(np.float32)

    def shape(self, batch: int | str = "B") -> tuple:
        """The input's shape for ``batch`` images."""
        if self.kind == "frames":
            return (batch, self.height, self.width, self.channels)
        return (batch, 3, self.size, self.size)

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape())
        if self.kind == "frames":
            return f"uint8 [{dims}] {self.channel_order.upper()} frames ({self.width}x{self.height})"
        return f"float32 [{dims}] RGB in [0, 1]"

    def to_manifest(self) -> dict:
        entry = {"kind": self.kind, "name": self.name, "shape": ["batch", *self.shape()[1:]],
                 "dtype": str(self.dtype), "channel_order": self.channel_order}
        entry["range"] = [0, 255] if self.kind == "frames" else [0.0, 1.0]
        return entry

    @classmethod
    def from_manifest(cls, manifest: dict) -> "InputContract":
        size = int(manifest["preprocessing"]["crop"])
        entry = manifest.get("input") or {}
        if entry.get("kind", "tensor") == "tensor":  # bundles from before frames were an input
            return cls("tensor", size)
        _, height, width, _ = entry["shape"]
        return cls("frames", size, int(width), int(height), str(entry["channel_order"]))

    def check(self, inputs) -> np.ndarray:
        """The caller's batch as a contiguous array of the graph's dtype, or one line saying why not.

        Refused rather than converted: another dtype (uint8 pixels in a float graph make every
        part exceed the threshold), bool, another shape, and for float inputs any non-finite value
        or one outside [0, 1] (a NaN passes a threshold test as "good").
        """
        if isinstance(inputs, (list, tuple)) and inputs and not isinstance(inputs[0], np.ndarray):
            raise InputError(f"expected a numpy array {self.describe()}, got a list of {type(inputs[0]).__name__}: "
                             "use runtime.predict_images for PIL images or predict_paths for files")
        array = np.asarray(inputs)
        if array.dtype != self.dtype:
            hint = " (divide uint8 pixels by 255)" if self.kind == "tensor" and array.dtype == np.uint8 else ""
            raise InputError(f"expected {self.describe()}, got dtype {array.dtype}{hint}")
        if array.ndim != 4 or array.shape[1:] != self.shape()[1:] or len(array) == 0:
            raise InputError(f"expected {self.describe()}, got shape {list(array.shape)}")
        if self.kind == "tensor":
            if not np.isfinite(array).all():
                raise InputError("input holds NaN or infinite values: refused, not scored")
            low, high = float(array.min()), float(array.max())
            if low < 0.0 or high > 1.0:
                raise InputError(f"input values must lie in [0, 1], got {low:g} to {high:g}")
        return np.ascontiguousarray(array)

    def from_pixels(self, pixels: np.ndarray, prep, source: str | Path = "image") -> np.ndarray:
        """One decoded RGB uint8 [H, W, 3] image -> this input's per-image array (frames: the frame
        in the bundle's channel order, refused unless it has the frame size; tensor: preprocessed)."""
        if self.kind == "tensor":
            return prep.pixels_array(pixels)
        height, width = pixels.shape[:2]
        if (width, height) != (self.width, self.height):
            raise InputError(f"{source}: {width}x{height} pixels, but this bundle takes {self.describe()}; "
                             "build a bundle for this frame size (--input-size) or one with --input tensor")
        if self.channel_order == "bgr":
            return np.ascontiguousarray(pixels[..., ::-1])
        if self.channel_order == "gray":
            # Luma as PIL's convert("L"); exact for the grey images a grey camera gives.
            return np.asarray(_to_gray(pixels))[..., None]
        return np.ascontiguousarray(pixels)


def _to_gray(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels, "RGB").convert("L")


def output_shapes(contract: InputContract, batch: int | str = "B") -> dict[str, tuple]:
    """The graph's outputs for ``batch`` images."""
    return {"anomaly_map": (batch, 1, contract.size, contract.size), "score": (batch,)}



def checked_threshold(value, what: str = "threshold") -> float:
    """``value`` as a finite, positive float, or one line naming ``what`` (a NaN threshold would
    pass every part: ``score > nan`` is always false)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{what} must be finite and positive, got {value!r}")
    return number


def manifest_threshold(manifest: dict) -> float | None:
    """The bundle's calibrated threshold (``threshold.value`` in the manifest), or None."""
    entry = manifest.get("threshold")
    if entry is None:
        return None
    if not isinstance(entry, dict) or "value" not in entry:
        raise ArtifactError(f"manifest threshold entry {entry!r} has no value")
    try:
        return checked_threshold(entry["value"], "manifest threshold")
    except InputError as exc:
        raise ArtifactError(str(exc)) from None
