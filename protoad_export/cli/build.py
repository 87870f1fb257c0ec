"""``protoad-export build``."""

from __future__ import annotations

from pathlib import Path

import click

from .. import options as O
from . import BatchProfile, handle_errors, main


def _frame_size(ctx, param, value):
    """``WxH`` -> (W, H)."""
    if value is None:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT in pixels, e.g. 1280x1024, got {value!r}") from None
    if width < 1 or height < 1:
        raise click.BadParameter(f"expected positive WIDTHxHEIGHT, got {value!r}")
    return width, height


class PrototypeRule(click.ParamType):
    """``auto`` or an integer >= 2."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == O.AUTO:
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"expected '{O.AUTO}' or an integer >= 2, got {value!r}", param, ctx)
        if number < 2:
            self.fail(f"expected '{O.AUTO}' or an integer >= 2, got {value!r}", param, ctx)
        return number


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Bundle name (a folder created under --out).")
@click.option("--out", default="engines", show_default=True, type=click.Path(path_type=Path))
@click.option("--backbone", default=O.DEFAULT_BACKBONE, show_default=True, type=click.Choice(O.BACKBONES))
@click.option("--weights", default=None, help=f"Weights file (state dict), or '{O.RANDOM_WEIGHTS}' for timing runs.")
@click.option("--max-prototypes", default=O.DEFAULT_MAX_PROTOTYPES, show_default=True, type=PrototypeRule(),
              help="N: FINCH's first partition with fewer clusters (the paper's rule, N=10000). auto: the coarsest "
                   "level whose held-out normal patches stay within "
                   f"{O.AUTO_MARGIN:.0%} of the finest level's distance, never coarser than the paper's rule.")
@click.option("--prototype-cap", default=O.AUTO_PROTOTYPE_CAP, show_default=True, type=click.IntRange(min=2),
              help="With --max-prototypes auto: at most this many prototypes (the speed budget; where no FINCH level "
                   "within it is close enough to the finest, a partition of exactly this many).")
@click.option("--align", default=O.ALIGN_MODES[0], show_default=True, type=click.Choice(O.ALIGN_MODES),
              help="How stages 2-3 are resized to the stage-1 grid (paper: bilinear; authors' code: nearest).")
@click.option("--normalize-prototypes/--raw-prototypes", default=True, show_default=True,
              help="Re-normalise cluster means (true cosine) or keep raw means (authors' code).")
@click.option("--resize-mode", default=O.DEFAULT_RESIZE_MODE, show_default=True, type=click.Choice(O.RESIZE_CHOICES),
              help="auto: chosen from the training images' sizes (whole part, aspect ratio kept; the authors' crop "
                   "for square frames); the build prints and records the choice.")
@click.option("--resize", default=O.DEFAULT_RESIZE, show_default=True, type=click.IntRange(min=32))
@click.option("--crop", default=O.DEFAULT_CROP, show_default=True, type=click.IntRange(min=32))
@click.option("--width", default=None, type=click.IntRange(min=32),
              help="Model input width for squash/letterbox (--crop is its height) [default: square, or auto's choice].")
@click.option("--input", "input_kind", default=O.DEFAULT_INPUT, show_default=True, type=click.Choice(O.INPUT_CHOICES),
              help="Graph input: uint8 camera frames (preprocessing inside the graph) or a preprocessed float tensor; "
                   "auto: frames when the training images share one size.")
@click.option("--input-size", default=None, metavar="WxH", callback=_frame_size,
              help="Camera frame size for --input frames [default: the training images' size when they share one].")
@click.option("--channel-order", default=O.CHANNEL_ORDERS[0], show_default=True, type=click.Choice(O.CHANNEL_ORDERS),
              help="Frame channels: rgb, bgr (OpenCV, GStreamer) or gray (one channel).")
@click.option("--device", default=O.DEVICES[0], show_default=True, type=click.Choice(O.DEVICES))
@click.option("--batch", "batch_profile", default=":".join(map(str, O.DEFAULT_BATCH_PROFILE)), show_default=True,
              type=BatchProfile(), help="TensorRT optimisation profile for the batch axis.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass during feature extraction.")
@click.option("--neighbours", default=O.NEIGHBOUR_METHODS[0], show_default=True, type=click.Choice(O.NEIGHBOUR_METHODS),
              help="FINCH first-neighbour search.")
@click.option("--holdout", default=O.DEFAULT_HOLDOUT, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Share of the normal images kept out of fitting; their scores calibrate the threshold.")
@click.option("--max-train-patches", default=None, type=click.IntRange(min=2),
              help="Cluster at most this many patch features: a uniform sample drawn with seed 0 "
                   "(deterministic), trading accuracy for time. Default: all.")
@click.option("--prototype-chunk", default=O.PROTOTYPE_CHUNK, show_default=True, type=click.IntRange(min=1),
              help="Prototypes per 1x1 conv of the graph; the chunks' maxima are combined by Max (same scores).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def build(data, name, out, backbone, weights, max_prototypes, prototype_cap, align, normalize_prototypes, resize_mode,
          resize, crop, width, input_kind, input_size, channel_order, device, batch_profile, batch_size, neighbours, holdout,
          max_train_patches, prototype_chunk, quiet) -> None:
    """Fit prototypes on the normal images in DATA and export the complete network.

    DATA is a folder of defect-free images or an MVTec-style category (its train/good is used).
    """
    from ..build.pipeline import BuildConfig, build as run_build
    from ..data.images import Preprocessing

    config = BuildConfig(
        backbone=backbone, weights=weights, max_prototypes=max_prototypes, prototype_cap=prototype_cap, align=align,
        normalize_prototypes=normalize_prototypes,
        preprocessing=Preprocessing(resize=resize, crop=crop, mode=resize_mode, width=width),
        device=device, batch_profile=batch_profile, batch_size=batch_size, neighbours=neighbours,
        holdout=holdout, max_train_patches=max_train_patches, prototype_chunk=prototype_chunk,
        input=input_kind, input_size=input_size, channel_order=channel_order,
    )
    result = run_build(data, name, out, config, log=click.echo, progress=not quiet)
    m = result.manifest
    secs = m["build"]["seconds"]
    click.echo("")
    click.echo(f"bundle: {result.bundle_dir}")
    click.echo(f"  input: {result.contract.describe()}")
    kept = next((row for row in m["prototypes"].get("selection", {}).get("levels", []) if row["chosen"]), None)
    where = f"; level {kept['name']} kept" if kept else ""
    click.echo(f"  prototypes: {m['prototypes']['count']:,} (FINCH partitions {m['finch']['partition_sizes']}{where})")
    for fname, entry in m["files"].items():
        click.echo(f"  {fname:<18} {entry['bytes'] / 2**20:8.1f} MiB  sha256 {entry['sha256'][:12]}")
    click.echo("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()) + f"; peak RSS {m['build']['peak_rss_mib']:.0f} MiB")
    _compile_after_build(result.bundle_dir, batch_profile)


def _compile_after_build(bundle_dir: Path, batch_profile) -> None:
    """Last step of build: compile when TensorRT and a GPU are here, else say the ONNX files are ready."""
    try:
        from ..export import tensorrt as trt_engine
    except ImportError:
        trt_engine = None
    missing = trt_engine.missing_requirements() if trt_engine else "TensorRT support is not installed"
    if missing:
        click.echo(f"ONNX files are ready; not compiled to TensorRT here ({missing}): "
                   f"run `protoad-export compile {bundle_dir}` on the target machine")
        return
    trt_engine.compile_engine(bundle_dir, batch_profile=batch_profile, log=click.echo)


