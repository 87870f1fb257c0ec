"""``protoad-export build``."""

from __future__ import annotations

from pathlib import Path

import click

from . import BatchProfile, handle_errors, main

@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Engine directory name (created under --out).")
@click.option("--out", default="engines", show_default=True, type=click.Path(path_type=Path))
@click.option("--backbone", default="wide_resnet50_2", show_default=True,
              type=click.Choice(["wide_resnet50_2", "resnet18", "efficientnet_lite0"]))
@click.option("--weights", default=None, help="Weights file (state dict), or 'random' for timing runs.")
@click.option("--max-prototypes", default=10_000, show_default=True, type=click.IntRange(min=2),
              help="FINCH stops at the first partition with fewer clusters.")
@click.option("--align", default="bilinear", show_default=True, type=click.Choice(["bilinear", "nearest"]),
              help="How stages 2-3 are resized to the stage-1 grid (paper: bilinear; authors' code: nearest).")
@click.option("--normalize-prototypes/--raw-prototypes", default=True, show_default=True,
              help="Re-normalise cluster means (true cosine) or keep raw means (authors' code).")
@click.option("--resize-mode", default="crop", show_default=True, type=click.Choice(["crop", "squash", "letterbox"]))
@click.option("--resize", default=256, show_default=True, type=click.IntRange(min=32))
@click.option("--crop", default=224, show_default=True, type=click.IntRange(min=32))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch", "batch_profile", default="1:8:32", show_default=True, type=BatchProfile(),
              help="TensorRT optimisation profile for the batch axis.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass during feature extraction.")
@click.option("--neighbours", default="auto", show_default=True, type=click.Choice(["auto", "exact", "approx"]),
              help="FINCH first-neighbour search.")
@click.option("--holdout", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Share of the normal images kept out of fitting; their scores calibrate the threshold.")
@click.option("--max-train-patches", default=None, type=click.IntRange(min=2),
              help="Cluster at most this many patch features: a uniform sample drawn with seed 0 "
                   "(deterministic), trading accuracy for time. Default: all.")
@click.option("--prototype-chunk", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Prototypes per 1x1 conv of the graph; the chunks' maxima are combined by Max "
                   "(same scores; 1024 was fastest on a CPU, see benchmarks/RESULTS.md 9).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def build(data, name, out, backbone, weights, max_prototypes, align, normalize_prototypes, resize_mode,
          resize, crop, device, batch_profile, batch_size, neighbours, holdout, max_train_patches, prototype_chunk,
          quiet) -> None:
    """Fit prototypes on the normal images in DATA and export the complete network.

    DATA is a folder of defect-free images or an MVTec-style category (its train/good is used).
    """
    from ..build.pipeline import BuildConfig, build as run_build
    from ..data.images import Preprocessing

    config = BuildConfig(
        backbone=backbone, weights=weights, max_prototypes=max_prototypes, align=align,
        normalize_prototypes=normalize_prototypes,
        preprocessing=Preprocessing(resize=resize, crop=crop, mode=resize_mode),
        device=device, batch_profile=batch_profile, batch_size=batch_size, neighbours=neighbours,
        holdout=holdout, max_train_patches=max_train_patches, prototype_chunk=prototype_chunk,
    )
    result = run_build(data, name, out, config, log=click.echo, progress=not quiet)
    m = result.manifest
    secs = m["build"]["seconds"]
    click.echo("")
    click.echo(f"engine directory: {result.engine_dir}")
    click.echo(f"  prototypes: {m['prototypes']['count']:,} (FINCH partitions {m['finch']['partition_sizes']})")
    for fname, entry in m["files"].items():
        click.echo(f"  {fname:<18} {entry['bytes'] / 2**20:8.1f} MiB  sha256 {entry['sha256'][:12]}")
    click.echo("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()) + f"; peak RSS {m['build']['peak_rss_mib']:.0f} MiB")
    _compile_after_build(result.engine_dir, batch_profile)


def _compile_after_build(engine_dir: Path, batch_profile) -> None:
    """Last step of build: compile when TensorRT and a GPU are here, else say the ONNX files are ready."""
    try:
        from ..export import tensorrt as trt_engine
    except ImportError:
        trt_engine = None
    missing = trt_engine.missing_requirements() if trt_engine else "TensorRT support is not installed"
    if missing:
        click.echo(f"ONNX files are ready; not compiled to TensorRT here ({missing}): "
                   f"run `protoad-export compile {engine_dir}` on the target machine")
        return
    trt_engine.compile_engine(engine_dir, batch_profile=batch_profile, log=click.echo)


