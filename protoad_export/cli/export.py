"""``protoad-export export triton`` and ``protoad-export export deepstream``: serving layouts of a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from .. import options as O
from . import handle_errors, main


def _log(message: str) -> None:
    click.echo(message, err=message.startswith("warning"))


@main.group("export")
def export_group() -> None:
    """Serving layouts of a bundle: a Triton model repository or a DeepStream nvinfer config."""


@export_group.command("triton")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repo", required=True, type=click.Path(path_type=Path),
              help="Triton model repository to write NAME/ into (created if missing; other models are left alone).")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice([b for b in O.RUNTIME_BACKENDS if b != "torch"]),
              help="onnxruntime: the ONNX graph; tensorrt: the engine compiled by `protoad-export compile`.")
@click.option("--precision", default=None, type=click.Choice(O.PRECISIONS),
              help="ONNX graph to serve [default: fp32; the engine is always fp16].")
@click.option("--name", default=None, help="Model name and folder [default: the bundle folder's name].")
@handle_errors
def triton_cmd(bundle, repo, backend, precision, name) -> None:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (or model.plan) for Triton."""
    from ..export.serving import write_triton_repository

    write_triton_repository(bundle, repo, backend=backend, name=name, precision=precision, log=_log)


@export_group.command("deepstream")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Config file to write [default: BUNDLE/nvinfer_config.txt].")
@click.option("--engine/--onnx", "use_engine", default=None,
              help="Name the compiled TensorRT engine, or the ONNX file for nvinfer to build from "
                   "[default: the engine when one was compiled].")
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(O.PRECISIONS),
              help="ONNX graph and network-mode with --onnx (the engine is fp16).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="nvinfer batch-size, the number of sources batched by nvstreammux [default: the batch profile's OPT].")
@click.option("--gpu-id", default=0, show_default=True, type=click.IntRange(min=0))
@handle_errors
def deepstream_cmd(bundle, out, use_engine, precision, batch_size, gpu_id) -> None:
    """Write a Gst-nvinfer config file (network-type=100, raw tensors as NvDsInferTensorMeta)."""
    from ..export.serving import write_deepstream_config

    write_deepstream_config(bundle, out, use_engine=use_engine, precision=precision, batch_size=batch_size,
                            gpu_id=gpu_id, log=_log)
