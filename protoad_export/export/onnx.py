"""ONNX: trace the whole network (FP32 and strongly typed FP16) and check what TensorRT will accept."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from ..bundle import atomic_path
from ..contract import OUTPUT_NAMES, InputContract

OPSET = 18
MAX_EXPORT_BATCH = 1024
# metadata_props keys: the bundle describes itself to a program that only has the ONNX file.
METADATA_PREFIX = "protoad."

# Ops the network may contain, all supported by the TensorRT 10/11 ONNX parser. No Col2Im, no
# antialiased Resize, no ops with runtime-computed axes. TopK and GatherElements: the two-stage
# prototype search (model/search.py; TensorRT's TopK takes K <= 3840, a constant).
TENSORRT_OPS = frozenset({
    "Add", "Cast", "Clip", "Concat", "Constant", "Conv", "Div", "Expand", "Gather", "GatherElements", "HardSigmoid",
    "HardSwish", "MatMul", "Max", "MaxPool", "Mul", "Neg", "Pad", "Reciprocal", "ReduceMax", "ReduceSum", "Relu",
    "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Sqrt", "Sub", "TopK", "Transpose", "Unsqueeze",
})
# Inputs that must be compile-time constants (initializers or Constant nodes) for TensorRT: the
# axes of reductions, Unsqueeze and Slice, and TopK's K.
_AXES_INPUT = {"ReduceMax": 1, "ReduceSum": 1, "Unsqueeze": 1, "Slice": 3, "TopK": 1}


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and warnings per stage; keep the CLI's output readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def export_onnx(network: torch.nn.Module, path: str | os.PathLike, contract: InputContract, *,
                metadata: dict[str, str] | None = None, opset: int = OPSET) -> Path:
    """Trace ``network`` (its input as ``contract`` says) with a dynamic batch axis into ``path``
    (atomically), with ``metadata`` as ``metadata_props``, and run the full checker."""
    network = network.eval().cpu()
    shape = contract.shape(2)
    if contract.kind == "frames":
        example = torch.randint(0, 256, shape, dtype=torch.uint8)
    else:
        example = torch.rand(*shape)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    with atomic_path(path) as tmp, _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            network, (example,), dynamo=True, opset_version=opset, input_names=[contract.name],
            output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},), external_data=False,
        )
        model = program.model_proto
        model.producer_name = "protoad-export"
        for key, value in sorted((metadata or {}).items()):
            entry = model.metadata_props.add()
            entry.key, entry.value = METADATA_PREFIX + key, value
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, str(tmp))
    return Path(path)


@dataclass
class GraphReport:
    """What a graph contains, for the TensorRT checks and for the manifest."""

    ops: dict[str, int]
    opset: int
    cast_targets: list[str]
    conv_dtypes: dict[str, int]
    problems: list[str]
    cast_wrapped_reductions: list[str] = dataclasses.field(default_factory=list)  # see _cast_wrapped


_DTYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
          onnx.TensorProto.UINT8: "uint8"}


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The bundle's ``metadata_props`` (without the key prefix)."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


_REDUCTIONS = frozenset({"ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ReduceL2", "ArgMax", "ArgMin"})


def _cast_wrapped(graph: onnx.GraphProto, types: dict[str, int]) -> list[str]:
    """Reductions whose input is an FP16 tensor cast up to FP32 and whose output is cast back to FP16.

    The exporter writes ``torch.amax`` of FP16 this way; a strongly typed engine then reduces in
    FP32 against the precision plan (``network.py``). A deliberate FP32 reduction (the L2 norm's
    sum of squares) is not cast back down right after, so it is not flagged.
    """
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)

    def cast_to(node, dtype) -> bool:
        return node is not None and node.op_type == "Cast" and any(
            a.name == "to" and onnx.helper.get_attribute_value(a) == dtype for a in node.attribute)

    wrapped = []
    for node in graph.node:
        if node.op_type not in _REDUCTIONS or not node.input:
            continue
        up = producer.get(node.input[0])
        if not (cast_to(up, onnx.TensorProto.FLOAT) and types.get(up.input[0]) == onnx.TensorProto.FLOAT16):
            continue
        if any(cast_to(c, onnx.TensorProto.FLOAT16) for c in consumers[node.output[0]]):
            wrapped.append(node.name or node.output[0])
    return wrapped


def inspect_graph(model: onnx.ModelProto) -> GraphReport:
    """Op counts, cast targets, conv input dtypes and anything TensorRT would reject."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    problems = []
    ops = collections.Counter(n.op_type for n in graph.node)
    for op in sorted(set(ops) - TENSORRT_OPS):
        problems.append(f"op {op} is not on the TensorRT allow-list")
    conv_dtypes: collections.Counter = collections.Counter()
    casts = []
    for node in graph.node:
        if node.op_type in _AXES_INPUT and len(node.input) > _AXES_INPUT[node.op_type]:
            axes = node.input[_AXES_INPUT[node.op_type]]
            if axes and axes not in constants:
                what = "K" if node.op_type == "TopK" else "axes"
                problems.append(f"{node.op_type} {node.name} takes a runtime-computed {what} ({axes})")
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("antialias", 0):
                problems.append(f"Resize {node.name} is antialiased")
        if node.op_type == "Cast":
            to = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            casts.append(_DTYPE.get(to, str(to)))
        if node.op_type == "Conv":
            conv_dtypes[_DTYPE.get(types.get(node.input[0]), "unknown")] += 1
    wrapped = _cast_wrapped(graph, types)
    for name in wrapped:
        problems.append(f"reduction {name} runs in FP32 between casts of an FP16 tensor")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return GraphReport(dict(sorted(ops.items())), opset, casts, dict(conv_dtypes), problems, wrapped)
