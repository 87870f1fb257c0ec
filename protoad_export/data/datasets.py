"""Where the images are: folders of normal images and MVTec-style categories (train/good,
test/<type>, ground_truth/<type>/<stem>_mask.*), with their labels and masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from .images import IMAGE_EXTENSIONS, Preprocessing, image_size, load_mask


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files ignored)."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def collect_images(items: Iterable[str | Path]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of image files."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(list_images(p))
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(Path().glob(str(item))) if not p.is_absolute() else sorted(Path("/").glob(str(p)[1:]))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                raise InputError(f"no images match {item}")
            out.extend(files)
    return sorted(dict.fromkeys(out))


def is_mvtec_category(root: str | Path) -> bool:
    return (Path(root) / "train" / "good").is_dir()


def training_images(data: str | Path) -> list[Path]:
    """Normal training images: ``DATA/train/good`` of an MVTec-style category, else ``DATA`` itself."""
    data = Path(data)
    if not data.exists():
        raise InputError(f"data folder not found: {data}")
    return list_images(data / "train" / "good" if is_mvtec_category(data) else data)


@dataclass
class LabelledImage:
    """One test image of an MVTec-style category."""

    path: Path
    defect: str  # "good" or the defect type
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.defect != "good")


def category_test_set(root: str | Path, require_masks: bool = True) -> list[LabelledImage]:
    """The test set of an MVTec-style category: ``test/<type>/*`` with ``ground_truth/<type>/<stem>_mask.*``."""
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise InputError(f"{root} has no test/ folder: not an MVTec-style category")
    samples: list[LabelledImage] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in list_images(defect_dir):
            mask = None
            if defect != "good":
                candidates = sorted((root / "ground_truth" / defect).glob(f"{path.stem}_mask.*"))
                if candidates:
                    mask = candidates[0]
                elif require_masks:
                    raise InputError(
                        f"no ground-truth mask for {path} (expected {root / 'ground_truth' / defect / (path.stem + '_mask.png')})"
                    )
            samples.append(LabelledImage(path, defect, mask))
    if not samples:
        raise InputError(f"no test images under {test_dir}")
    return samples


def mask_for(sample: "LabelledImage", prep: Preprocessing) -> np.ndarray:
    """The sample's ground-truth mask with the image's geometry: bool [H, W] of the model input
    (all False if none)."""
    if sample.mask_path is None:
        return np.zeros(prep.input_size[::-1], dtype=bool)
    try:
        return prep.mask_array(load_mask(sample.mask_path), image_size(sample.path))
    except InputError as exc:
        raise InputError(f"{sample.mask_path}: {exc}") from None


@dataclass
class TestSet:
    """Labelled test images with masks at the model input's resolution."""

    samples: list[LabelledImage]
    labels: np.ndarray  # int [N]
    masks: np.ndarray  # bool [N, H, W] (the model input)
    pixel_ok: np.ndarray  # bool [N]: usable for pixel metrics
    valid: np.ndarray  # bool [N, H, W]: pixels of the part (False on letterbox padding)

    @property
    def defects(self) -> list[str]:
        return sorted({s.defect for s in self.samples if s.defect != "good"})


def load_test_set(data: str | Path, prep: Preprocessing, *, limit: int | None = None) -> TestSet:
    """The category's test images, labels and masks through ``prep`` (the bundle's geometry); with
    ``limit``, that many images evenly spread over the sorted set (both normal and defective kept)."""
    samples = category_test_set(data, require_masks=False)
    if limit:
        samples = evenly_spaced(samples, limit)
    masks = np.zeros((len(samples), *prep.input_size[::-1]), dtype=bool)
    valid = np.zeros_like(masks)
    for i, s in enumerate(samples):
        masks[i] = mask_for(s, prep)  # scaled to its image first, then the image's geometry
        valid[i] = prep.valid_mask(*image_size(s.path))
    labels = np.array([s.label for s in samples])
    pixel_ok = (labels == 0) | masks.any(axis=(1, 2))
    if labels.all() or not labels.any():
        raise InputError(f"{data}: evaluation needs both good and defective test images")
    return TestSet(samples, labels, masks, pixel_ok, valid)


def evenly_spaced(items: Sequence, m: int) -> list:
    """``m`` items at positions floor((i + 0.5) * n / m), i < m: the centres of m equal slices."""
    n = len(items)
    m = min(m, n)
    if m <= 0:
        return []
    return [items[((2 * i + 1) * n) // (2 * m)] for i in range(m)]
