"""TensorRT: compile ``model.fp16.onnx`` into an engine, and run engines (TensorRT 10.x and 11.x).

The FP16 ONNX graph carries its precision as explicit casts (see ``network.py``), so it is built as
a *strongly typed* network on both major versions: TensorRT 11 only builds strongly typed networks
and has no FP16 builder flag; on 10.x the STRONGLY_TYPED creation flag gives the same engine.

API sources, checked for both versions (see the report in ``benchmarks/results/engines.md``):
- Python API reference, Builder / NetworkDefinitionCreationFlag:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
- Migrating 10.x -> 11.x (Python), removed APIs (BuilderFlag.FP16 ...):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
- IParserError (desc, node, nodeName, nodeOperator; 10.x C++ reference, mirrored in Python):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvonnxparser_1_1_i_parser_error.html
- Timing cache (createTimingCache / setTimingCache / serialize), "Optimizing Builder Performance":
  https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/performance/builder-performance.html
- IExecutionContext tensor-name API (setInputShape, setTensorAddress, enqueueV3, getTensorShape):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_execution_context.html
- Sources (NVIDIA/TensorRT, release/10.9, 10.16, 11.0, 11.1): ``include/NvInfer.h`` (flags,
  createTimingCache / setTimingCache), ``python/src/infer/pyCore.cpp`` (the Python bindings),
  trtexec's ``shared/utils/cacheUtils.cpp`` and ``samples/common/sampleDevice.h`` (thread-local
  graph capture), Polygraphy's ``backend/trt/loader.py`` and ``runner.py``; PyTorch's
  ``aten/src/ATen/cuda/CUDAGraph.cpp`` (replay on the current stream). ``tests/fake_tensorrt.py``
  mirrors what was checked.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifacts import atomic_write_bytes, read_manifest, verify_file, write_manifest
from .errors import ArtifactError, InputError, MissingDependencyError

SUPPORTED_MAJORS = (10, 11)
# One timing cache per TensorRT version and GPU (see timing_cache_name): a cache of another version
# cannot be read (createTimingCache gives nullptr) and one of another GPU is refused, so sharing
# one file would make every build on a second GPU throw away the first GPU's timings.
TIMING_CACHE_SUFFIX = ".timing.cache"
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's own default; 5 searches longer for a few % more speed
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
# What the runtime's buffers hold, by TensorRT DataType name; the engine's I/O must match.
IO_DTYPES = {INPUT_NAME: "FLOAT", "anomaly_map": "FLOAT", "score": "FLOAT"}
# tensorrt-cuXX wheels per CUDA major; plain `tensorrt` follows the newest CUDA (13 since 11.x).
TENSORRT_EXTRAS = {12: "tensorrt-cu12", 13: "tensorrt-cu13"}


# --------------------------------------------------------------------------------------------
# Environment


def _torch_cuda_version() -> str | None:
    import torch

    return torch.version.cuda


def install_hint() -> str:
    """The pip command installing the TensorRT build for torch's CUDA (``torch.version.cuda``)."""
    cuda = _torch_cuda_version()
    try:
        major = int(str(cuda).split(".")[0])
    except ValueError:
        major = None
    extra = TENSORRT_EXTRAS.get(major)
    if extra is None:
        return "pip install 'protoad-export[tensorrt-cu13]' or '[tensorrt-cu12]', matching your CUDA"
    return f"pip install 'protoad-export[{extra}]' for torch's CUDA {cuda}"


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(
            f"TensorRT is not installed ({install_hint()}); the ONNX files are ready to compile on the target machine"
        ) from None
    return trt


def trt_major(trt) -> int:
    """Major version from ``trt.__version__`` ("10.9.0.34" -> 10)."""
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise MissingDependencyError(f"cannot read the TensorRT version {trt.__version__!r}") from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_info() -> dict[str, str]:
    """Name and compute capability of the current CUDA device."""
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def gpu_slug(name: str) -> str:
    """A file-name-safe GPU tag: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def missing_requirements() -> str | None:
    """``None`` when engines can be compiled here, otherwise what is missing (one short phrase)."""
    try:
        trt = _import_tensorrt()
    except MissingDependencyError:
        return f"TensorRT is not installed ({install_hint()})"
    major = trt_major(trt)
    if major not in SUPPORTED_MAJORS:
        return f"TensorRT {trt.__version__} is not supported (10.x or 11.x needed)"
    if not _cuda_available():
        return "no CUDA GPU is visible"
    return None


# --------------------------------------------------------------------------------------------
# Compile


def network_flags(trt) -> int:
    """Network creation flags giving a strongly typed network on this TensorRT.

    10.x: EXPLICIT_BATCH (= 0) is deprecated and ignored (networks are always explicit batch since
    10.0); STRONGLY_TYPED (= 1) must be asked for (``NvInfer.h``, NetworkDefinitionCreationFlag).
    11.x: strong typing is always on; STRONGLY_TYPED is still there (= 0, deprecated, ignored:
    ``NvInfer.h`` release/11.0 and 11.1), so no flag is needed.
    """
    if trt_major(trt) == 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _parser_error_text(error) -> str:
    # node_name / node_operator exist since TensorRT 10.0 (IParserError::nodeName, nodeOperator).
    desc = " ".join(str(error.desc()).split())  # the CLI prints one line
    node = error.node()
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = f"node {node}" if node >= 0 else "the graph"
    if name or op:
        where += f" {name!r}" + (f" ({op})" if op else "")
    return f"{where}: {desc}"


def parse_onnx(trt, network, logger, path: Path) -> None:
    """Parse ``path`` into ``network``; raise ArtifactError naming the failing node."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(path)):
        return
    count = parser.num_errors
    if count == 0:
        raise ArtifactError(f"TensorRT could not parse {path.name} (no parser error was reported)")
    first = _parser_error_text(parser.get_error(0))
    more = f" (+{count - 1} more parser errors)" if count > 1 else ""
    raise ArtifactError(f"TensorRT cannot parse {path.name} at {first}{more}")


def _engine_entries(manifest: dict) -> dict[str, dict]:
    return dict(manifest.get("tensorrt", {}).get("engines", {}))


def timing_cache_name(version: str, slug: str) -> str:
    """``tensorrt-10.9.0.34.nvidia-h100-80gb-hbm3.timing.cache``: one per TensorRT version and GPU."""
    return f"tensorrt-{gpu_slug(version)}.{slug}{TIMING_CACHE_SUFFIX}"


def attach_timing_cache(trt, config, path: Path, log: Callable[[str], None]) -> bool:
    """Start the build from the timing cache at ``path``; return whether the build may save over it.

    ``create_timing_cache`` gives None for a blob this TensorRT cannot read (trtexec's
    cacheUtils.cpp checks for nullptr) and ``set_timing_cache(cache, False)`` refuses a cache of
    another device; either way the build starts from an empty cache with one warning. A refused
    cache of another device is kept as it is (False), an unreadable one may be replaced (True).
    ignore_mismatch stays False: another GPU's timings must not steer tactic choice here.
    """
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None:
        log(f"warning: TensorRT {trt.__version__} cannot read the timing cache {path.name}; building without it")
        config.set_timing_cache(config.create_timing_cache(b""), False)
        return True
    if not config.set_timing_cache(cache, False):
        log(f"warning: the timing cache {path.name} is of another GPU; building without it and leaving it as it is")
        config.set_timing_cache(config.create_timing_cache(b""), False)
        return False
    return True


def compile_engine(
    engine_dir: str | Path,
    batch_profile: tuple[int, int, int] | None = None,
    workspace_gib: float | None = None,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Build ``model.fp16.<gpu>.engine`` from ``model.fp16.onnx`` and record it in the manifest.

    ``batch_profile`` (MIN, OPT, MAX) defaults to the one recorded at build time; ``workspace_gib``
    caps TensorRT's scratch memory (default: TensorRT's, the whole GPU). Returns the manifest entry.
    """
    log = log or (lambda _msg: None)
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir, verify=True)
    missing = missing_requirements()
    if missing:
        raise MissingDependencyError(f"cannot compile here: {missing}; the ONNX files in {engine_dir} are ready to compile on the target machine")
    if batch_profile is None:
        bp = manifest["batch_profile"]
        batch_profile = (int(bp["min"]), int(bp["opt"]), int(bp["max"]))
    lo, opt, hi = batch_profile
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
    if not 0 <= optimization_level <= 5:
        raise InputError(f"builder optimization level must be 0..5, got {optimization_level}")
    entry = manifest["onnx"].get("fp16")
    if entry is None:
        raise ArtifactError(f"{engine_dir} has no FP16 ONNX file to compile")
    onnx_path = verify_file(engine_dir, manifest, entry["file"])
    crop = int(manifest["preprocessing"]["crop"])

    trt = _import_tensorrt()
    info = gpu_info()
    slug = gpu_slug(info["gpu"])
    filename = f"model.fp16.{slug}.engine"
    log(f"compiling {onnx_path.name} with TensorRT {trt.__version__} for {info['gpu']} (sm {info['compute_capability']}), "
        f"batch {lo}:{opt}:{hi}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parse_onnx(trt, network, logger, onnx_path)

    config = builder.create_builder_config()
    if workspace_gib is not None:
        if workspace_gib <= 0:
            raise InputError(f"workspace must be positive, got {workspace_gib} GiB")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    profile = builder.create_optimization_profile()
    shape = lambda b: (b, 3, crop, crop)  # noqa: E731
    profile.set_shape(INPUT_NAME, shape(lo), shape(opt), shape(hi))
    config.add_optimization_profile(profile)

    # The timing cache lives beside the engines and is not listed in the manifest's files: it
    # changes with every build and only speeds builds up.
    cache_name = timing_cache_name(str(trt.__version__), slug)
    cache_path = engine_dir / cache_name
    save_cache = attach_timing_cache(trt, config, cache_path, log)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT messages above)")
    atomic_write_bytes(engine_dir / filename, bytes(memoryview(plan)))
    if save_cache:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    record = {
        "file": filename, "precision": "fp16", "strongly_typed": True,
        "tensorrt": str(trt.__version__), "gpu": info["gpu"], "compute_capability": info["compute_capability"],
        "batch_profile": {"min": lo, "opt": opt, "max": hi},
        "workspace_bytes": None if workspace_gib is None else int(workspace_gib * (1 << 30)),
        "optimization_level": optimization_level, "build_seconds": round(seconds, 3),
        "timing_cache": cache_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # The manifest was verified on entry; a recompile replaces this GPU's engine and its checksum.
    engines = _engine_entries(manifest)
    engines[slug] = record
    manifest["tensorrt"] = {"engines": engines}
    manifest["files"] = {**manifest.get("files", {}), filename: None}
    write_manifest(engine_dir, manifest)
    log(f"engine: {engine_dir / filename} ({seconds:.1f} s)")
    return record


# --------------------------------------------------------------------------------------------
# Runtime


class TorchCudaMemory:
    """Device buffers, pinned host buffers and one stream, all from ``torch.cuda``.

    Tests substitute a CPU stand-in with the same methods to run the control flow without a GPU.
    """

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.stream = torch.cuda.Stream()

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def device_empty(self, shape: tuple[int, ...], dtype):
        return self.torch.empty(shape, dtype=dtype, device="cuda")

    def host_empty(self, shape: tuple[int, ...], dtype):
        return self.torch.empty(shape, dtype=dtype).pin_memory()

    def copy(self, dst, src) -> None:
        """Asynchronous copy on the runtime's stream (pinned host <-> device)."""
        with self.torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def synchronize(self) -> None:
        self.stream.synchronize()


class TensorRTRuntime:
    """A compiled engine with ``execute_async_v3``, named tensors and a dynamic batch within its profile."""

    backend = "tensorrt"
    precision = "fp16"
    on_gpu = True

    def __init__(self, engine_dir: str | Path, manifest: dict, memory_factory: Callable[[], Any] | None = None) -> None:
        import torch

        self.manifest = manifest
        self.crop = int(manifest["preprocessing"]["crop"])
        engines = _engine_entries(manifest)
        if not engines:
            raise ArtifactError(f"{engine_dir} has no TensorRT engine: run `protoad-export compile {engine_dir}` on the target machine")
        trt = _import_tensorrt()
        if memory_factory is None and not _cuda_available():
            raise MissingDependencyError("the tensorrt backend needs a CUDA GPU, and none is visible")
        info = gpu_info()
        entry = engines.get(gpu_slug(info["gpu"]))
        if entry is None:
            built = ", ".join(sorted(e["gpu"] for e in engines.values()))
            raise ArtifactError(f"no engine for this GPU ({info['gpu']}) in {engine_dir}: built for {built}; compile it here")
        # Engines are tied to the exact TensorRT version and GPU they were built with; refuse early
        # with the reason rather than let deserialisation fail with a generic message.
        if entry["tensorrt"] != str(trt.__version__):
            raise ArtifactError(
                f"{entry['file']} was built with TensorRT {entry['tensorrt']}, this machine has {trt.__version__}: recompile it here"
            )
        if entry["compute_capability"] != info["compute_capability"]:
            raise ArtifactError(
                f"{entry['file']} was built for compute capability {entry['compute_capability']}, "
                f"this GPU has {info['compute_capability']}: recompile it here"
            )
        path = verify_file(engine_dir, manifest, entry["file"])
        self.entry = entry
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.logger)
        self.engine = self.trt_runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialise {path.name} (see the TensorRT messages above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ArtifactError(f"TensorRT could not create an execution context for {path.name} (out of GPU memory?)")

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME] or sorted(set(names) - set(inputs)) != sorted(OUTPUT_NAMES):
            raise ArtifactError(f"{path.name} has tensors {names}; expected input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}")
        # The buffers below hold IO_DTYPES in linear layout; an engine whose I/O differs (uint8
        # frames, FP16 outputs, a vectorised format) would read or write them wrongly without error.
        for name in names:
            dtype = self.engine.get_tensor_dtype(name)
            if dtype != getattr(trt.DataType, IO_DTYPES[name]):
                raise ArtifactError(f"{path.name}: tensor {name!r} is {dtype.name}, this runtime feeds {IO_DTYPES[name]}: recompile it")
            layout = self.engine.get_tensor_format(name)
            if layout != trt.TensorFormat.LINEAR:
                raise ArtifactError(f"{path.name}: tensor {name!r} has format {layout.name}, this runtime needs LINEAR: recompile it")
        torch_dtypes = {"FLOAT": torch.float32, "HALF": torch.float16, "UINT8": torch.uint8}
        bp = entry["batch_profile"]
        self.min_batch, self.max_batch = int(bp["min"]), int(bp["max"])
        self.memory = (memory_factory or TorchCudaMemory)()
        s, b = self.crop, self.max_batch
        shapes = {INPUT_NAME: (b, 3, s, s), "anomaly_map": (b, 1, s, s), "score": (b,)}
        self.device = {n: self.memory.device_empty(shp, torch_dtypes[IO_DTYPES[n]]) for n, shp in shapes.items()}
        self.host = {n: self.memory.host_empty(shp, torch_dtypes[IO_DTYPES[n]]) for n, shp in shapes.items()}
        # Buffers are allocated once at the profile's maximum, so their addresses never change.
        for name, buf in self.device.items():
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise ArtifactError(f"TensorRT refused the address of tensor {name!r} of {path.name} (see the TensorRT messages above)")
        self._batch = None
        self._graph = None

    @property
    def stream(self):
        return self.memory.stream

    def synchronize(self) -> None:
        self.memory.synchronize()

    # The three steps are public so that the bench can time them separately (trtexec's H2D, GPU
    # compute and D2H).

    def set_batch(self, batch: int) -> None:
        """Select the input shape for ``batch`` images (within the optimisation profile)."""
        if not self.min_batch <= batch <= self.max_batch:
            raise InputError(f"batch {batch} is outside the engine's profile {self.min_batch}..{self.max_batch}")
        if batch != self._batch:
            self._graph = None
            if not self.context.set_input_shape(INPUT_NAME, (batch, 3, self.crop, self.crop)):
                raise ArtifactError(f"TensorRT rejected input shape [{batch}, 3, {self.crop}, {self.crop}]")
            got = tuple(self.context.get_tensor_shape("anomaly_map"))
            if got != (batch, 1, self.crop, self.crop):
                raise ArtifactError(f"engine output anomaly_map has shape {list(got)} for batch {batch}")
            self._batch = batch

    def upload(self, images: np.ndarray) -> None:
        """Host -> pinned buffer -> device (asynchronous on the runtime's stream)."""
        import torch

        b = len(images)
        self.host[INPUT_NAME][:b].copy_(torch.from_numpy(images))
        self.memory.copy(self.device[INPUT_NAME][:b], self.host[INPUT_NAME][:b])

    def execute(self) -> None:
        """Enqueue the engine on the runtime's stream for the current batch (or replay its CUDA graph)."""
        if self._graph is not None:
            import torch

            # CUDAGraph.replay launches on torch's *current* stream (CUDAGraph::replay calls
            # cudaGraphLaunch on getCurrentCUDAStream()); the uploads, downloads and the
            # synchronisation are on the runtime's own stream, so the replay must be too.
            with torch.cuda.stream(self.memory.stream):
                self._graph.replay()
        elif not self.context.execute_async_v3(self.memory.stream_handle):
            raise ArtifactError("TensorRT execution failed (see the TensorRT messages above)")

    def capture_cuda_graph(self) -> None:
        """Capture ``execute`` for the current batch into a CUDA graph, as ``trtexec --useCudaGraph``.

        TensorRT asks for one enqueue after any shape change before capturing, so that deferred
        shape-dependent work is not captured ("CUDA Graphs" in the TensorRT developer guide).
        Capture is thread-local, as trtexec's (cudaStreamCaptureModeThreadLocal): a CUDA call
        that is illegal during capture fails where it is made, not later in capture_end.
        """
        import torch

        self._graph = None
        self.execute()
        self.memory.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.memory.stream, capture_error_mode="thread_local"):
            if not self.context.execute_async_v3(self.memory.stream_handle):
                raise ArtifactError("TensorRT execution failed while capturing a CUDA graph")
        self._graph = graph

    def download(self) -> None:
        """Device -> pinned host buffers (asynchronous)."""
        b = self._batch
        for name in OUTPUT_NAMES:
            self.memory.copy(self.host[name][:b], self.device[name][:b])

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, 3, S, S] in [0, 1] -> (maps [B, S, S], scores [B]); any B, run in profile-sized chunks."""
        from .runtime import _check_input

        images = _check_input(images, self.crop)
        maps, scores = [], []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            n = len(chunk)
            if n < self.min_batch:  # pad up to the profile's minimum; the extra rows are dropped
                chunk = np.concatenate([chunk, np.zeros((self.min_batch - n, *chunk.shape[1:]), np.float32)])
            self.set_batch(len(chunk))
            self.upload(chunk)
            self.execute()
            self.download()
            self.memory.synchronize()
            maps.append(self.host["anomaly_map"][:n, 0].numpy().copy())
            scores.append(self.host["score"][:n].numpy().copy())
        return np.concatenate(maps), np.concatenate(scores)
