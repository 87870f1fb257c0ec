"""Patch features: stage maps aligned to the stage-1 grid, concatenated and L2-normalised.

``PatchFeatures`` is the part of the network shared by fitting and inference, so prototypes and
test features come from the very same module. ``extract_features`` streams a folder of images
through it into a disk-backed FP16 array, so memory does not grow with the dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..data.images import Preprocessing, load_image
from ..options import ALIGN_MODES



def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but PyTorch sees no CUDA GPU")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)


class PatchFeatures(nn.Module):
    """Normalised RGB -> [B, C1+C2+C3, H/4, W/4] patch features (not yet L2-normalised).

    ``align``: ``bilinear`` (the paper's text) or ``nearest`` (the authors' released code).
    ``grid``: the stage-1 grid (rows, columns), or its side when square.
    """

    def __init__(self, backbone: nn.Module, align: str, grid: int | tuple[int, int]) -> None:
        super().__init__()
        if align not in ALIGN_MODES:
            raise InputError(f"unknown align mode {align!r}: choose one of {', '.join(ALIGN_MODES)}")
        self.backbone = backbone
        self.align = align
        self.grid = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(x)
        size = self.grid
        aligned = [maps[0]]
        for m in maps[1:]:
            if self.align == "nearest":
                aligned.append(F.interpolate(m, size=size, mode="nearest"))
            else:
                aligned.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False))
        return torch.cat(aligned, dim=1)


def l2_normalize(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each channel vector by its L2 norm, in the features' own dtype (callers pick it)."""
    return features * torch.rsqrt(torch.clamp(torch.sum(features * features, dim=1, keepdim=True), min=eps))


class Normalize(nn.Module):
    """The backbone's input mean/std inside the graph, so every runtime feeds plain [0, 1] RGB."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class FeatureExtractor(nn.Module):
    """[0,1] RGB -> L2-normalised patch features in FP32: the fitting-side half of the network."""

    def __init__(self, patch_features: PatchFeatures, prep: Preprocessing) -> None:
        super().__init__()
        self.normalize = Normalize(*prep.normalisation())
        self.patch_features = patch_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.patch_features(self.normalize(x)).float())


def _decode(path: Path, prep: Preprocessing) -> np.ndarray | InputError:
    try:
        return prep.image_array(load_image(path))
    except InputError as exc:
        return exc


def load_batches(paths: Sequence[Path], prep: Preprocessing, batch_size: int, workers: int | None = None):
    """Yield (paths, decoded arrays or errors), decoding the next batch while the model runs."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = None
        for chunk in batches:
            future = [pool.submit(_decode, p, prep) for p in chunk]
            if pending is not None:
                yield pending[0], [f.result() for f in pending[1]]
            pending = (chunk, future)
        if pending is not None:
            yield pending[0], [f.result() for f in pending[1]]


@dataclass
class ExtractedFeatures:
    """Disk-backed features of the images that decoded, and the ones that did not."""

    array: np.ndarray  # float16 [rows, C], a memmap view
    grid: tuple[int, int]
    used: list[Path]
    skipped: list[tuple[Path, str]]


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    paths: Sequence[Path],
    prep: Preprocessing,
    out_path: str | os.PathLike,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> ExtractedFeatures:
    """Stream ``paths`` through ``extractor`` into an FP16 ``.npy`` memmap of shape [N*h*w, C].

    Rows are ordered image by image, row-major over the feature grid. FP16 keeps 11 bits of
    mantissa: ample for unit vectors whose nearest-neighbour structure is what FINCH uses.
    Unreadable images are skipped and reported; the caller decides how many it tolerates.
    Batches are appended with plain file writes (not through a writable mapping, whose dirty
    pages would count as this process's memory), so resident memory does not grow with N.
    """
    if not paths:
        raise InputError("no images to extract features from")
    device = torch.device(device)
    extractor = extractor.to(device).eval()
    width, height = prep.input_size
    probe = extractor(torch.zeros(1, 3, height, width, device=device))
    _, dim, h, w = probe.shape
    shape = (len(paths) * h * w, dim)
    handle = open(out_path, "wb")
    np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                                                  "fortran_order": False, "shape": shape})
    data_start = handle.tell()
    row = 0
    used: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    with handle, tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for chunk, decoded in load_batches(list(paths), prep, batch_size):
            good = [(p, a) for p, a in zip(chunk, decoded) if not isinstance(a, InputError)]
            skipped += [(p, str(a)) for p, a in zip(chunk, decoded) if isinstance(a, InputError)]
            if good:
                feats = extractor(torch.from_numpy(np.stack([a for _, a in good])).to(device))
                finite = torch.isfinite(feats).flatten(1).all(dim=1).cpu().tolist()
                if not all(finite):
                    # NaN features (broken weights) would give NaN prototypes and scores: every part "good".
                    first = next(p for (p, _), ok in zip(good, finite) if not ok)
                    raise InputError(f"[1/4] features: the backbone gives NaN or infinite features "
                                     f"(first: {Path(first).name}): check the weights (--weights); nothing was written")
                flat = feats.permute(0, 2, 3, 1).reshape(-1, dim).to(torch.float16).cpu().numpy()
                handle.write(np.ascontiguousarray(flat).tobytes())
                row += len(flat)
                used += [p for p, _ in good]
            bar.update(len(chunk))
        handle.truncate(data_start + shape[0] * dim * 2)  # rows of skipped images: never read
    array = np.load(out_path, mmap_mode="r")
    return ExtractedFeatures(array[:row], (h, w), used, skipped)
