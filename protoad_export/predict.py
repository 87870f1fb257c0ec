"""``predict``: images -> score, decision, heat map, overlay and defect mask per image, plus CSV/JSON.

A decision needs a threshold: ``--threshold`` or the one ``calibrate`` stored in the manifest;
without either, ``predict`` stops with an error rather than hand out undecided results.

Output folder::

    results.csv, results.json     one row per image (unreadable images: decision "error")
    heatmaps/<name>.png           anomaly map, colour scale fixed from 0 to 2 x threshold for all
                                  images (the threshold is mid-scale), so pictures are comparable
    overlays/<name>.png           the heat map blended over the *preprocessed* image (after the
                                  engine's resize/crop), i.e. exactly what the network saw
    masks/<name>.png              binary defect mask, 255 where map > threshold, at crop resolution

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

from .artifacts import atomic_path, atomic_write_bytes, atomic_write_json, output_folder
from .errors import InputError
from .images import collect_images, load_image
from .thresholds import DECISION_RULE, check_threshold, manifest_threshold

HEATMAP_SCALE = 2.0  # the colour scale runs from 0 to this times the threshold
OVERLAY_ALPHA = 0.5


@dataclass
class ImageResult:
    """One image's outcome; files are relative to the output folder."""

    path: str
    score: float | None
    decision: str  # "defective", "good" or "error"
    defect_pixels: float | None  # share of the crop above the threshold
    heatmap: str | None
    overlay: str | None
    mask: str | None
    error: str | None = None


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


def resolve_threshold(manifest: dict, override: float | None, *, engine_dir: str | Path | None = None) -> tuple[float, str]:
    """The threshold to decide with and where it came from; InputError when there is none."""
    if override is not None:
        return check_threshold(override, "--threshold"), "--threshold"
    value = manifest_threshold(manifest, engine_dir)
    if value is None:
        raise InputError("the engine has no threshold: run `protoad-export calibrate ENGINE_DIR` or pass --threshold")
    return value, f"manifest ({manifest['threshold'].get('method', '?')})"


def predict(
    engine_dir: str | Path,
    items: Sequence[str | Path],
    out_dir: str | Path,
    backend: str = "onnxruntime",
    threshold: float | None = None,
    batch_size: int = 8,
    precision: str | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> list[ImageResult]:
    """Score files, folders and globs with an engine and write the pictures and tables to ``out_dir``."""
    from tqdm.auto import tqdm

    from .runtime import fitting_batch, load, preprocessing

    out_dir = output_folder(out_dir)
    if threshold is not None:
        check_threshold(threshold, "--threshold")  # before any work
    paths = collect_images(items)
    runtime = load(engine_dir, backend, precision, device)
    batch_size = fitting_batch(runtime.manifest, batch_size)
    value, source = resolve_threshold(runtime.manifest, threshold, engine_dir=engine_dir)
    prep = preprocessing(runtime.manifest)
    for sub in ("heatmaps", "overlays", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    vmax = HEATMAP_SCALE * value
    names = _unique_names(paths)
    results: list[ImageResult] = []
    with tqdm(total=len(paths), unit="img", disable=not progress, desc="predict") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = list(zip(paths[start : start + batch_size], names[start : start + batch_size]))
            decoded = []
            for p, name in chunk:
                try:
                    decoded.append((p, name, prep.image_array(load_image(p))))
                except InputError as exc:
                    results.append(ImageResult(str(p), None, "error", None, None, None, None, str(exc)))
            if decoded:
                batch = np.stack([a for _, _, a in decoded])
                maps, scores = runtime.predict(batch)
                for (p, name, image), amap, score in zip(decoded, maps, scores):
                    results.append(_write_outputs(out_dir, p, name, image, amap, float(score), value, vmax))
            bar.update(len(chunk))
    order = {str(p): i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order[r.path])
    if all(r.decision == "error" for r in results):
        raise InputError(f"none of the {len(results)} images could be read (first: {results[0].error})")
    _write_tables(out_dir, results, {
        "engine": str(Path(engine_dir).resolve()), "backend": backend, "threshold": value,
        "threshold_source": source, "decision_rule": DECISION_RULE,
        "heatmap_scale": [0.0, vmax], "overlay": "heat map over the preprocessed (resized/cropped) image",
        "crop": prep.crop, "preprocessing": prep.to_dict(),
    })
    return results


def _write_outputs(out_dir: Path, path: Path, name: str, image: np.ndarray, amap: np.ndarray,
                   score: float, threshold: float, vmax: float) -> ImageResult:
    heat = colorize(amap, vmax)
    rgb = (image.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    overlay = ((1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * heat + 0.5).astype(np.uint8)
    mask = amap > threshold
    files = {"heatmap": f"heatmaps/{name}.png", "overlay": f"overlays/{name}.png", "mask": f"masks/{name}.png"}
    atomic_write_bytes(out_dir / files["heatmap"], _png_bytes(heat, "RGB"))
    atomic_write_bytes(out_dir / files["overlay"], _png_bytes(overlay, "RGB"))
    atomic_write_bytes(out_dir / files["mask"], _png_bytes(mask.astype(np.uint8) * 255, "L"))
    decision = "defective" if score > threshold else "good"
    return ImageResult(str(path), score, decision, float(mask.mean()), **files)


def _write_tables(out_dir: Path, results: list[ImageResult], meta: dict) -> None:
    rows = [asdict(r) for r in results]
    with atomic_path(out_dir / "results.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    counts = {k: sum(r.decision == k for r in results) for k in ("good", "defective", "error")}
    atomic_write_json(out_dir / "results.json", {**meta, "counts": counts, "images": rows})
