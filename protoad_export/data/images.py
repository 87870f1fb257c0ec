"""Images in: discovery of image folders and MVTec-style categories, decoding to RGB, geometry.

Every picture a camera or a shared drive may give (grayscale, 16-bit, palette, CMYK, RGBA, 1-bit)
becomes 8-bit RGB, turned upright by its EXIF orientation tag as any image viewer shows it; the
same geometric transform is applied to images and their masks so that metrics compare like with like.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import InputError
from ..options import AUTO, DEFAULT_CROP, DEFAULT_RESIZE, RESIZE_CHOICES
from .resample import AxisResample, axis_resample

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# PIL's default bomb limit (~179 Mpx) is for web images; a line camera frame stays well below 120 Mpx.
MAX_IMAGE_PIXELS = 120_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Preprocessing:
    """Geometry and normalisation shared by fitting, the exported graph and every runtime.

    The model input is ``width`` x ``crop`` pixels (W x H; ``width`` None: square, ``crop`` x ``crop``).
    ``mode``: ``crop`` resizes the shorter side to ``resize`` and centre-crops ``crop`` (authors'
    code; square only); ``squash`` resizes to the input size ignoring the aspect ratio; ``letterbox``
    fits the image inside the input size, keeping its aspect ratio, and pads the rest with black
    (centred). A non-square input lets elongated parts keep their aspect ratio: the network is
    fully convolutional. ``auto`` is chosen by the build from the training images
    (``data.geometry``) and never reaches a bundle.
    ``mean``/``std``: the input normalisation; ``None`` means the backbone's own (the one its
    weights were trained with), filled in by ``BackboneSpec.preprocessing`` before a network is made.
    """

    resize: int = DEFAULT_RESIZE
    crop: int = DEFAULT_CROP
    mode: str = "crop"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_CHOICES:
            raise InputError(f"unknown resize mode {self.mode!r}: choose one of {', '.join(RESIZE_CHOICES)}")
        if not (isinstance(self.crop, int) and 32 <= self.crop <= 4096):
            raise InputError(f"crop size must be an integer in 32..4096, got {self.crop!r}")
        if self.crop % 16:
            raise InputError(f"crop size must be a multiple of 16 (the stage-3 stride), got {self.crop}")
        if self.mode == "crop" and not (isinstance(self.resize, int) and self.resize >= self.crop):
            raise InputError(f"resize ({self.resize}) must be an integer >= crop ({self.crop})")
        if self.width is not None:
            if isinstance(self.width, bool) or not (isinstance(self.width, int) and 32 <= self.width <= 4096):
                raise InputError(f"width must be an integer in 32..4096, got {self.width!r}")
            if self.width % 16:
                raise InputError(f"width must be a multiple of 16 (the stage-3 stride), got {self.width}")
            if self.mode == "crop":
                raise InputError(f"width {self.width} needs resize mode squash or letterbox: "
                                 f"crop mode's input is the square crop x crop")

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the model input in pixels."""
        return (self.crop if self.width is None else self.width), self.crop

    def to_dict(self) -> dict:
        """The manifest entry; ``width`` only when set, so square bundles read as before."""
        entry = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if entry["width"] is None:
            del entry["width"]
        return entry

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """Inverse of :meth:`to_dict`; an entry without ``width`` (every bundle before it existed) is square."""
        width = d.get("width")
        return cls(
            resize=int(d["resize"]), crop=int(d["crop"]), mode=str(d["mode"]),
            mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
            width=None if width is None else int(width),
        )

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Preprocessing":
        """A bundle's preprocessing (its manifest's ``preprocessing`` entry)."""
        return cls.from_dict(manifest["preprocessing"])

    def normalisation(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std); an error while they are still the backbone's to decide."""
        if self.mean is None or self.std is None:
            raise ValueError("preprocessing mean/std not set: pass it through BackboneSpec.preprocessing first")
        return self.mean, self.std

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]]:
        """(resized size, crop box in the resized image, paste offset in the output) for an input size."""
        if self.mode == AUTO:
            raise ValueError("resize mode 'auto' is resolved by the build (data.geometry.choose_geometry) first")
        out_w, out_h = self.input_size
        if self.mode == "squash":
            return (out_w, out_h), (0, 0, out_w, out_h), (0, 0)
        if self.mode == "letterbox":
            # For a square input this is out / max(width, height), bit for bit.
            scale = min(out_w / width, out_h / height)
            w, h = min(out_w, max(1, round(width * scale))), min(out_h, max(1, round(height * scale)))
            return (w, h), (0, 0, w, h), ((out_w - w) // 2, (out_h - h) // 2)
        out = self.crop
        scale = self.resize / min(width, height)
        w, h = max(out, round(width * scale)), max(out, round(height * scale))
        left, top = (w - out) // 2, (h - out) // 2
        return (w, h), (left, top, left + out, top + out), (0, 0)

    def apply(self, image: Image.Image, resample: int = Image.BILINEAR) -> Image.Image:
        """Apply the geometry to a PIL image (RGB or mask); masks pass ``Image.NEAREST``."""
        size, box, offset = self.geometry(*image.size)
        # Masks (NEAREST) only: images go through pixels_array, whose resize the graph repeats.
        resized = image.resize(size, resample)
        if self.mode == "crop" or self.mode == "squash":
            return resized.crop(box)
        canvas = Image.new(image.mode, self.input_size, 0)
        canvas.paste(resized, offset)
        return canvas

    def geometry_entry(self, width: int, height: int) -> dict:
        """How a ``width`` x ``height`` frame becomes the model input and how the map goes back: for the
        manifest and the ONNX metadata, so that a program without this package can place the map."""
        (w, h), box, (ox, oy) = self.geometry(width, height)
        return {"frame": [width, height], "resized": [w, h], "crop_box": list(box), "paste": [ox, oy],
                "model_input": list(self.input_size),
                "inspected_box": list(self.inspected_box(width, height)),
                "map_to_frame": "pixel centres: frame_x + 0.5 = (x + 0.5 - paste_x + crop_left) * frame_w / resized_w, "
                                "likewise for y"}

    def inspected_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the part of a ``width`` x ``height`` image the model sees, in
        whole pixels of the image (the centre crop's region; the whole image for squash and letterbox)."""
        (w, h), (left, top, right, bottom), _ = self.geometry(width, height)
        sx, sy = width / w, height / h
        return round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)

    def map_to_image(self, model_map: np.ndarray, width: int, height: int, *,
                     any_of: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A model-resolution map [H, W] (the input's height and width) -> (float32 [height, width] in the image's own pixels,
        bool [height, width]: the pixels the model inspected). Outside the inspected region (what a
        centre crop leaves out) the map is 0; letterbox padding is dropped. Bilinear, or with
        ``any_of`` (a 0/1 mask) the area-weighted box filter, so that an image pixel is > 0 where
        its area touches any marked model pixel and no marked pixel is lost in a downscale."""
        (w, h), _, (ox, oy) = self.geometry(width, height)
        region = np.asarray(model_map, dtype=np.float32)
        if self.mode == "letterbox":
            region = region[oy : oy + h, ox : ox + w]
        left, top, right, bottom = self.inspected_box(width, height)
        full = np.zeros((height, width), dtype=np.float32)
        inspected = np.zeros((height, width), dtype=bool)
        size = (max(1, right - left), max(1, bottom - top))
        resample = Image.BOX if any_of else Image.BILINEAR
        full[top : top + size[1], left : left + size[0]] = np.asarray(
            Image.fromarray(np.ascontiguousarray(region), "F").resize(size, resample))
        inspected[top : top + size[1], left : left + size[0]] = True
        return full, inspected

    def valid_mask(self, width: int, height: int) -> np.ndarray:
        """bool [H, W] of the model input: pixels that come from the image (False on letterbox padding)."""
        out_w, out_h = self.input_size
        valid = np.zeros((out_h, out_w), dtype=bool)
        (w, h), _, (left, top) = self.geometry(width, height)
        if self.mode == "letterbox":
            valid[top : top + h, left : left + w] = True
        else:
            valid[:] = True
        return valid

    def tables(self, width: int, height: int) -> tuple[AxisResample, AxisResample, tuple[int, int]]:
        """The resize of a ``width`` x ``height`` image as two axis tables (only the kept outputs) and
        the paste offset (x, y) of the result in the model input (letterbox; (0, 0) otherwise)."""
        (w, h), (left, top, right, bottom), offset = self.geometry(width, height)
        return axis_resample(width, w, (left, right)), axis_resample(height, h, (top, bottom)), offset

    def pixels_array(self, pixels: np.ndarray) -> np.ndarray:
        """RGB uint8 [H, W, 3] -> float32 [3, crop, width] (the model input) in [0, 1] (mean/std are applied inside the network).

        The same arithmetic, in the same order, as the graph's ``frames`` input
        (``model.frames.FrameInput``): cast, resize the height (rows, in the frame's own layout),
        then the width, scale by 1/255 (on the small result), pad.
        """
        height, width = pixels.shape[:2]
        axis_w, axis_h, (left, top) = self.tables(width, height)
        x = axis_h.apply_first(pixels.astype(np.float32))  # [h, W, 3]
        x = axis_w.apply_last(x.transpose(2, 0, 1)) * np.float32(1.0 / 255.0)  # [3, h, w]
        if self.mode != "letterbox":
            return np.ascontiguousarray(x)
        out_w, out_h = self.input_size
        canvas = np.zeros((3, out_h, out_w), dtype=np.float32)
        canvas[:, top : top + x.shape[1], left : left + x.shape[2]] = x
        return canvas

    def image_array(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 [3, crop, width] in [0, 1] (see :meth:`pixels_array`)."""
        return self.pixels_array(np.asarray(to_rgb(image), dtype=np.uint8))

    def mask_array(self, mask: Image.Image, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """Mask PIL image -> bool [crop, width] (the model input) with the image's geometry (nearest neighbour, > 127).

        ``image_size`` (width, height) is the size of the image the mask belongs to: a mask of another
        size but the same aspect ratio (a mask saved at another resolution) is first scaled to it;
        a mask of another shape belongs to another image and is refused.
        """
        mask = to_gray8(mask)
        if image_size is not None and mask.size != tuple(image_size):
            (mw, mh), (iw, ih) = mask.size, image_size
            if abs(mw / mh - iw / ih) > 0.01 * (iw / ih):
                raise InputError(f"mask size {mw}x{mh} does not match its image ({iw}x{ih})")
            mask = mask.resize((iw, ih), Image.NEAREST)
        return np.asarray(self.apply(mask, Image.NEAREST)) > 127


def to_gray8(image: Image.Image) -> Image.Image:
    """Any mask mode -> 8-bit L (16-bit scaled, 1-bit expanded to 0/255)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Decode any PIL mode to 8-bit RGB: 16-bit is scaled (not clipped), alpha is dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_gray8(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


# EXIF orientations 5 to 8 turn the picture by 90 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (a camera held sideways stores the pixels
    turned and the tag to undo it); an image without the tag is returned as it is."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as upright (EXIF orientation applied) RGB; raise InputError
    naming the file if it cannot be read."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(upright(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path}: image larger than {MAX_IMAGE_PIXELS:,} pixels (decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or truncated image ({exc})") from None


def load_mask(path: str | Path) -> Image.Image:
    """Open a ground-truth mask as 8-bit L (binarised by Preprocessing.mask_array).

    Like an image, a mask is turned upright by its own EXIF orientation tag; masks are usually
    written by tools without one (drawn on the picture as a viewer shows it, i.e. upright) and are
    then read as stored.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_gray8(upright(img))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: unreadable mask ({exc})") from None


def load_batch(paths: Sequence[Path], prep: Preprocessing) -> np.ndarray:
    """Decode and preprocess a batch of images into float32 [B, 3, crop, width] in [0, 1]."""
    return np.stack([prep.image_array(load_image(p)) for p in paths])


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the upright image (as :func:`load_image` gives it) from the file header,
    without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS:
                return height, width
            return width, height
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
