"""Serving layouts: the Triton config parsed into Triton's own ModelConfig protobuf and checked
field by field against the ONNX graph; the nvinfer config parsed and checked key by key.

No Triton or DeepStream server runs here. One tiny bundle is built per module from synthetic parts.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from protoad_export.bundle import add_files_to_manifest, read_manifest, sha256_file, write_manifest
from protoad_export.cli import main
from protoad_export.export.serving import MARKER, graph_io, write_deepstream_config, write_triton_repository

# Every key gst-nvinfer's config parser knows (gstnvinfer_property_parser.h, DeepStream 6-9).
NVINFER_KEYS = {
    "gie-unique-id", "process-mode", "interval", "labelfile-path", "gpu-id", "secondary-reinfer-interval",
    "output-tensor-meta", "enable-dla", "use-dla-core", "batch-size", "tensor-meta-pool-size", "network-mode",
    "model-engine-file", "int8-calib-file", "workspace-size", "output-blob-names", "network-type",
    "force-implicit-batch-dim", "infer-dims", "output-io-formats", "layer-device-precision", "model-color-format",
    "net-scale-factor", "offsets", "mean-file", "maintain-aspect-ratio", "symmetric-padding", "scaling-filter",
    "scaling-compute-hw", "network-input-order", "input-tensor-from-meta", "custom-lib-path", "onnx-file",
}


def _model_config_pb2():
    """Triton's ModelConfig from the tritonclient wheel, loaded from its file: the ``tritonclient.grpc``
    package would import grpcio, which the test extra does not need."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install -e '.[test]')")
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _parse_triton(folder: Path):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig()), pb2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A calibrated bundle built with the offline backbone on 8 synthetic parts (seconds)."""
    from protoad_export.build.pipeline import BuildConfig, build
    from protoad_export.data.images import Preprocessing
    from protoad_export.data.synthetic import DatasetSpec, make_dataset
    from protoad_export.evaluation.thresholds import calibrate

    root = tmp_path_factory.mktemp("serving")
    data = make_dataset(root / "parts", seed=1, spec=DatasetSpec(train=8, test_good=1, test_per_defect=1, width=96, height=64))
    config = BuildConfig(backbone="efficientnet_lite0", batch_size=8, max_prototypes=16, device="cpu", holdout=0.25,
                         preprocessing=Preprocessing(resize=64, crop=64, mode="letterbox"), input="tensor")
    result = build(data, "tiny", root / "bundles", config, log=None, progress=False)
    calibrate(result.bundle_dir)
    return result.bundle_dir


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(bundle, out)
    return out


def _fake_engine(bundle_dir: Path, profile=(1, 4, 16)) -> Path:
    """Register a stand-in engine file the way `compile` does (the bytes are never run here)."""
    name = "model.fp16.fake_gpu.engine"
    (bundle_dir / name).write_bytes(b"not a real plan")
    record = {"file": name, "precision": "fp16", "gpu": "Fake GPU", "compute_capability": "9.0",
              "batch_profile": dict(zip(("min", "opt", "max"), profile))}
    add_files_to_manifest(bundle_dir, [name], {"tensorrt": {"engines": {"fake_gpu": record}}})
    return bundle_dir / name


def _check_against_graph(config, pb2, onnx_path: Path, max_batch: int) -> None:
    """Every input and output of the graph, and nothing else, with its name, type and dims."""
    inputs, outputs = graph_io(onnx_path)
    assert config.max_batch_size == max_batch
    for declared, graph in ((config.input, inputs), (config.output, outputs)):
        assert [t.name for t in declared] == [s.name for s in graph]
        for tensor, spec in zip(declared, graph):
            assert isinstance(spec.shape[0], str)  # the batch axis, which Triton leaves out of dims
            assert pb2.DataType.Name(tensor.data_type) == {"FLOAT": "TYPE_FP32", "UINT8": "TYPE_UINT8"}[spec.onnx_type]
            if len(spec.shape) == 1:  # [batch]: Triton needs dims [1] and reshapes to the model's []
                assert list(tensor.dims) == [1]
                assert tensor.HasField("reshape") and list(tensor.reshape.shape) == []
            else:
                assert list(tensor.dims) == list(spec.shape[1:])
                assert not tensor.HasField("reshape")


def test_triton_onnxruntime_config_matches_the_graph(bundle, tmp_path):
    manifest = read_manifest(bundle)
    folder = write_triton_repository(bundle, tmp_path / "repo", log=None)
    assert folder == tmp_path / "repo" / "tiny"
    config, pb2 = _parse_triton(folder)
    assert config.name == "tiny" and config.backend == "onnxruntime" and config.platform == ""
    _check_against_graph(config, pb2, bundle / "model.fp32.onnx", manifest["batch_profile"]["max"])
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [manifest["batch_profile"]["opt"], manifest["batch_profile"]["max"]]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert float(params["threshold"]) == manifest["threshold"]["value"]
    assert params["decision_rule"] == manifest["threshold"]["rule"]
    assert params["preprocessing.mode"] == "letterbox" and int(params["preprocessing.crop"]) == 64
    assert json.loads(params["preprocessing.mean"]) == manifest["preprocessing"]["mean"]
    assert json.loads(params["input"]) == manifest["input"]
    assert params["prototypes"] == str(manifest["prototypes"]["count"])
    assert sha256_file(folder / "1" / "model.onnx") == manifest["files"]["model.fp32.onnx"]["sha256"]
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", MARKER]
    assert not list((tmp_path / "repo").glob(".*"))  # no staging folder left behind


def test_triton_fp16_and_rewrite_of_its_own_folder(bundle, tmp_path):
    write_triton_repository(bundle, tmp_path / "repo", name="line3", log=None)
    folder = write_triton_repository(bundle, tmp_path / "repo", name="line3", precision="fp16", log=None)
    assert sha256_file(folder / "1" / "model.onnx") == sha256_file(bundle / "model.fp16.onnx")
    config, _ = _parse_triton(folder)
    assert config.name == "line3"


def test_triton_tensorrt_serves_the_compiled_engine_with_its_profile(copy, tmp_path):
    engine = _fake_engine(copy)
    folder = write_triton_repository(copy, tmp_path / "repo", backend="tensorrt", log=None)
    config, pb2 = _parse_triton(folder)
    assert config.platform == "tensorrt_plan" and config.backend == ""
    _check_against_graph(config, pb2, copy / "model.fp16.onnx", 16)  # the engine's profile, not the build's 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert (folder / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert not (folder / "1" / "model.onnx").exists()


def test_triton_uncalibrated_bundle_warns_and_writes_no_threshold(copy, tmp_path):
    manifest = read_manifest(copy)
    del manifest["threshold"]
    write_manifest(copy, manifest)
    lines = []
    folder = write_triton_repository(copy, tmp_path / "repo", log=lines.append)
    config, _ = _parse_triton(folder)
    assert "threshold" not in config.parameters and "preprocessing.mode" in config.parameters
    warnings = [m for m in lines if m.startswith("warning")]
    assert len(warnings) == 1 and "uncalibrated" in warnings[0]


def _run(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output
    return result


def test_cli_export_triton_and_deepstream(bundle, tmp_path):
    result = _run(["export", "triton", str(bundle), "--repo", str(tmp_path / "repo"), "--name", "cam1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "cam1" / "config.pbtxt").is_file()
    result = _run(["export", "deepstream", str(bundle), "--out", str(tmp_path / "ds" / "pgie.txt"), "--onnx"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ds" / "pgie.txt").is_file()


def test_cli_bad_input_is_one_line(copy, tmp_path):
    repo = tmp_path / "repo"
    # missing bundle
    result = _run(["export", "triton", str(tmp_path / "nope"), "--repo", str(repo)])
    assert result.exit_code == 3 and result.output.strip().count("\n") == 0
    assert result.output.startswith("error: bundle not found:")
    # no compiled engine
    result = _run(["export", "triton", str(copy), "--repo", str(repo), "--backend", "tensorrt"])
    assert result.exit_code == 4 and result.output.strip().count("\n") == 0
    assert "has no compiled TensorRT engine: run `protoad-export compile" in result.output
    assert not repo.exists() or not list(repo.iterdir())
    result = _run(["export", "deepstream", str(copy), "--engine"])
    assert result.exit_code == 4 and "has no compiled TensorRT engine" in result.output
    assert not (copy / "nvinfer_config.txt").exists()
    # a folder of the user's at the destination
    (repo / "tiny").mkdir(parents=True)
    (repo / "tiny" / "config.pbtxt").write_text("mine")
    result = _run(["export", "triton", str(copy), "--repo", str(repo)])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "exists and was not written by protoad-export" in result.output
    assert (repo / "tiny" / "config.pbtxt").read_text() == "mine"
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]
    # a file of the user's at the nvinfer destination
    mine = tmp_path / "pgie.txt"
    mine.write_text("[property]\n")
    result = _run(["export", "deepstream", str(copy), "--out", str(mine)])
    assert result.exit_code == 2 and "was not written by protoad-export" in result.output
    assert mine.read_text() == "[property]\n"


def _nvinfer(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",), inline_comment_prefixes=None)
    parser.optionxform = str  # keys are case-sensitive in GKeyFile
    parser.read(path)
    assert parser.sections() == ["property"]
    props = dict(parser["property"])
    assert set(props) <= NVINFER_KEYS, set(props) - NVINFER_KEYS
    return props


def test_deepstream_config_for_the_image_graph(copy, tmp_path):
    out = write_deepstream_config(copy, log=None)  # no engine: nvinfer builds from the FP16 ONNX
    assert out == copy / "nvinfer_config.txt"
    props = _nvinfer(out)
    inputs, outputs = graph_io(copy / "model.fp16.onnx")
    (image,) = inputs
    assert (out.parent / props["onnx-file"]).resolve() == (copy / "model.fp16.onnx").resolve()
    assert props["onnx-file"] == "model.fp16.onnx"  # relative: the bundle stays movable
    assert props["network-type"] == "100" and props["output-tensor-meta"] == "1"
    assert props["network-mode"] == "2" and props["gie-unique-id"] == "1" and props["gpu-id"] == "0"
    assert int(props["batch-size"]) == read_manifest(copy)["batch_profile"]["opt"]
    assert props["output-blob-names"].split(";") == [o.name for o in outputs]
    assert [int(v) for v in props["infer-dims"].split(";")] == list(image.shape[1:])
    assert props["model-color-format"] == "0"  # RGB, as the manifest's input contract says
    assert np.float32(props["net-scale-factor"]) == np.float32(1 / 255)  # nvinfer reads it into a float
    assert [float(v) for v in props["offsets"].split(";")] == [0.0, 0.0, 0.0]
    assert props["maintain-aspect-ratio"] == "1" and props["symmetric-padding"] == "1"  # letterbox
    assert "input-tensor-from-meta" not in props

    out32 = write_deepstream_config(copy, tmp_path / "ds" / "pgie32.txt", use_engine=False, precision="fp32", batch_size=1, log=None)
    props = _nvinfer(out32)
    assert Path(props["onnx-file"]) == (copy / "model.fp32.onnx").resolve()  # outside the bundle: absolute
    assert props["network-mode"] == "0" and props["batch-size"] == "1"

    engine = _fake_engine(copy)
    props = _nvinfer(write_deepstream_config(copy, log=None))  # rewrites its own file, now with the engine
    assert props["model-engine-file"] == engine.name and "onnx-file" not in props
    assert props["network-mode"] == "2" and props["batch-size"] == "4"


def _frames_bundle(bundle_dir: Path, height: int = 48, width: int = 80) -> None:
    """Turn a copy into a bundle whose graphs take uint8 frames [B, H, W, 3] (the shape the in-graph
    preprocessing gives), so the layouts are checked on both graph inputs."""
    frames = helper.make_tensor_value_info("frames", TensorProto.UINT8, ["batch", height, width, 3])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, height, width])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])
    nodes = [
        helper.make_node("Cast", ["frames"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMean", ["nchw"], ["anomaly_map"], keepdims=1, axes=[1]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], keepdims=0, axes=[1, 2, 3]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "frames", [frames], [amap, score]),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    for name in ("model.fp32.onnx", "model.fp16.onnx"):
        onnx.save(model, str(bundle_dir / name))
    manifest = read_manifest(bundle_dir, verify=False)
    manifest["input"] = {"kind": "frames", "name": "frames", "shape": ["batch", height, width, 3], "dtype": "uint8",
                         "channel_order": "rgb", "range": [0, 255]}
    manifest["outputs"] = {"anomaly_map": ["batch", 1, height, width], "score": ["batch"]}
    write_manifest(bundle_dir, manifest)


def test_frames_graph_layouts(copy, tmp_path):
    _frames_bundle(copy)
    folder = write_triton_repository(copy, tmp_path / "repo", log=None)
    config, pb2 = _parse_triton(folder)
    _check_against_graph(config, pb2, copy / "model.fp32.onnx", 32)
    assert list(config.input[0].dims) == [48, 80, 3] and pb2.DataType.Name(config.input[0].data_type) == "TYPE_UINT8"

    props = _nvinfer(write_deepstream_config(copy, log=None))
    # nvinfer's own preprocessing yields planar float: uint8 frames must come as a tensor from upstream.
    assert props["input-tensor-from-meta"] == "1"
    assert not {"net-scale-factor", "infer-dims", "model-color-format", "offsets"} & set(props)
    assert props["network-type"] == "100" and props["output-tensor-meta"] == "1"
    assert "Gst-nvdspreprocess" in (copy / "nvinfer_config.txt").read_text()


def test_a_graph_that_disagrees_with_the_manifest_is_refused(copy, tmp_path):
    manifest = read_manifest(copy)
    manifest["outputs"] = {"heatmap": ["batch", 1, 64, 64], "score": ["batch"]}
    write_manifest(copy, manifest)
    result = _run(["export", "triton", str(copy), "--repo", str(tmp_path / "repo")])
    assert result.exit_code == 3 and "the bundle is inconsistent" in result.output
    assert not (tmp_path / "repo" / "tiny").exists()


def test_export_runs_where_torch_cannot_be_imported(bundle, tmp_path):
    """A line PC without PyTorch: both commands in a subprocess in which ``import torch`` fails."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes every `import torch` raise ImportError
        "from protoad_export.cli import main\n"
        "for args in (['export', 'triton', sys.argv[1], '--repo', sys.argv[2]],\n"
        "             ['export', 'deepstream', sys.argv[1], '--out', sys.argv[3]]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "assert sys.modules['torch'] is None\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code, str(bundle), str(tmp_path / "repo"), str(tmp_path / "pgie.txt")],
                            capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "repo" / "tiny" / "1" / "model.onnx").is_file() and (tmp_path / "pgie.txt").is_file()
