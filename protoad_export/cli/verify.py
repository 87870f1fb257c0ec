"""``protoad-export verify``: accept a bundle on this machine against its golden outputs."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import BACKEND_SPECS
from . import handle_errors, main


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True, type=click.Choice(list(BACKEND_SPECS)),
              help="Backend to check (repeatable) [default: onnxruntime and onnxruntime-fp16].")
@click.option("--atol", type=click.FloatRange(min=0), default=None, help="Absolute tolerance [default: 1e-4 FP32, 2e-2 FP16].")
@click.option("--rtol", type=click.FloatRange(min=0), default=None, help="Relative tolerance [default: 1e-3 FP32, 5e-2 FP16].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the full report here.")
@handle_errors
def verify_cmd(bundle, backends, atol, rtol, json_path) -> None:
    """Run BUNDLE's golden inputs through each backend and compare with the PyTorch FP32 outputs
    stored at build time (needs neither torch nor the backbone's weights).

    Exits 5 when a backend is past a tolerance, or with the error's code when a backend cannot run
    here, after printing (and writing) the report.
    """
    from ..bundle import output_folder
    from ..evaluation.verify import DEFAULT_BACKENDS, check_report, format_report, verify, write_json

    if json_path:
        output_folder(json_path.parent, "--json")
    report = verify(bundle, backends or DEFAULT_BACKENDS, atol=atol, rtol=rtol, log=click.echo)
    click.echo(format_report(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"report: {json_path}")
    check_report(report)
