"""``predict``: images -> score, decision, heat map, overlay and defect mask per image, plus CSV/JSON.

A decision needs a threshold: ``--threshold`` or the one ``calibrate`` stored in the manifest;
without either, ``predict`` stops with an error rather than hand out undecided results.

Output folder::

    results.csv, results.json     one row per image (unreadable images: decision "error")
    heatmaps/<name>.png           anomaly map at the image's own resolution (camera pixels), colour
                                  scale fixed from 0 to 2 x threshold for all images (the threshold
                                  is mid-scale), so pictures are comparable
    overlays/<name>.png           the heat map blended over the image; what a centre crop left
                                  uninspected is dimmed
    masks/<name>.png              binary defect mask, 255 where map > threshold, image resolution

``<name>`` is the file's stem; a stem shared by several inputs is prefixed with its folder name
(``crack_000``), and any remaining repeat gets ``-2``, ``-3``...
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .bundle import atomic_path, atomic_write_bytes, atomic_write_json, output_folder
from .errors import InputError
from .data.images import load_image
from .data.datasets import collect_images
from .contract import DECISION_RULE, check_threshold, manifest_threshold

HEATMAP_SCALE = 2.0  # the colour scale runs from 0 to this times the threshold
OVERLAY_ALPHA = 0.5


@dataclass
class ImageResult:
    """One image's outcome; files are relative to the output folder."""

    path: str
    score: float | None
    decision: str  # "defective", "good" or "error"
    defect_pixels: float | None  # share of the inspected pixels above the threshold
    heatmap: str | None
    overlay: str | None
    mask: str | None
    error: str | None = None
    width: int | None = None  # the image's size: heat map, overlay and mask have it too
    height: int | None = None
    inspected_box: list[int] | None = None  # (left, top, right, bottom) the model saw, in image pixels


def colorize(anomaly_map: np.ndarray, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """Map [H, W] -> uint8 RGB [H, W, 3] with the fixed scale 0..vmax (clipped)."""
    from matplotlib import colormaps

    scaled = np.clip(anomaly_map / vmax, 0.0, 1.0)
    return (colormaps[cmap](scaled)[..., :3] * 255 + 0.5).astype(np.uint8)


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """File stems; a stem shared by several inputs gets its folder name in front, then -2, -3..."""
    from collections import Counter

    stems = Counter(p.stem for p in paths)
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        base = p.stem if stems[p.stem] == 1 else f"{p.parent.name}_{p.stem}"
        n = seen.get(base, 0) + 1
        seen[base] = n
        names.append(base if n == 1 else f"{base}-{n}")
    return names


def resolve_threshold(manifest: dict, override: float | None, *, bundle_dir: str | Path | None = None) -> tuple[float, str]:
    """The threshold to decide with and where it came from; InputError when there is none."""
    if override is not None:
        return check_threshold(override, "--threshold"), "--threshold"
    value = manifest_threshold(manifest, bundle_dir)
    if value is None:
        raise InputError("the engine has no threshold: run `protoad-export calibrate BUNDLE` or pass --threshold")
    return value, f"manifest ({manifest['threshold'].get('method', '?')})"


def predict(
    bundle_dir: str | Path,
    items: Sequence[str | Path],
    out_dir: str | Path,
    *,
    backend: str = "onnxruntime",
    threshold: float | None = None,
    batch_size: int = 8,
    precision: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> list[ImageResult]:
    """Score files, folders and globs with a bundle and write the pictures and tables to ``out_dir``."""
    from .runtime import load, predict_paths

    out_dir = output_folder(out_dir)
    if threshold is not None:
        check_threshold(threshold, "--threshold")  # before any work
    paths = collect_images(items)
    if threshold is not None:
        check_threshold(threshold, "--threshold")  # before any work
    runtime = load(bundle_dir, backend, precision=precision, device=device)
    value, source = resolve_threshold(runtime.manifest, threshold, bundle_dir=bundle_dir)
    prep = runtime.preprocessing
    for sub in ("heatmaps", "overlays", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    vmax = HEATMAP_SCALE * value
    names = dict(zip(paths, _unique_names(paths)))
    pred = predict_paths(runtime, paths, batch_size, progress=progress, skip_unreadable=True, desc="predict")
    results = [ImageResult(str(p), None, "error", None, None, None, None, error=msg) for p, msg in pred.errors]
    for p, amap, score in zip(pred.paths, pred.maps, pred.scores):
        results.append(_write_outputs(out_dir, p, names[p], prep, amap, float(score), value, vmax))
    order = {str(p): i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order[r.path])
    if all(r.decision == "error" for r in results):
        raise InputError(f"none of the {len(results)} images could be read and scored (first: {results[0].error})")
    _write_tables(out_dir, results, {
        "bundle": str(Path(bundle_dir).resolve()), "backend": backend, "threshold": value,
        "threshold_source": source, "decision_rule": DECISION_RULE, "heatmap_scale": [0.0, vmax],
        "resolution": "each image's own pixels; outside the model's inspected box the map is 0",
        "input": runtime.contract.to_manifest(), "preprocessing": prep.to_dict(),
    })
    return results


def _write_outputs(out_dir: Path, path: Path, name: str, prep, amap: np.ndarray, score: float,
                   threshold: float, vmax: float) -> ImageResult:
    rgb = np.asarray(load_image(path), dtype=np.uint8)
    height, width = rgb.shape[:2]
    full, inspected = prep.map_to_image(amap, width, height)
    heat = colorize(full, vmax)
    overlay = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * heat
    overlay[~inspected] = 0.5 * rgb[~inspected]  # not inspected: dimmed, no heat
    # The mask from the model's own decision per pixel, so that a defective part always shows
    # mask pixels (a bilinear resize of the map could shave its peak below the threshold).
    mask = prep.map_to_image((amap > threshold).astype(np.float32), width, height, any_of=True)[0] > 0
    files = {"heatmap": f"heatmaps/{name}.png", "overlay": f"overlays/{name}.png", "mask": f"masks/{name}.png"}
    atomic_write_bytes(out_dir / files["heatmap"], _png_bytes(heat, "RGB"))
    atomic_write_bytes(out_dir / files["overlay"], _png_bytes((overlay + 0.5).astype(np.uint8), "RGB"))
    atomic_write_bytes(out_dir / files["mask"], _png_bytes(mask.astype(np.uint8) * 255, "L"))
    decision = "defective" if score > threshold else "good"
    box = list(prep.inspected_box(width, height))
    return ImageResult(str(path), score, decision, float(mask[inspected].mean()), **files, width=width, height=height,
                       inspected_box=box)


def _write_tables(out_dir: Path, results: list[ImageResult], meta: dict) -> None:
    rows = [asdict(r) for r in results]
    with atomic_path(out_dir / "results.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    counts = {k: sum(r.decision == k for r in results) for k in ("good", "defective", "error")}
    atomic_write_json(out_dir / "results.json", {**meta, "counts": counts, "images": rows})
