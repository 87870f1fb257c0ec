"""TensorRT compile and runtime: control flow against a recording fake (10.x and 11.x), and for real on a GPU."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fake_tensorrt import FakeParserError, called, make_fake_tensorrt

from protoad_export.export import tensorrt as engine
from protoad_export.runtime import tensorrt as trt_runtime
from protoad_export.bundle import read_manifest
from protoad_export.errors import ArtifactError, InputError, MissingDependencyError

FAKE_GPU = {"gpu": "NVIDIA Fake GPU 40GB", "compute_capability": "8.9"}
FAKE_SLUG = "nvidia-fake-gpu-40gb"


@pytest.fixture
def bundle_copy(small_bundle, tmp_path):
    """A private copy of the session bundle (compile rewrites its manifest)."""
    return shutil.copytree(small_bundle, tmp_path / "small")


def install_fake(monkeypatch, version="10.9.0.34", gpu=FAKE_GPU, **kwargs):
    trt = make_fake_tensorrt(version, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engine, "_cuda_available", lambda: True)
    monkeypatch.setattr(engine, "gpu_info", lambda: dict(gpu))
    return trt


class CpuMemory:
    """engine.TorchCudaMemory's interface on the CPU; remembers buffers by address for the fake engine."""

    def __init__(self):
        self.by_address = {}
        self.stream = None
        self.stream_handle = 1234

    def device_empty(self, shape, dtype):
        t = torch.zeros(shape, dtype=dtype)
        self.by_address[t.data_ptr()] = t
        return t

    def host_empty(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype)

    def copy(self, dst, src):
        dst.copy_(src)

    def synchronize(self):
        pass


def fake_model(memory: CpuMemory):
    """An 'engine' whose map is the channel mean and whose score is the map's maximum."""

    def compute(addresses, batch):
        x = memory.by_address[addresses["image"]][:batch]
        maps = x.mean(dim=1, keepdim=True)
        memory.by_address[addresses["anomaly_map"]][:batch] = maps
        memory.by_address[addresses["score"]][:batch] = maps.amax(dim=(1, 2, 3))

    return compute


def test_compile_10x_uses_strongly_typed_flag_and_no_fp16_flag(monkeypatch, bundle_copy):
    trt = install_fake(monkeypatch, "10.9.0.34")
    record = engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), workspace_gib=1, optimization_level=4, log=None)
    crop = read_manifest(bundle_copy)["preprocessing"]["crop"]

    assert called(trt, "create_network") == [(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)]
    assert called(trt, "set_flag") == []  # precision comes from the graph's casts, not BuilderFlag.FP16
    assert called(trt, "set_shape") == [("image", (1, 3, crop, crop), (2, 3, crop, crop), (4, 3, crop, crop))]
    assert called(trt, "set_memory_pool_limit") == [(trt.MemoryPoolType.WORKSPACE, 1 << 30)]
    assert called(trt, "config.builder_optimization_level=") == [(4,)]
    assert called(trt, "parse_from_file") == [(str(bundle_copy / "model.fp16.onnx"),)]
    assert called(trt, "create_timing_cache") == [(b"",)]
    assert called(trt, "set_timing_cache") == [(False,)]  # a foreign cache must not steer tactics

    manifest = read_manifest(bundle_copy, verify=True)
    name = f"model.fp16.{FAKE_SLUG}.engine"
    assert record["file"] == name and name in manifest["files"]
    entry = manifest["tensorrt"]["engines"][FAKE_SLUG]
    assert entry["tensorrt"] == "10.9.0.34"
    assert entry["gpu"] == FAKE_GPU["gpu"] and entry["compute_capability"] == "8.9"
    assert entry["batch_profile"] == {"min": 1, "opt": 2, "max": 4}
    assert entry["build_seconds"] >= 0 and len(manifest["files"][name]["sha256"]) == 64

    # A second build starts from the timing cache kept beside the engines.
    cache = (bundle_copy / engine.TIMING_CACHE).read_bytes()
    trt.calls.clear()
    engine.compile_engine(bundle_copy, log=None)
    assert called(trt, "create_timing_cache") == [(cache,)]
    bp = manifest["batch_profile"]
    assert called(trt, "set_shape")[0][3][0] == bp["max"]  # default profile: the one recorded at build time


def test_compile_11x_needs_no_flag_and_has_no_fp16(monkeypatch, bundle_copy):
    trt = install_fake(monkeypatch, "11.4.0.1")
    assert not hasattr(trt.BuilderFlag, "FP16")
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    engine.compile_engine(bundle_copy, batch_profile=(1, 4, 8), log=None)
    assert called(trt, "create_network") == [(0,)]
    assert called(trt, "set_flag") == []
    assert called(trt, "set_memory_pool_limit") == []  # TensorRT's default workspace unless asked
    assert read_manifest(bundle_copy)["tensorrt"]["engines"][FAKE_SLUG]["tensorrt"] == "11.4.0.1"


def test_parser_error_names_the_node(monkeypatch, bundle_copy):
    errors = [FakeParserError("Resize: antialias is not supported", 42, "/upsample/Resize", "Resize"),
              FakeParserError("second", 43, "/x", "Add")]
    install_fake(monkeypatch, parse_errors=errors)
    with pytest.raises(ArtifactError) as info:
        engine.compile_engine(bundle_copy, log=None)
    message = str(info.value)
    assert "node 42 '/upsample/Resize' (Resize)" in message and "antialias" in message and "1 more" in message
    assert "\n" not in message
    assert "tensorrt" not in read_manifest(bundle_copy)


def test_failed_build_leaves_the_directory_unchanged(monkeypatch, bundle_copy):
    install_fake(monkeypatch, build_fails=True)
    before = (bundle_copy / "manifest.json").read_bytes()
    with pytest.raises(ArtifactError, match="failed to build"):
        engine.compile_engine(bundle_copy, log=None)
    assert (bundle_copy / "manifest.json").read_bytes() == before
    assert not list(bundle_copy.glob("*.engine"))


def test_missing_requirements(monkeypatch, bundle_copy):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    assert engine.missing_requirements() == "TensorRT is not installed"
    with pytest.raises(MissingDependencyError, match="ready to compile on the target machine"):
        engine.compile_engine(bundle_copy, log=None)
    install_fake(monkeypatch)
    monkeypatch.setattr(engine, "_cuda_available", lambda: False)
    assert engine.missing_requirements() == "no CUDA GPU is visible"
    install_fake(monkeypatch, "8.6.1")
    assert "not supported" in engine.missing_requirements()
    install_fake(monkeypatch)
    assert engine.missing_requirements() is None
    with pytest.raises(InputError, match="MIN <= OPT <= MAX"):
        engine.compile_engine(bundle_copy, batch_profile=(4, 2, 8), log=None)


def test_compile_cli_without_tensorrt_is_one_line(monkeypatch, bundle_copy):
    from protoad_export.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(main, ["compile", str(bundle_copy)])
    assert result.exit_code == MissingDependencyError.exit_code
    assert result.output.count("\n") == 1 and "ONNX files" in result.output and "Traceback" not in result.output


@pytest.fixture
def compiled(monkeypatch, bundle_copy):
    trt = install_fake(monkeypatch)
    engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), log=None)
    trt.calls.clear()
    return trt, bundle_copy


def test_runtime_dynamic_batch_through_the_tensor_name_api(compiled):
    trt, bundle_dir = compiled
    memory = CpuMemory()
    trt.compute = fake_model(memory)
    rt = trt_runtime.TensorRTRuntime(bundle_dir, read_manifest(bundle_dir), memory_factory=lambda: memory)
    assert {args[0] for args in called(trt, "set_tensor_address")} == {"image", "anomaly_map", "score"}
    crop = rt.contract.size
    images = np.random.default_rng(0).random((7, 3, crop, crop), dtype=np.float32)
    maps, scores = rt.predict(images)

    expected = images.mean(axis=1)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    np.testing.assert_allclose(scores, expected.max(axis=(1, 2)), rtol=1e-6)
    # 7 images with a profile of max 4: chunks of 4 and 3 (3 is within the profile, no padding).
    assert called(trt, "set_input_shape") == [("image", (4, 3, crop, crop)), ("image", (3, 3, crop, crop))]
    assert called(trt, "execute_async_v3") == [(1234,), (1234,)]
    assert ("anomaly_map",) in called(trt, "get_tensor_shape")
    with pytest.raises(InputError, match="outside the engine's profile"):
        rt.set_batch(5)


def _edit_entry(bundle_dir, **changes):
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["tensorrt"]["engines"][FAKE_SLUG].update(changes)
    path.write_text(json.dumps(manifest))
    return read_manifest(bundle_dir)


@pytest.mark.parametrize("changes, message", [
    ({"tensorrt": "10.3.0.26"}, "built with TensorRT 10.3.0.26, this machine has 10.9.0.34"),
    ({"compute_capability": "9.0"}, "compute capability 9.0"),
])
def test_runtime_refuses_other_version_or_gpu_before_deserialising(compiled, changes, message):
    trt, bundle_dir = compiled
    manifest = _edit_entry(bundle_dir, **changes)
    with pytest.raises(ArtifactError, match=message):
        trt_runtime.TensorRTRuntime(bundle_dir, manifest, memory_factory=CpuMemory)
    assert called(trt, "deserialize_cuda_engine") == []


def test_runtime_refuses_engine_of_another_gpu_or_tampered_or_absent(compiled, monkeypatch, small_bundle):
    trt, bundle_dir = compiled
    manifest = read_manifest(bundle_dir)
    monkeypatch.setattr(engine, "gpu_info", lambda: {"gpu": "NVIDIA Other", "compute_capability": "8.9"})
    with pytest.raises(ArtifactError, match="no engine for this GPU .NVIDIA Other.*NVIDIA Fake GPU"):
        trt_runtime.TensorRTRuntime(bundle_dir, manifest, memory_factory=CpuMemory)
    monkeypatch.setattr(engine, "gpu_info", lambda: dict(FAKE_GPU))
    with open(bundle_dir / f"model.fp16.{FAKE_SLUG}.engine", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ArtifactError, match="sha256"):
        trt_runtime.TensorRTRuntime(bundle_dir, manifest, memory_factory=CpuMemory)
    assert called(trt, "deserialize_cuda_engine") == []
    with pytest.raises(ArtifactError, match="protoad-export compile"):
        trt_runtime.TensorRTRuntime(small_bundle, read_manifest(small_bundle), memory_factory=CpuMemory)


def test_load_tensorrt_backend_explains_what_is_missing(monkeypatch, small_bundle):
    from protoad_export.runtime import load

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ArtifactError, match="no TensorRT engine"):
        load(small_bundle, "tensorrt")


def _real_tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_real_tensorrt_reason() is not None, reason=f"real TensorRT test: {_real_tensorrt_reason()}")
def test_real_tensorrt_engine_matches_onnxruntime(bundle_copy):
    from protoad_export.evaluation.bench import DEFAULT_TOLERANCES
    from protoad_export.runtime import load

    engine.compile_engine(bundle_copy, batch_profile=(1, 4, 8), log=None)
    trt_rt = load(bundle_copy, "tensorrt")
    ort_rt = load(bundle_copy, "onnxruntime", precision="fp32")
    crop = trt_rt.contract.size
    images = np.random.default_rng(0).random((9, 3, crop, crop), dtype=np.float32)
    maps, scores = trt_rt.predict(images)
    ref_maps, ref_scores = ort_rt.predict(images)
    atol, rtol = DEFAULT_TOLERANCES["fp16"]
    np.testing.assert_allclose(maps, ref_maps, atol=atol, rtol=rtol)
    np.testing.assert_allclose(scores, ref_scores, atol=atol, rtol=rtol)


def test_trtexec_style_timing_runs_the_three_steps(compiled, monkeypatch):
    """time_gpu's control flow on the CPU: events stand in for CUDA events, graph capture fails and is reported."""
    import time

    from protoad_export.evaluation.timing import time_gpu

    class WallClockEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", WallClockEvent)
    trt, bundle_dir = compiled
    memory = CpuMemory()
    trt.compute = fake_model(memory)
    rt = trt_runtime.TensorRTRuntime(bundle_dir, read_manifest(bundle_dir), memory_factory=lambda: memory)
    images = np.zeros((2, 3, rt.contract.size, rt.contract.size), np.float32)
    res = time_gpu(rt, images, "tensorrt", warmup=1, iterations=3, cuda_graph=True)
    assert res.batch == 2 and res.iterations >= 3 and res.compute is not None and res.h2d is not None
    assert res.compute_throughput > 0 and not res.cuda_graph and "CUDA graph capture failed" in res.notes[0]
    assert len(called(trt, "execute_async_v3")) >= 1 + 3 + 3
