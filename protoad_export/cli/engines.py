"""``protoad-export compile`` and ``protoad-export bench``."""

from __future__ import annotations

from pathlib import Path

import click

from .. import options as O
from . import BatchProfile, handle_errors, main


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@main.command("compile")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--batch", "batch_profile", default=None, type=BatchProfile(),
              help="Optimisation profile for the batch axis [default: the one recorded at build time].")
@click.option("--workspace", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Workspace memory limit in GiB [default: TensorRT's].")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 5),
              help="TensorRT builder optimisation level.")
@handle_errors
def compile_cmd(bundle_dir, batch_profile, workspace, opt_level) -> None:
    """Compile BUNDLE/model.fp16.onnx into a TensorRT engine for this GPU."""
    from ..export.tensorrt import compile_engine

    compile_engine(bundle_dir, batch_profile=batch_profile, workspace_gib=workspace,
                   optimization_level=opt_level, log=click.echo)


def _batch_sizes(ctx, param, value: str) -> tuple[int, ...]:
    try:
        # An empty item ("1,,2", a trailing comma) is refused like any other typo, not skipped.
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"comma-separated positive integers expected, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"comma-separated positive integers expected, got {value!r}")
    return sizes


def print_report(report: dict) -> None:
    """Fidelity and speed tables on the terminal."""
    ref = report["reference"]
    click.echo(f"\nfidelity vs PyTorch FP32 ({report['data']['images']} images; reference image AUROC "
               f"{_fmt(ref['image_auroc'])}, pixel AUROC {_fmt(ref['pixel_auroc'])})")
    click.echo(f"  {'backend':<20} {'map max':>9} {'map mean':>9} {'score max':>9} {'score mean':>10} "
               f"{'img AUROC':>9} {'pix AUROC':>9}  result")
    for f in report["fidelity"]:
        result = "PASS" if f["passed"] else "FAIL: " + "; ".join(f["failures"])
        click.echo(f"  {f['backend']:<20} {f['map_max_abs']:9.2e} {f['map_mean_abs']:9.2e} {f['score_max_abs']:9.2e} "
                   f"{f['score_mean_abs']:10.2e} {_fmt(f['image_auroc']):>9} {_fmt(f['pixel_auroc']):>9}  {result}")
    for name, why in report["skipped"].items():
        click.echo(f"  {name:<20} skipped: {why}")
    if report["speed"]:
        click.echo("\nspeed (ms per batch; end to end = H2D + compute + D2H; GPU compute by CUDA events)")
        click.echo(f"  {'backend':<20} {'batch':>5} {'median':>9} {'p90':>9} {'p99':>9} {'img/s':>9} "
                   f"{'GPU median':>10} {'H2D':>7} {'D2H':>7} {'GPU img/s':>9} graph")
        for s in report["speed"]:
            e = s["end_to_end"]
            gpu = s["compute"]
            click.echo(
                f"  {s['backend']:<20} {s['batch']:>5} {e['median']:9.2f} {e['p90']:9.2f} {e['p99']:9.2f} "
                f"{s['throughput']:9.1f} {_fmt(gpu and gpu['median'], '.3f'):>10} "
                f"{_fmt(s['h2d'] and s['h2d']['median'], '.3f'):>7} {_fmt(s['d2h'] and s['d2h']['median'], '.3f'):>7} "
                f"{_fmt(s['compute_throughput'], '.1f'):>9} {'yes' if s['cuda_graph'] else 'no'}"
            )


@main.command("bench")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True,
              type=click.Choice(list(O.BACKEND_SPECS)),
              help="Backend to check (repeatable) [default: every one that can run here].")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Test images: an MVTec-style category or a folder [default: recorded at build time].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most this many test images (evenly spread).")
@click.option("--fps", is_flag=True, help="Also measure speed (trtexec-style).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, callback=_batch_sizes)
@click.option("--device", default=O.DEVICES[0], show_default=True, type=click.Choice(O.DEVICES),
              help="Device of the PyTorch reference and torch backends.")
@click.option("--atol", type=click.FloatRange(min=0), default=None, help="Absolute tolerance [default: 1e-4 FP32, 2e-2 FP16].")
@click.option("--rtol", type=click.FloatRange(min=0), default=None, help="Relative tolerance [default: 1e-3 FP32, 5e-2 FP16].")
@click.option("--auroc-tol", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Largest allowed drop of image or pixel AUROC against the reference.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--iterations", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--duration", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Time each case for at least this many seconds.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the full report here.")
@handle_errors
def bench_cmd(bundle_dir, backends, data, limit, fps, batch_sizes, device, atol, rtol, auroc_tol, warmup,
              iterations, duration, json_path) -> None:
    """Check every backend against PyTorch FP32 on real images, then (--fps) time it.

    Exits non-zero (5) when a backend exceeds a tolerance, or (4) when a backend named with
    --backend could not run here, after printing and writing the report.
    """
    from ..bundle import output_folder
    from ..evaluation.bench import bench, check_tolerances, write_json

    if json_path:
        output_folder(json_path.parent, "--json")
    report = bench(bundle_dir, backends=backends or None, data=data, limit=limit, fps=fps, batch_sizes=batch_sizes,
                   device=device, atol=atol, rtol=rtol, auroc_tol=auroc_tol, warmup=warmup, iterations=iterations,
                   min_seconds=duration, log=click.echo)
    print_report(report)
    if json_path:
        write_json(report, json_path)
        click.echo(f"\nreport: {json_path}")
    check_tolerances(report)
