"""Square cuts of an MVTec-layout category: the square images `--resize-mode auto` must not lose on.

Every image (train and test) is cut to a square of its short side: centred for normal images; for
a defect image, placed along the long side where it holds the most defect pixels (centred when its
mask is empty), so that no defect image loses its defect; its mask is cut the same way. Written
as PNG (no second JPEG compression) under DST, in the same layout; the source is only read.

    python benchmarks/square_cuts.py ../shared/data/magnetic_tile /tmp/magnetic_tile_square
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _window(length: int, side: int, weight: np.ndarray | None) -> int:
    """Start of the ``side``-long window along an axis of ``length``: the most ``weight`` (per
    position along that axis), ties and no weight: centred."""
    centred = (length - side) // 2
    if weight is None or weight.sum() == 0:
        return centred
    sums = np.convolve(weight, np.ones(side), mode="valid")
    best = np.flatnonzero(sums == sums.max())
    return int(best[np.argmin(np.abs(best - centred))])


def cut(image: Image.Image, mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]:
    """The square cut of ``image`` (and ``mask``, the same size) as described above."""
    w, h = image.size
    side = min(w, h)
    defect = None if mask is None else np.asarray(mask.convert("L")) > 127
    if w >= h:
        x, y = _window(w, side, None if defect is None else defect.sum(axis=0)), 0
    else:
        x, y = 0, _window(h, side, None if defect is None else defect.sum(axis=1))
    box = (x, y, x + side, y + side)
    return image.crop(box), None if mask is None else mask.crop(box)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    if not (args.src / "train").is_dir() or not (args.src / "test").is_dir():
        sys.exit(f"error: {args.src} has no train/ and test/ folders")
    if args.dst.exists():
        sys.exit(f"error: {args.dst} exists; give a new folder")
    count = 0
    for path in sorted(p for p in args.src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(args.src)
        if rel.parts[0] not in ("train", "test"):
            continue  # masks are cut with their image
        mask_path = args.src / "ground_truth" / rel.parts[1] / f"{path.stem}_mask.png"
        has_mask = rel.parts[0] == "test" and rel.parts[1] != "good" and mask_path.is_file()
        with Image.open(path) as image:
            mask = Image.open(mask_path) if has_mask else None
            square, square_mask = cut(image, mask)
        out = args.dst / rel.with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        square.save(out)
        if square_mask is not None:
            target = args.dst / "ground_truth" / rel.parts[1] / mask_path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            square_mask.save(target)
        count += 1
    print(f"{count} square cuts under {args.dst}")


if __name__ == "__main__":
    main()
