"""A synthetic MVTec-style category: textured parts with drawn scratches, spots and cracks, and
their masks. Deterministic per seed; the offline demo and the tests use it where real data is absent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..bundle import atomic_path
from ..errors import InputError

DEFECTS = ("scratch", "spot", "crack")


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A brushed-metal part: anisotropic grain, faint stripes, a light gradient; float RGB in [0, 1]."""
    grain = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=(0.6, 6.0))
    grain /= grain.std() + 1e-9
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    stripes = np.sin(2 * np.pi * y / rng.uniform(9, 13) + rng.uniform(0, 2 * np.pi))
    gradient = (x / width - 0.5) * rng.uniform(-0.08, 0.08)
    gray = rng.uniform(0.45, 0.55) + 0.05 * grain + 0.02 * stripes + gradient
    tint = np.array([1.0, 1.0, 1.05]) * rng.uniform(0.97, 1.03, size=3)
    return np.clip(gray[..., None] * tint, 0.0, 1.0)


def _draw_defect(kind: str, rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, float]:
    """A defect as an L mask (255 inside) and the brightness change it applies."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    # Defects stay in the central 60 %, which every resize mode keeps.
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.4) * min(width, height)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(2, 4)))
        delta = rng.choice([-1, 1]) * rng.uniform(0.25, 0.35)
    elif kind == "spot":
        rx, ry = rng.uniform(5, 11, size=2) * min(width, height) / 192
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        delta = -rng.uniform(0.25, 0.35)
    elif kind == "crack":
        points = [(cx, cy)]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(6, 10))):
            heading += rng.uniform(-0.8, 0.8)
            step = rng.uniform(5, 10) * min(width, height) / 192
            points.append((points[-1][0] + step * np.cos(heading), points[-1][1] + step * np.sin(heading)))
        draw.line(points, fill=255, width=2, joint="curve")
        delta = -rng.uniform(0.3, 0.4)
    else:
        raise InputError(f"unknown defect kind {kind!r}: choose one of {', '.join(DEFECTS)}")
    return mask, float(delta)


def _save_png(array: np.ndarray, path: Path, mode: str) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array, mode).save(tmp, format="PNG")


@dataclass
class DatasetSpec:
    """Sizes of the synthetic category."""

    train: int = 30
    test_good: int = 6
    test_per_defect: int = 6
    width: int = 240
    height: int = 180


def make_dataset(root: str | Path, seed: int = 0, spec: DatasetSpec | None = None) -> Path:
    """Write ``root/train/good``, ``root/test/<type>`` and ``root/ground_truth/<type>/<stem>_mask.png``."""
    spec = spec or DatasetSpec()
    root = Path(root)
    if spec.width < 32 or spec.height < 32:
        raise InputError("synthetic images must be at least 32 x 32")
    jobs = [("train", "good", i) for i in range(spec.train)] + [("test", "good", i) for i in range(spec.test_good)]
    jobs += [("test", d, i) for d in DEFECTS for i in range(spec.test_per_defect)]
    for split, kind, i in jobs:
        # One generator per image: adding images of one kind never changes the others.
        rng = np.random.default_rng([seed, ["train", "test"].index(split), (("good",) + DEFECTS).index(kind), i])
        image = _texture(rng, spec.width, spec.height)
        if kind != "good":
            mask, delta = _draw_defect(kind, rng, spec.width, spec.height)
            soft = ndimage.gaussian_filter(np.asarray(mask, np.float64) / 255, 0.7)[..., None]
            image = np.clip(image + delta * soft, 0.0, 1.0)
            _save_png(np.asarray(mask), root / "ground_truth" / kind / f"{i:03d}_mask.png", "L")
        _save_png((image * 255 + 0.5).astype(np.uint8), root / split / kind / f"{i:03d}.png", "RGB")
    return root
