"""The bundle's input/output contract: what a caller feeds the graph and what it gets back.

Torch-free (numpy and PIL only), so that a line PC's runtime, ``verify`` and the serving configs
read it without PyTorch. The graph's tensor names are defined here and nowhere else.

Two graph inputs exist:

- ``frames``: camera frames, uint8 [B, H, W, C], C = 3 (``rgb`` or ``bgr``) or 1 (``gray``), of the
  one frame size the bundle was built for; the graph resizes, crops or letterboxes and normalises.
- ``image``: float32 [B, 3, H, W] RGB in [0, 1], already preprocessed (``build --input tensor``).

Outputs: ``anomaly_map`` float32 [B, 1, H, W] and ``score`` float32 [B] (the map's maximum).
H x W is the model input (``preprocessing.crop`` x ``preprocessing.width``; square without a width).
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
# Float inputs may leave [0, 1] by this much: the bilinear resize's weights sum to 1 only up to
# float32 rounding, so a white pixel can come out a few ulps above 1 (or a black one below 0).
RANGE_SLACK = 1e-5


@dataclass(frozen=True)
class InputContract:
    """The graph input of one bundle (from its manifest's ``input`` entry)."""

    kind: str  # "frames" or "tensor"
    size: int  # height of the model input H (its side when square)
    width: int | None = None  # frame size, for "frames"
    height: int | None = None
    channel_order: str = "rgb"
    model_width: int | None = None  # width of the model input W when not square

    @property
    def model_input(self) -> tuple[int, int]:
        """(W, H) of the model input, which is also the anomaly map's size."""
        return (self.size if self.model_width is None else self.model_width), self.size

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
        return (batch, 3, self.size, self.model_input[0])

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
        model_width = manifest["preprocessing"].get("width")  # absent before non-square inputs: square
        model_width = None if model_width is None else int(model_width)
        entry = manifest.get("input") or {}
        if entry.get("kind", "tensor") == "tensor":  # bundles from before frames were an input
            return cls("tensor", size, model_width=model_width)
        _, height, width, _ = entry["shape"]
        return cls("frames", size, int(width), int(height), str(entry["channel_order"]), model_width)

    def check(self, inputs) -> np.ndarray:
        """The caller's batch as a contiguous array of the graph's dtype, or one line saying why not.

        Refused rather than converted, because each would be scored silently wrong: another dtype
        (uint8 pixels in the float graph make every part defective), bool, another shape, and for
        the float graph any NaN or inf (``score > threshold`` is false for NaN) or value outside [0, 1].
        """
        try:
            array = np.asarray(inputs)
        except ValueError:
            raise InputError(f"expected {self.describe()}: the arrays given differ in shape "
                             "(pass PIL images, which are preprocessed, or use predict_paths)") from None
        if array.dtype != self.dtype:
            what = "bool" if array.dtype == np.bool_ else str(array.dtype)
            if self.kind == "tensor":
                fix = " (uint8 pixels: divide by 255)" if array.dtype == np.uint8 else ""
                raise InputError(f"expected float32 RGB in [0, 1] (the graph's input), got {what}{fix}; or pass PIL "
                                 "images or use predict_paths, which preprocess")
            raise InputError(f"expected {self.describe()} (the graph's input), got {what}")
        if array.ndim != 4 or array.shape[1:] != self.shape()[1:] or len(array) == 0:
            raise InputError(f"expected {self.describe()}, got shape {list(array.shape)}")
        if self.kind == "tensor":
            # min and max propagate NaN, so two passes find NaN, inf and out-of-range values alike.
            low, high = float(array.min()), float(array.max())
            if not (-RANGE_SLACK <= low and high <= 1.0 + RANGE_SLACK):
                if not np.isfinite(array).all():
                    raise InputError("expected float32 RGB in [0, 1]: the images hold NaN or infinite values")
                raise InputError(f"expected float32 RGB in [0, 1], got values from {low:.4g} to {high:.4g} "
                                 "(normalisation is done inside the graph: pass plain RGB / 255)")
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
    width, height = contract.model_input
    return {"anomaly_map": (batch, 1, height, width), "score": (batch,)}


def check_threshold(value: object, source: str, *, error: type[Exception] = InputError) -> float:
    """``value`` as a float when it is finite and positive, else ``error`` naming ``source``.

    Scores are 1 - cosine, >= 0: with a NaN threshold ``score > threshold`` is never true (every
    part passes), with an infinite or non-positive one the decision is constant.
    """
    try:
        number = float(value) if not isinstance(value, (bool, str)) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise error(f"{source}: the threshold must be a finite positive number (scores are 1 - cosine), got {value!r}")
    return number


def manifest_threshold(manifest: dict, bundle_dir: str | Path | None = None) -> float | None:
    """The bundle's calibrated threshold, or None; ArtifactError when it is not a finite positive
    number (a hand-edited or damaged manifest)."""
    entry = manifest.get("threshold")
    if not (isinstance(entry, dict) and "value" in entry):
        return None
    where = f"{Path(bundle_dir) / 'manifest.json'}" if bundle_dir is not None else "manifest.json"
    try:
        return check_threshold(entry["value"], where, error=ArtifactError)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}: re-run calibrate") from None
