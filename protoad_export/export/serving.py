"""Serving layouts: a Triton model repository and a DeepStream ``nvinfer`` config from a bundle.

Torch-free (numpy, onnx). Every name, dimension and data type comes from the ONNX graph itself,
checked against the manifest's ``input``/``outputs`` entries, so the layouts follow whichever
graph input the bundle was built with (the float ``image`` tensor [B, 3, H, W] or uint8
``frames`` [B, H, W, C]). Nothing here starts a server: the Triton config is plain protobuf text
(the tests parse it into Triton's own ``ModelConfig``), the nvinfer file a GKeyFile.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..bundle import (
    atomic_write_bytes, commit_directory, read_manifest, sha256_file, staging_directory, verify_file,
)
from ..errors import ArtifactError, InputError, MissingDependencyError
from ..options import PRECISIONS

TRITON_BACKENDS = ("onnxruntime", "tensorrt")
MARKER = "protoad-export.json"  # in each model folder this tool writes; its absence protects a user's folder
DEEPSTREAM_HEADER = "# nvinfer config written by protoad-export"
# 1/255 as a double; nvinfer stores it as a float, which rounds it to float32(1/255). NVIDIA's samples
# write 0.0039215697906911373, one float32 step above it.
NET_SCALE_1_255 = repr(1 / 255)

# ONNX element types -> Triton's model-config data types (Triton's "Datatypes" table).
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FLOAT16": "TYPE_FP16", "FLOAT": "TYPE_FP32", "DOUBLE": "TYPE_FP64",
    "STRING": "TYPE_STRING", "BFLOAT16": "TYPE_BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the ONNX file declares it."""

    name: str
    onnx_type: str  # TensorProto element type name: FLOAT, UINT8, ...
    shape: tuple[int | str, ...]  # fixed sizes as int, symbolic ones (the batch) as their name

    @property
    def triton_type(self) -> str:
        if self.onnx_type not in _TRITON_TYPES:
            raise ArtifactError(f"tensor {self.name!r} has ONNX type {self.onnx_type}, which Triton does not serve")
        return _TRITON_TYPES[self.onnx_type]


def graph_io(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX file, initializers excluded."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise ArtifactError(f"{path} is not a readable ONNX file ({exc})") from None
    graph = model.graph
    constants = {init.name for init in graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return TensorSpec(value.name, onnx.TensorProto.DataType.Name(t.elem_type), dims)

    return [spec(v) for v in graph.input if v.name not in constants], [spec(v) for v in graph.output]


def _manifest_names(entry: Any) -> list[str]:
    """Tensor names a manifest ``input``/``outputs`` entry declares (a dict with ``name``, a
    name -> shape mapping, or a list of either)."""
    if isinstance(entry, dict):
        return [str(entry["name"])] if "name" in entry else [str(k) for k in entry]
    if isinstance(entry, list):
        return [n for item in entry for n in _manifest_names(item)]
    return []


def _check_against_manifest(bundle_dir: Path, manifest: dict, onnx_name: str,
                            inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    for key, specs in (("input", inputs), ("outputs", outputs)):
        declared = _manifest_names(manifest.get(key))
        if declared and sorted(declared) != sorted(s.name for s in specs):
            raise ArtifactError(
                f"{bundle_dir / onnx_name} has {key} {', '.join(s.name for s in specs)} but the manifest declares "
                f"{', '.join(declared)}: the bundle is inconsistent, rebuild it"
            )


def _batched(specs: list[TensorSpec]) -> bool:
    """Triton's batching rule: every tensor's first dimension is the (variable) batch."""
    return all(s.shape and isinstance(s.shape[0], str) for s in specs)


def _threshold(manifest: dict) -> tuple[float | None, str | None]:
    entry = manifest.get("threshold")
    if isinstance(entry, dict) and entry.get("value") is not None:
        return float(entry["value"]), entry.get("rule")
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry), None
    return None, None


def _onnx_file(bundle_dir: Path, manifest: dict, precision: str) -> Path:
    entry = manifest.get("onnx", {}).get(precision)
    if not entry:
        raise ArtifactError(f"{bundle_dir} has no {precision.upper()} ONNX file")
    return verify_file(bundle_dir, manifest, entry["file"])


def _engine(bundle_dir: Path, manifest: dict, for_what: str) -> tuple[Path, dict] | None:
    """The one compiled TensorRT engine of the bundle, verified; None when none was compiled."""
    engines = manifest.get("tensorrt", {}).get("engines", {})
    if not engines:
        return None
    if len(engines) > 1:
        raise InputError(
            f"{bundle_dir} holds engines for {len(engines)} GPUs ({', '.join(sorted(engines))}): {for_what} serves one; "
            "copy the bundle and remove the other engines' entries by recompiling there"
        )
    record = next(iter(engines.values()))
    return verify_file(bundle_dir, manifest, record["file"]), record


def _no_engine(bundle_dir: Path) -> MissingDependencyError:
    return MissingDependencyError(
        f"{bundle_dir} has no compiled TensorRT engine: run `protoad-export compile {bundle_dir}` on the target GPU "
        "first, or use the ONNX graph (--backend onnxruntime)"
    )


# --------------------------------------------------------------------------------------------
# Triton


def _pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal (UTF-8 bytes; non-printable ones as octal escapes)."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensor_block(spec: TensorSpec, batched: bool) -> str:
    dims = list(spec.shape[1:] if batched else spec.shape)
    dims = [d if isinstance(d, int) else -1 for d in dims]
    lines = [f"    name: {_pbtxt_string(spec.name)}", f"    data_type: {spec.triton_type}"]
    if not dims:
        # A [batch] tensor: Triton needs non-empty dims, so the API shape is [batch, 1] and the
        # model's own [batch] is restored by reshape (Triton's model_configuration.md, "Reshape").
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    return "  {\n" + "\n".join(lines) + "\n  }"


def triton_parameters(manifest: dict) -> dict[str, str]:
    """The model-config ``parameters``: threshold, decision rule, preprocessing and geometry (strings)."""
    params: dict[str, str] = {}
    value, rule = _threshold(manifest)
    if value is not None:
        params["threshold"] = repr(value)
        params["decision_rule"] = rule or "defective if score > threshold"
    for key, val in sorted(manifest.get("preprocessing", {}).items()):
        params[f"preprocessing.{key}"] = val if isinstance(val, str) else json.dumps(val)
    for key in ("input", "geometry"):
        if manifest.get(key) is not None:
            params[key] = json.dumps(manifest[key], sort_keys=True)
    backbone = manifest.get("backbone", {})
    if isinstance(backbone, dict) and backbone.get("name"):
        params["backbone"] = str(backbone["name"])
    prototypes = manifest.get("prototypes", {})
    if isinstance(prototypes, dict) and prototypes.get("count") is not None:
        params["prototypes"] = str(prototypes["count"])
    params["protoad_export_version"] = __version__
    return params


def triton_config_text(*, name: str, backend: str, batch_profile: dict, inputs: list[TensorSpec],
                       outputs: list[TensorSpec], parameters: dict[str, str], comment: str) -> str:
    """config.pbtxt for ``inputs``/``outputs`` (protobuf text format of Triton's ModelConfig)."""
    batched = _batched(inputs + outputs)
    lines = [f"# {line}" for line in comment.splitlines()]
    lines.append(f"name: {_pbtxt_string(name)}")
    lines.append('backend: "onnxruntime"' if backend == "onnxruntime" else 'platform: "tensorrt_plan"')
    max_batch = int(batch_profile["max"]) if batched else 0
    lines.append(f"max_batch_size: {max_batch}")
    lines.append("input [\n" + ",\n".join(_tensor_block(s, batched) for s in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor_block(s, batched) for s in outputs) + "\n]")
    if batched:
        preferred = sorted({int(batch_profile["opt"]), max_batch} - {0})
        lines.append("dynamic_batching {\n  preferred_batch_size: [ " + ", ".join(map(str, preferred)) + " ]\n}")
    for key, val in parameters.items():
        lines.append(f"parameters {{\n  key: {_pbtxt_string(key)}\n  value: {{ string_value: {_pbtxt_string(val)} }}\n}}")
    return "\n".join(lines) + "\n"


def _check_model_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise InputError(f"model name must be a plain folder name, got {name!r}")


def _ours(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("tool") == "protoad-export"
    except (OSError, ValueError, AttributeError):
        return False


def _refuse_foreign(final: Path) -> None:
    if final.exists() and not (final.is_dir() and _ours(final)):
        raise InputError(
            f"{final} exists and was not written by protoad-export (no {MARKER}): choose another --name or --repo; "
            "nothing was replaced"
        )


def write_triton_repository(
    bundle_dir: str | os.PathLike,
    repo_dir: str | os.PathLike,
    *,
    backend: str = "onnxruntime",
    name: str | None = None,
    precision: str | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write ``repo_dir/NAME/{config.pbtxt, 1/model.onnx | 1/model.plan}`` for Triton; return the model folder.

    ``backend``: ``onnxruntime`` serves the bundle's ONNX graph of ``precision`` (default fp32);
    ``tensorrt`` serves its compiled FP16 engine (refused when none was compiled). ``name``
    defaults to the bundle folder's name. The model folder is staged and renamed into place; an
    existing one is replaced only if this tool wrote it.
    """
    log = log or (lambda _m: None)
    bundle_dir = Path(bundle_dir)
    if backend not in TRITON_BACKENDS:
        raise InputError(f"unknown Triton backend {backend!r}: choose one of {', '.join(TRITON_BACKENDS)}")
    if precision is None:
        precision = "fp16" if backend == "tensorrt" else "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend == "tensorrt" and precision != "fp16":
        raise InputError("the compiled TensorRT engine is FP16: use --precision fp16 or --backend onnxruntime")
    name = bundle_dir.resolve().name if name is None else name
    _check_model_name(name)
    repo_dir = Path(repo_dir)
    if repo_dir.exists() and not repo_dir.is_dir():
        raise InputError(f"--repo {repo_dir} is a file, not a folder")
    final = repo_dir / name
    _refuse_foreign(final)

    manifest = read_manifest(bundle_dir, verify=False)
    onnx_path = _onnx_file(bundle_dir, manifest, precision)  # the engine's source for tensorrt: same tensors
    inputs, outputs = graph_io(onnx_path)
    _check_against_manifest(bundle_dir, manifest, onnx_path.name, inputs, outputs)
    batch_profile = manifest["batch_profile"]
    if backend == "tensorrt":
        found = _engine(bundle_dir, manifest, "a Triton model folder")
        if found is None:
            raise _no_engine(bundle_dir)
        source, record = found
        batch_profile = record.get("batch_profile", batch_profile)  # compile --batch may differ from the build's
        target = "model.plan"
    else:
        source, target = onnx_path, "model.onnx"
    expected = manifest["files"][source.name]["sha256"]

    parameters = triton_parameters(manifest)
    if "threshold" not in parameters:
        log(f"warning: {bundle_dir} is uncalibrated (no threshold in its manifest): the config carries no 'threshold' "
            f"parameter; run `protoad-export calibrate {bundle_dir}` and export again")
    comment = (f"Written by protoad-export {__version__} from {bundle_dir.resolve()} ({source.name}, sha256 {expected}).\n"
               "Regenerate with `protoad-export export triton`; hand edits are replaced.")
    text = triton_config_text(name=name, backend=backend, batch_profile=batch_profile, inputs=inputs,
                              outputs=outputs, parameters=parameters, comment=comment)

    staging = staging_directory(final)
    try:
        (staging / "1").mkdir()
        shutil.copyfile(source, staging / "1" / target)
        if sha256_file(staging / "1" / target) != expected:  # the copy, not only the source, matches the manifest
            raise ArtifactError(f"{source} changed while it was copied: nothing was replaced")
        atomic_write_bytes(staging / "config.pbtxt", text.encode())
        marker = {"tool": "protoad-export", "version": __version__, "bundle": str(bundle_dir.resolve()),
                  "source": source.name, "backend": backend, "precision": precision,
                  "files": {f"1/{target}": expected}}
        atomic_write_bytes(staging / MARKER, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
        # mkdtemp made the folder 0700: a server running as another user must be able to read it.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)
        commit_directory(staging, final, check=_refuse_foreign)  # again at the swap: the check above was before the copy
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"Triton model: {final} ({'platform tensorrt_plan' if backend == 'tensorrt' else 'backend onnxruntime'}, "
        f"max_batch_size {batch_profile['max']})")
    return final


# --------------------------------------------------------------------------------------------
# DeepStream


def _nvinfer_path(path: Path, out_file: Path) -> str:
    """nvinfer resolves relative paths against the config file's folder: keep them relative when
    the model file lies below that folder (the default config inside the bundle moves with it),
    absolute otherwise."""
    path, folder = path.resolve(), out_file.resolve().parent
    return os.path.relpath(path, folder) if path.is_relative_to(folder) else str(path)


def _image_graph(spec: TensorSpec) -> bool:
    return spec.onnx_type == "FLOAT" and len(spec.shape) == 4 and spec.shape[1] in (1, 3)


def _frames_graph(spec: TensorSpec) -> bool:
    return spec.onnx_type == "UINT8" and len(spec.shape) == 4 and spec.shape[3] in (1, 3)


def _threshold_comment(manifest: dict) -> str:
    value, rule = _threshold(manifest)
    if value is None:
        return "# Threshold: none (the bundle is uncalibrated; run `protoad-export calibrate` and export again)."
    return f"# Threshold: {value!r} ({rule or 'defective if score > threshold'})."


def deepstream_config_text(*, manifest: dict, inputs: list[TensorSpec], outputs: list[TensorSpec],
                           model_key: str, model_path: str, precision: str, batch_size: int,
                           gpu_id: int, unique_id: int, source: str) -> str:
    """The nvinfer ``[property]`` group for this graph (GKeyFile: ``#`` comments on their own lines)."""
    if len(inputs) != 1:
        raise ArtifactError(f"nvinfer feeds one image input; the graph has {len(inputs)} inputs")
    spec = inputs[0]
    prep = manifest.get("preprocessing", {})
    channel_order = str((manifest.get("input") or {}).get("channels", "RGB")).upper()
    lines = [DEEPSTREAM_HEADER + f" {__version__} from {source}.",
             "# Regenerate with `protoad-export export deepstream`; hand edits are replaced.",
             "# Output: raw tensors only (network-type=100, output-tensor-meta=1). Read them from the",
             "# NvDsInferTensorMeta (meta_type NVDSINFER_TENSOR_OUTPUT_META) in each frame's frame_user_meta_list:",
             f"# layers {', '.join(f'{o.name} {list(o.shape)} {o.onnx_type.lower()}' for o in outputs)} per frame.",
             _threshold_comment(manifest),
             "[property]", f"gpu-id={gpu_id}", f"gie-unique-id={unique_id}",
             f"{model_key}={model_path}", f"network-mode={2 if precision == 'fp16' else 0}",
             f"batch-size={batch_size}", "network-type=100", "output-tensor-meta=1",
             f"output-blob-names={';'.join(o.name for o in outputs)}"]
    if _image_graph(spec):
        channels, size_h, size_w = spec.shape[1], spec.shape[2], spec.shape[3]
        color = 2 if channels == 1 else (1 if channel_order == "BGR" else 0)
        mode = prep.get("mode")
        lines += [
            f"# Input {spec.name!r}: float [B, {channels}, {size_h}, {size_w}] in [0, 1], {channel_order}; the graph",
            "# normalises with the backbone's mean/std itself, so nvinfer only scales bytes to [0, 1]:",
            "# y = net-scale-factor * (x - offsets) with x in 0..255.",
            f"infer-dims={channels};{size_h};{size_w}", f"model-color-format={color}",
            f"net-scale-factor={NET_SCALE_1_255}", "offsets=" + ";".join(["0"] * channels),
            "# nvinfer resizes with bilinear filtering, without PIL's antialiasing: on large downscales",
            "# scores can drift from the Python runtime; compare a few frames before going live.",
            "scaling-filter=1",
        ]
        if mode == "letterbox":
            lines += ["# letterbox: fit the frame inside the network size, pad both sides with black, as the bundle was built.",
                      "maintain-aspect-ratio=1", "symmetric-padding=1"]
        elif mode == "crop":
            ratio = int(prep["crop"]) / int(prep["resize"])
            lines += ["# crop mode: the bundle saw the centre square of side crop/resize = "
                      f"{ratio:.6g} x min(frame width, height);",
                      "# nvinfer cannot centre-crop a full frame: crop that box upstream (nvvideoconvert",
                      "# src-crop=left:top:width:height) so nvinfer's resize sees the same pixels.",
                      "maintain-aspect-ratio=0"]
        else:
            lines += ["# squash: the whole frame resized to the network size, aspect ratio ignored.",
                      "maintain-aspect-ratio=0"]
    elif _frames_graph(spec):
        height, width, channels = spec.shape[1], spec.shape[2], spec.shape[3]
        lines += [
            f"# Input {spec.name!r}: uint8 [B, {height}, {width}, {channels}] camera frames ({channel_order}); the graph",
            "# resizes, crops and normalises itself. nvinfer's own preprocessing always produces a planar",
            "# float tensor, which this input cannot take: nvinfer must receive the tensor from an upstream",
            "# Gst-nvdspreprocess (input-tensor-from-meta=1). Its stock tensor-preparation library",
            "# normalises to float as well, so configure it with a custom tensor-preparation function",
            f"# that copies the scaled {width}x{height} frame as uint8 NHWC ({channel_order}) into tensor {spec.name!r}.",
            "# The image graph (build --input tensor) is the one nvinfer can feed directly.",
            "input-tensor-from-meta=1",
        ]
    else:
        raise ArtifactError(
            f"graph input {spec.name!r} ({spec.onnx_type.lower()} {list(spec.shape)}) is neither a float image "
            "[B, C, H, W] nor uint8 frames [B, H, W, C]: no nvinfer config fits it"
        )
    return "\n".join(lines) + "\n"


def write_deepstream_config(
    bundle_dir: str | os.PathLike,
    out_file: str | os.PathLike | None = None,
    *,
    use_engine: bool | None = None,
    precision: str = "fp16",
    batch_size: int | None = None,
    gpu_id: int = 0,
    unique_id: int = 1,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Write a Gst-nvinfer config for the bundle; return its path (default ``BUNDLE/nvinfer_config.txt``).

    ``use_engine``: True names the compiled TensorRT engine (refused when none), False the ONNX
    file of ``precision`` (nvinfer builds its own engine from it), None the engine when there is
    one. ``batch_size`` defaults to the batch profile's OPT. An existing file is replaced only if
    this tool wrote it.
    """
    log = log or (lambda _m: None)
    bundle_dir = Path(bundle_dir)
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    out_file = Path(out_file) if out_file is not None else bundle_dir / "nvinfer_config.txt"
    manifest = read_manifest(bundle_dir, verify=False)
    if out_file.is_dir():
        raise InputError(f"--out {out_file} is a folder: give the config file's path")
    if out_file.exists() and not out_file.read_bytes().startswith(DEEPSTREAM_HEADER.encode()):
        raise InputError(f"{out_file} exists and was not written by protoad-export: choose another --out; nothing was replaced")

    onnx_path = _onnx_file(bundle_dir, manifest, precision if use_engine is False else "fp16")
    inputs, outputs = graph_io(onnx_path)
    _check_against_manifest(bundle_dir, manifest, onnx_path.name, inputs, outputs)
    profile = manifest["batch_profile"]
    found = None if use_engine is False else _engine(bundle_dir, manifest, "an nvinfer config")
    if use_engine and found is None:
        raise _no_engine(bundle_dir)
    if found is not None:
        model_key, model_file = "model-engine-file", found[0]
        profile = found[1].get("batch_profile", profile)
        precision = "fp16"
    else:
        model_key, model_file = "onnx-file", onnx_path
    batch_size = int(profile["opt"]) if batch_size is None else batch_size
    if not int(profile["min"]) <= batch_size <= int(profile["max"]):
        raise InputError(f"batch size {batch_size} is outside the batch profile {profile['min']}..{profile['max']}")
    if _threshold(manifest)[0] is None:
        log(f"warning: {bundle_dir} is uncalibrated (no threshold in its manifest): decide on the score yourself, "
            f"or run `protoad-export calibrate {bundle_dir}` first")
    text = deepstream_config_text(
        manifest=manifest, inputs=inputs, outputs=outputs, model_key=model_key,
        model_path=_nvinfer_path(model_file, out_file), precision=precision, batch_size=batch_size,
        gpu_id=gpu_id, unique_id=unique_id, source=str(bundle_dir.resolve()),
    )
    atomic_write_bytes(out_file, text.encode())
    log(f"nvinfer config: {out_file} ({model_key} {model_file.name}, batch-size {batch_size})")
    return out_file
