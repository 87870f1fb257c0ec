"""``protoad-export eval``, ``calibrate``, ``predict`` and ``demo``: thin wrappers over the Python API."""

from __future__ import annotations

from pathlib import Path

import click

from .. import options as O
from . import handle_errors, main

BACKEND_CHOICE = click.Choice(O.RUNTIME_BACKENDS)


@main.command("eval")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--backend", default="onnxruntime", show_default=True, type=BACKEND_CHOICE)
@click.option("--precision", default=None, type=click.Choice(O.PRECISIONS), help="Default: the backend's.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(O.DEVICES[1:]),
              help="Device of the torch backend and of the kNN baseline.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--baseline", default=None, type=click.Choice(O.BASELINES),
              help="Also score the exact kNN memory bank (PatchCore without subsampling) on the same features.")
@click.option("--baseline-train-images", default=None, type=click.IntRange(min=1),
              help="Bank from this many fitting images, evenly spaced by name (default: all; exact search is costly).")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Folder for evaluation.json and the plots [default: eval-<bundle name>].")
@click.option("--json", "json_path", default=None, type=click.Path(path_type=Path), help="Also write the report here.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def eval_command(bundle_dir, data, backend, precision, device, batch_size, baseline, baseline_train_images,
                 out, json_path, quiet) -> None:
    """Image AUROC, pixel AUROC and PRO per defect type and overall on an MVTec-style category DATA."""
    from ..bundle import atomic_write_json, output_folder
    from ..evaluation.evaluate import evaluate_bundle, format_table

    out = out or Path(f"eval-{Path(bundle_dir).resolve().name}")
    if json_path:
        output_folder(json_path.parent, "--json")
    report = evaluate_bundle(bundle_dir, data, backend=backend, precision=precision, batch_size=batch_size,
                             baseline=baseline, baseline_train_images=baseline_train_images, device=device,
                             out_dir=out, progress=not quiet, log=click.echo)
    click.echo(format_table(report))
    if json_path:
        atomic_write_json(json_path, report)
    click.echo(f"report and plots: {out}/ (evaluation.json, roc.png, histogram.png)")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--target-frr", default=0.01, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Share of normal parts you accept to reject; the threshold is that quantile of the hold-out scores.")
@click.option("--data", default=None, type=click.Path(path_type=Path),
              help="A labelled MVTec-style category: choose the F1-optimal threshold on its test images instead.")
@click.option("--backend", default="onnxruntime", show_default=True, type=BACKEND_CHOICE, help="Used with --data.")
@click.option("--quiet", is_flag=True)
@handle_errors
def calibrate(bundle_dir, target_frr, data, backend, quiet) -> None:
    """Set the engine's decision threshold (defective if score > threshold) and store it in its manifest."""
    from ..evaluation.thresholds import calibrate as run_calibrate

    t = run_calibrate(bundle_dir, target_frr, data, backend, progress=not quiet)
    d = t.details
    click.echo(f"threshold {t.value:.6f} ({t.rule}), method {t.method}, stored in {bundle_dir}/manifest.json")
    if t.method == "frr":
        click.echo(f"  {d['normal_scores']} hold-out scores: empirical FRR {100 * d['empirical_frr']:.2f} % "
                   f"(target {100 * d['target_frr']:.2f} %), 95 % upper bound on the true FRR {100 * d['frr_upper_95']:.1f} %")
        if not d["resolved"]:
            click.echo(f"  warning: {d['normal_scores']} scores cannot resolve a {100 * d['target_frr']:.2f} % FRR; "
                       "the largest hold-out score is used (build with more images or a larger --holdout)")
    else:
        click.echo(f"  F1 {d['f1']:.3f}, precision {d['precision']:.3f}, recall {d['recall']:.3f} on {d['images']} images "
                   "(the images the threshold was chosen on: evaluate on other images for an unbiased figure)")


@main.command("predict")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--backend", default="onnxruntime", show_default=True, type=BACKEND_CHOICE)
@click.option("--precision", default=None, type=click.Choice(O.PRECISIONS))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(O.DEVICES[1:]),
              help="Device of the torch backend; with onnxruntime, cuda needs a GPU execution provider (refused without one).")
@click.option("--threshold", default=None, type=float, help="Override the manifest's threshold.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--quiet", is_flag=True)
@handle_errors
def predict_command(bundle_dir, images, out, backend, precision, device, threshold, batch_size, quiet) -> None:
    """Score IMAGES (files, folders, globs): decisions, heat maps, overlays, masks, results.csv/json in --out.

    Heat maps use one colour scale for all images, 0 to 2x the threshold. Overlays and masks are at
    the engine's crop resolution, on the preprocessed (resized/cropped) image the network saw.
    """
    from ..predict import predict

    results = predict(bundle_dir, images, out, backend=backend, threshold=threshold, batch_size=batch_size,
                      precision=precision, device=device, progress=not quiet)
    counts = {k: sum(r.decision == k for r in results) for k in ("good", "defective", "error")}
    for r in results:
        if r.decision == "error":
            click.echo(f"warning: {r.error}", err=True)
    click.echo(f"{len(results)} images: {counts['defective']} defective, {counts['good']} good"
               + (f", {counts['error']} unreadable" if counts["error"] else "") + f"; results in {out}/results.csv")


@main.command()
@click.option("--out", default="protoad-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--data", default=None, type=click.Path(path_type=Path),
              help="Run on this MVTec-style category instead of the synthetic one (e.g. ../shared/data/magnetic_tile).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--crop", default=160, show_default=True, type=click.IntRange(min=32))
@click.option("--no-baseline", is_flag=True, help="Skip the kNN baseline.")
@click.option("--quiet", is_flag=True)
@handle_errors
def demo(out, data, seed, crop, no_baseline, quiet) -> None:
    """Offline end-to-end demo on a CPU: dataset, build, calibrate, eval, predict (a few minutes)."""
    from ..demo import run_demo

    result = run_demo(out, data, seed, crop=crop, baseline=not no_baseline, log=click.echo, progress=not quiet)
    click.echo("")
    click.echo(f"dataset:     {result.data}")
    click.echo(f"bundle:      {result.bundle_dir}  (ONNX FP32/FP16, prototypes, golden outputs, manifest with threshold)")
    click.echo(f"evaluation:  {result.evaluation}/evaluation.json, roc.png, histogram.png")
    click.echo(f"predictions: {result.predictions}/results.csv, heatmaps/, overlays/, masks/")
