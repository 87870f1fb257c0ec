"""TensorRT compile and runtime: control flow against a recording fake (10.x and 11.x), and for real on a GPU."""

from __future__ import annotations

import json
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fake_tensorrt import ALIGNMENT, FakeCuda, FakeParserError, called, make_fake_tensorrt

from protoad_export.export import tensorrt as engine
from protoad_export.runtime import tensorrt as trt_runtime
from protoad_export.bundle import read_manifest
from protoad_export.errors import ArtifactError, InputError, MissingDependencyError

FAKE_GPU = {"gpu": "NVIDIA Fake GPU 40GB", "compute_capability": "8.9"}
FAKE_SLUG = "nvidia-fake-gpu-40gb"


@pytest.fixture
def bundle_copy(small_bundle, tmp_path):
    """A private copy of the shared small_bundle fixture (compile rewrites its manifest)."""
    return shutil.copytree(small_bundle, tmp_path / "small")


def install_fake(monkeypatch, version="10.9.0.34", gpu=FAKE_GPU, **kwargs):
    """The fake module as ``tensorrt``, with its stream model patched over torch.cuda's streams and graphs."""
    cuda = FakeCuda()
    trt = make_fake_tensorrt(version, device=gpu["gpu"], cuda=cuda, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(engine, "_cuda_available", lambda: True)
    monkeypatch.setattr(engine, "gpu_info", lambda: dict(gpu))
    for name in ("Stream", "stream", "current_stream", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    return trt


class CpuMemory:
    """trt_runtime.TorchCudaMemory's interface on the CPU, on the fake's streams.

    Copies are enqueued on the runtime's stream like ``non_blocking`` copies on a GPU, so outputs
    are only valid after ``synchronize``. Device buffers are 256-byte aligned (setTensorAddress
    requires it) and remembered by address for the fake engine.
    """

    def __init__(self, cuda: FakeCuda):
        self.by_address = {}
        self.stream = cuda.Stream()
        self.stream_handle = self.stream.cuda_stream

    def device_empty(self, shape, dtype):
        n = int(np.prod(shape))
        raw = torch.zeros(n + ALIGNMENT, dtype=dtype)
        offset = (-raw.data_ptr() % ALIGNMENT) // raw.element_size()
        t = raw[offset : offset + n].view(shape)
        self.by_address[t.data_ptr()] = t
        return t

    def host_empty(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype)

    def copy(self, dst, src):
        self.stream.enqueue(lambda: dst.copy_(src))

    def synchronize(self):
        self.stream.synchronize()


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
    cache_name = f"tensorrt-10-9-0-34.{FAKE_SLUG}.timing.cache"
    assert record["timing_cache"] == cache_name and (bundle_copy / cache_name).is_file()

    manifest = read_manifest(bundle_copy, verify=True)
    name = f"model.fp16.{FAKE_SLUG}.engine"
    assert record["file"] == name and name in manifest["files"]
    entry = manifest["tensorrt"]["engines"][FAKE_SLUG]
    assert entry["tensorrt"] == "10.9.0.34"
    assert entry["gpu"] == FAKE_GPU["gpu"] and entry["compute_capability"] == "8.9"
    assert entry["batch_profile"] == {"min": 1, "opt": 2, "max": 4}
    assert entry["build_seconds"] >= 0 and len(manifest["files"][name]["sha256"]) == 64

    # A second build starts from the timing cache kept beside the engines.
    cache = (bundle_copy / cache_name).read_bytes()
    trt.calls.clear()
    engine.compile_engine(bundle_copy, log=None)
    assert called(trt, "create_timing_cache") == [(cache,)]
    assert called(trt, "set_timing_cache") == [(False,)]
    bp = manifest["batch_profile"]
    assert called(trt, "set_shape")[0][3][0] == bp["max"]  # default profile: the one recorded at build time


def test_compile_11x_needs_no_flag_and_has_no_fp16(monkeypatch, bundle_copy):
    trt = install_fake(monkeypatch, "11.4.0.1")
    assert not hasattr(trt.BuilderFlag, "FP16")
    # 11.x keeps STRONGLY_TYPED (= 0, deprecated and ignored); setting it would be harmless but is not needed.
    flags = trt.NetworkDefinitionCreationFlag
    assert (flags.STRONGLY_TYPED, flags.PREFER_JIT_PYTHON_PLUGINS, flags.PREFER_AOT_PYTHON_PLUGINS) == (0, 1, 2)
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
    monkeypatch.setattr(engine, "_torch_cuda_version", lambda: "12.8")
    assert engine.missing_requirements() == (
        "TensorRT is not installed (pip install 'protoad-export[tensorrt-cu12]' for torch's CUDA 12.8)")
    monkeypatch.setattr(engine, "_torch_cuda_version", lambda: "13.0")
    assert "[tensorrt-cu13]' for torch's CUDA 13.0" in engine.missing_requirements()
    monkeypatch.setattr(engine, "_torch_cuda_version", lambda: None)  # a CPU-only torch
    assert "[tensorrt-cu13]' or '[tensorrt-cu12]', matching your CUDA" in engine.missing_requirements()
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
    memory = CpuMemory(trt.cuda)
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
    assert called(trt, "execute_async_v3") == [(memory.stream_handle,)] * 2
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
        trt_runtime.TensorRTRuntime(bundle_dir, manifest, memory_factory=lambda: CpuMemory(trt.cuda))
    assert called(trt, "deserialize_cuda_engine") == []


def test_runtime_refuses_engine_of_another_gpu_or_tampered_or_absent(compiled, monkeypatch, small_bundle):
    trt, bundle_dir = compiled
    manifest = read_manifest(bundle_dir)
    monkeypatch.setattr(engine, "gpu_info", lambda: {"gpu": "NVIDIA Other", "compute_capability": "8.9"})
    with pytest.raises(ArtifactError, match="no engine for this GPU .NVIDIA Other.*NVIDIA Fake GPU"):
        trt_runtime.TensorRTRuntime(bundle_dir, manifest, memory_factory=lambda: CpuMemory(trt.cuda))
    monkeypatch.setattr(engine, "gpu_info", lambda: dict(FAKE_GPU))
    with open(bundle_dir / f"model.fp16.{FAKE_SLUG}.engine", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ArtifactError, match="sha256"):
        trt_runtime.TensorRTRuntime(bundle_dir, manifest, memory_factory=lambda: CpuMemory(trt.cuda))
    assert called(trt, "deserialize_cuda_engine") == []
    with pytest.raises(ArtifactError, match="protoad-export compile"):
        trt_runtime.TensorRTRuntime(small_bundle, read_manifest(small_bundle), memory_factory=lambda: CpuMemory(trt.cuda))


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


class WallClockEvent:
    """torch.cuda.Event on the CPU: host time at record()."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _runtime(trt, bundle_dir):
    memory = CpuMemory(trt.cuda)
    trt.compute = fake_model(memory)
    return trt_runtime.TensorRTRuntime(bundle_dir, read_manifest(bundle_dir), memory_factory=lambda: memory), memory


def test_trtexec_style_timing_runs_the_three_steps(compiled, monkeypatch):
    """time_gpu's control flow on the CPU: events stand in for CUDA events; the graph replays on the runtime's stream."""
    from protoad_export.evaluation.timing import time_gpu

    monkeypatch.setattr(torch.cuda, "Event", WallClockEvent)
    trt, bundle_dir = compiled
    rt, memory = _runtime(trt, bundle_dir)
    images = np.random.default_rng(3).random((2, 3, rt.contract.size, rt.contract.size), dtype=np.float32)
    res = time_gpu(rt, images, "tensorrt", warmup=1, iterations=3, cuda_graph=True)
    assert res.batch == 2 and res.iterations >= 3 and res.compute is not None and res.h2d is not None
    assert res.compute_throughput > 0 and res.cuda_graph and res.notes == []
    assert len(called(trt, "execute_async_v3")) == 2  # the warm-up enqueue and the captured one
    assert len(trt.cuda.replays) >= 1 + 3 + 3 and set(trt.cuda.replays) == {memory.stream_handle}
    # The last download holds this batch's outputs: the replays ran before the runtime's stream synchronised.
    np.testing.assert_allclose(rt.host["anomaly_map"][:2, 0].numpy(), images.mean(axis=1), rtol=1e-6)


def test_timing_reports_a_failed_capture_and_times_without(compiled, monkeypatch):
    from protoad_export.evaluation.timing import time_gpu

    monkeypatch.setattr(torch.cuda, "Event", WallClockEvent)
    trt, bundle_dir = compiled
    rt, _ = _runtime(trt, bundle_dir)

    def capture_fails():
        raise RuntimeError("operation not permitted when stream is capturing")

    rt.capture_cuda_graph = capture_fails
    res = time_gpu(rt, np.zeros((2, 3, rt.contract.size, rt.contract.size), np.float32), "tensorrt", warmup=1, iterations=3, cuda_graph=True)
    assert not res.cuda_graph and "CUDA graph capture failed (RuntimeError)" in res.notes[0]
    assert len(called(trt, "execute_async_v3")) >= 1 + 3 + 3 and trt.cuda.replays == []


def test_predict_after_cuda_graph_capture_is_fresh(compiled):
    """A replay on torch's current (default) stream would leave the runtime's stream reading stale outputs."""
    trt, bundle_dir = compiled
    rt, memory = _runtime(trt, bundle_dir)
    rng = np.random.default_rng(4)
    first, second = (rng.random((3, 3, rt.contract.size, rt.contract.size), dtype=np.float32) for _ in range(2))
    before = rt.predict(first)
    rt.capture_cuda_graph()
    assert rt._graph.capture_error_mode == "thread_local"  # as trtexec: errors reported where they happen
    after = rt.predict(first)
    again = rt.predict(second)
    assert set(trt.cuda.replays) == {memory.stream_handle} and len(trt.cuda.replays) == 2
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(again[0], second.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(again[1], second.mean(axis=1).max(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("fake, message", [
    ({"io_dtypes": {"image": "UINT8"}}, "tensor 'image' is UINT8, this runtime feeds FLOAT"),
    ({"io_dtypes": {"score": "HALF"}}, "tensor 'score' is HALF, this runtime feeds FLOAT"),
    ({"io_formats": {"anomaly_map": "HWC8"}}, "tensor 'anomaly_map' has format HWC8, this runtime needs LINEAR"),
])
def test_runtime_checks_io_dtypes_and_formats(monkeypatch, bundle_copy, fake, message):
    trt = install_fake(monkeypatch, **fake)
    engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), log=None)
    with pytest.raises(ArtifactError, match=message) as info:
        trt_runtime.TensorRTRuntime(bundle_copy, read_manifest(bundle_copy), memory_factory=lambda: CpuMemory(trt.cuda))
    assert "\n" not in str(info.value) and called(trt, "set_tensor_address") == []


def test_runtime_stops_when_an_address_is_refused(compiled):
    trt, bundle_dir = compiled

    class MisalignedMemory(CpuMemory):
        def device_empty(self, shape, dtype):
            t = super().device_empty(shape, dtype)
            if len(shape) == 1:  # the score buffer: 4 bytes past a 256-byte boundary
                raw = torch.zeros(int(np.prod(shape)) + 2 * ALIGNMENT, dtype=dtype)
                offset = (-raw.data_ptr() % ALIGNMENT + 4) // raw.element_size()
                t = raw[offset : offset + shape[0]]
                self.by_address[t.data_ptr()] = t
            return t

    with pytest.raises(ArtifactError, match="TensorRT refused the address of tensor 'score'"):
        trt_runtime.TensorRTRuntime(bundle_dir, read_manifest(bundle_dir), memory_factory=lambda: MisalignedMemory(trt.cuda))
    assert called(trt, "execute_async_v3") == []


def _cache_files(bundle_dir):
    return {p.name: p.read_bytes() for p in bundle_dir.glob("*.timing.cache")}


def test_timing_cache_per_tensorrt_version_and_gpu(monkeypatch, bundle_copy):
    """Another GPU's or TensorRT version's cache is neither fed to the build nor overwritten."""
    other_gpu = {"gpu": "NVIDIA Other GPU 80GB", "compute_capability": "9.0"}
    install_fake(monkeypatch, "10.9.0.34")
    engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), log=None)
    first = _cache_files(bundle_copy)
    trt = install_fake(monkeypatch, "10.9.0.34", gpu=other_gpu)
    engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), log=None)
    assert called(trt, "create_timing_cache") == [(b"",)]  # not the first GPU's cache
    trt = install_fake(monkeypatch, "10.16.1.11")  # createTimingCache gives None for 10.9's caches
    engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), log=None)
    assert called(trt, "create_timing_cache") == [(b"",)]
    caches = _cache_files(bundle_copy)
    assert len(caches) == 3 and all(caches[name] == blob for name, blob in first.items())
    engines = read_manifest(bundle_copy)["tensorrt"]["engines"]
    assert {e["timing_cache"] for e in engines.values()} == {
        engine.timing_cache_name("10.16.1.11", FAKE_SLUG), engine.timing_cache_name("10.9.0.34", engine.gpu_slug(other_gpu["gpu"]))}


@pytest.mark.parametrize("writer, warning, kept", [
    ({"version": "10.8.0.43"}, "TensorRT 10.9.0.34 cannot read the timing cache", False),
    ({"version": "10.9.0.34", "device": "NVIDIA Lookalike"}, "is of another GPU; building without it and leaving it", True),
])
def test_unusable_timing_cache_falls_back_to_an_empty_one(monkeypatch, bundle_copy, writer, warning, kept):
    """create_timing_cache -> None (unreadable) or set_timing_cache -> False (another device): one warning, an empty cache."""
    writer_trt = make_fake_tensorrt(**writer)
    config = writer_trt.Builder(None).create_builder_config()
    foreign = bytes(config.create_timing_cache(b"").serialize())
    trt = install_fake(monkeypatch, "10.9.0.34")
    path = bundle_copy / engine.timing_cache_name("10.9.0.34", FAKE_SLUG)
    path.write_bytes(foreign)
    lines = []
    engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and warning in warnings[0]
    assert called(trt, "create_timing_cache") == [(foreign,), (b"",)]
    assert (path.read_bytes() == foreign) == kept
    if not kept:  # the unreadable cache was replaced by this build's, which the next build reads without a warning
        trt.calls.clear()
        lines.clear()
        replaced = path.read_bytes()
        engine.compile_engine(bundle_copy, batch_profile=(1, 2, 4), log=lines.append)
        assert called(trt, "create_timing_cache") == [(replaced,)]
        assert not [line for line in lines if line.startswith("warning:")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _real_tensorrt_reason() is not None,
                    reason=f"real TensorRT and CUDA test: {_real_tensorrt_reason()}")
def test_real_predict_is_the_same_after_cuda_graph_capture(bundle_copy):
    """On a GPU: predict() replayed from a CUDA graph equals the plain enqueue, for new inputs too."""
    from protoad_export.runtime import load

    engine.compile_engine(bundle_copy, batch_profile=(1, 4, 8), log=None)
    rt = load(bundle_copy, "tensorrt")
    rng = np.random.default_rng(0)
    first, second = (rng.random((4, 3, rt.contract.size, rt.contract.size), dtype=np.float32) for _ in range(2))
    plain_first, plain_second = rt.predict(first), rt.predict(second)
    rt.set_batch(4)
    rt.upload(first)
    rt.capture_cuda_graph()
    for images, plain in ((first, plain_first), (second, plain_second), (first, plain_first)):
        graphed = rt.predict(images)
        assert rt._graph is not None  # same batch: predict replayed the graph
        for a, b in zip(graphed, plain):
            np.testing.assert_array_equal(a, b)
