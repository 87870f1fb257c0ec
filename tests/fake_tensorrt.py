"""A recording stand-in for the ``tensorrt`` Python module, 10.x or 11.x flavour.

Only the API surface protoad-export uses exists, so a call to anything else (for example
``BuilderFlag.FP16`` on 11.x, where TensorRT removed it) fails as it would on the real module.
Every call is appended to ``module.calls`` as ``(name, args)``. The "plan" the fake builder
returns is JSON that the fake runtime reads back (profile and crop), so shape checks work.
``module.compute(addresses, batch)``, when set, plays the engine: it gets the tensor addresses
bound with ``set_tensor_address`` and must fill the outputs.

Behaviours modelled on the real module, each checked against NVIDIA/TensorRT's sources (branches
release/10.9, release/10.16, release/11.0, release/11.1) or PyTorch's:

- ``NetworkDefinitionCreationFlag``: 10.x EXPLICIT_BATCH = 0 (deprecated), STRONGLY_TYPED = 1,
  PREFER_JIT_PYTHON_PLUGINS = 2, PREFER_AOT_PYTHON_PLUGINS = 3; 11.x STRONGLY_TYPED = 0 (kept,
  deprecated and ignored: strong typing is always on), PREFER_JIT = 1, PREFER_AOT = 2
  (``include/NvInfer.h``; the Python names in ``python/src/infer/pyCore.cpp``).
- ``IBuilderConfig.create_timing_cache(blob)`` returns the ``ITimingCache*`` of
  ``createTimingCache``, which is nullptr (Python: None) when the blob cannot be read, e.g. one
  written by another TensorRT version (``pyCore.cpp`` ``netconfig_create_timing_cache``;
  trtexec's ``shared/utils/cacheUtils.cpp`` checks ``timingCache == nullptr``). An empty blob
  makes a new cache ("Size 0 means create a new cache from scratch", ``NvInfer.h``).
- ``set_timing_cache(cache, ignore_mismatch)`` takes ``ITimingCache const&``: pybind11 refuses
  None for a reference parameter with TypeError. It returns False for a cache of another device
  unless ``ignore_mismatch`` ("A failure will be reported if the CUDA device property in the
  provided cache is different", ``NvInfer.h`` ``setTimingCache``).
- ``ITimingCache.combine(input_cache, ignore_mismatch)`` -> bool (``pyCore.cpp``; Polygraphy's
  ``backend/trt/loader.py`` merges the previous cache with ``ignore_mismatch=True``).
- ``ICudaEngine.get_tensor_dtype`` / ``get_tensor_format`` return ``DataType`` / ``TensorFormat``
  (values from ``NvInferRuntimeBase.h`` / ``NvInferRuntime.h``; both bound in 10.x and 11.x
  ``pyCore.cpp``; Polygraphy's ``backend/trt/runner.py`` reads both).
- ``IExecutionContext.set_tensor_address`` returns False for a name that is no I/O tensor, and the
  pointer "must have at least 256-byte alignment" (``NvInferRuntime.h`` ``setTensorAddress``);
  the fake refuses a misaligned one the same way. Polygraphy's runner stops when it is False.
- ``execute_async_v3(stream_handle)`` enqueues work on that stream (``enqueueV3`` on
  ``cudaStream_t``) and returns at once; it runs when the stream is synchronised. A handle that is
  no stream of the :class:`FakeCuda` model fails the enqueue (False).
- Streams and CUDA graphs (:class:`FakeCuda`, patched over ``torch.cuda`` by the tests): work
  enqueued on a stream being captured goes into the graph; ``CUDAGraph.replay()`` launches on the
  *current* stream, as PyTorch's ``CUDAGraph::replay`` calls
  ``cudaGraphLaunch(graph_exec_, at::cuda::getCurrentCUDAStream())``
  (``aten/src/ATen/cuda/CUDAGraph.cpp``), so a replay outside ``torch.cuda.stream(s)`` lands on
  the default stream and a later ``s.synchronize()`` does not wait for it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import types
from dataclasses import dataclass
from typing import Callable

PLAN_MAGIC = b"FAKEPLAN"


@dataclass
class FakeParserError:
    desc_text: str
    node_index: int = -1
    name: str = ""
    operator: str = ""

    def desc(self) -> str:
        return self.desc_text

    def node(self) -> int:
        return self.node_index

    def node_name(self) -> str:
        return self.name

    def node_operator(self) -> str:
        return self.operator

    def code(self) -> int:
        return 8  # ErrorCode.UNSUPPORTED_NODE


class HostMemory(bytes):
    """IHostMemory supports the buffer protocol; bytes does too."""


CACHE_MAGIC = b"FAKECACHE"
ALIGNMENT = 256  # setTensorAddress: "The pointer must have at least 256-byte alignment."


class FakeStream:
    """A CUDA stream: enqueued work runs, in order, when the stream is synchronised."""

    def __init__(self, cuda: "FakeCuda", handle: int) -> None:
        self.cuda = cuda
        self.cuda_stream = handle
        self.pending: list[Callable[[], None]] = []

    def enqueue(self, work: Callable[[], None]) -> None:
        graph = self.cuda.capturing.get(self.cuda_stream)
        (graph.work if graph is not None else self.pending).append(work)

    def synchronize(self) -> None:
        while self.pending:
            self.pending.pop(0)()


class FakeCudaGraph:
    """torch.cuda.CUDAGraph: captured work, replayed on the current stream."""

    def __init__(self, cuda: "FakeCuda") -> None:
        self.cuda = cuda
        self.work: list[Callable[[], None]] = []
        self.capture_error_mode: str | None = None

    def replay(self) -> None:
        stream = self.cuda.current
        self.cuda.replays.append(stream.cuda_stream)
        for work in self.work:
            stream.enqueue(work)


class FakeCuda:
    """The part of ``torch.cuda`` the runtime uses: streams, the current stream, graph capture.

    Attribute names match ``torch.cuda`` (``Stream``, ``stream``, ``current_stream``,
    ``CUDAGraph``, ``graph``) so a test can patch them over it.
    """

    def __init__(self) -> None:
        self.streams: dict[int, FakeStream] = {}
        self.default = self._new()
        self.current = self.default
        self.capturing: dict[int, FakeCudaGraph] = {}
        self.replays: list[int] = []  # stream handle of every replay

    def _new(self) -> FakeStream:
        stream = FakeStream(self, len(self.streams) * 16)  # the default stream is handle 0
        self.streams[stream.cuda_stream] = stream
        return stream

    def Stream(self) -> FakeStream:  # noqa: N802  (torch.cuda.Stream)
        return self._new()

    def current_stream(self) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def CUDAGraph(self) -> FakeCudaGraph:  # noqa: N802  (torch.cuda.CUDAGraph)
        return FakeCudaGraph(self)

    @contextlib.contextmanager
    def graph(self, cuda_graph: FakeCudaGraph, pool=None, stream: FakeStream | None = None,
              capture_error_mode: str = "global"):
        """torch.cuda.graph: capture on ``stream`` (made current meanwhile); PyTorch's default mode is "global"."""
        stream = stream or self.Stream()
        cuda_graph.capture_error_mode = capture_error_mode
        self.capturing[stream.cuda_stream] = cuda_graph
        try:
            with self.stream(stream):
                yield
        finally:
            del self.capturing[stream.cuda_stream]

    def synchronize(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()


def make_fake_tensorrt(version: str = "10.9.0.34", parse_errors: list[FakeParserError] | None = None,
                       build_fails: bool = False, device: str = "NVIDIA Fake GPU 40GB",
                       cuda: FakeCuda | None = None, io_dtypes: dict[str, str] | None = None,
                       io_formats: dict[str, str] | None = None) -> types.ModuleType:
    """A fresh fake module.

    ``parse_errors`` make parsing fail, ``build_fails`` makes the build return None; ``device``
    is the GPU that timing caches are tied to; ``cuda`` is the stream model that
    ``execute_async_v3`` enqueues on (without one, work runs at once); ``io_dtypes`` /
    ``io_formats`` override the engine's tensor DataType / TensorFormat names (default FLOAT, LINEAR).
    """
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.compute = None
    trt.cuda = cuda

    def record(name, *args):
        trt.calls.append((name, args))

    class Severity(enum.IntEnum):
        ERROR = 1
        WARNING = 2
        INFO = 3

    class Logger:
        ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO

        def __init__(self, severity=Severity.WARNING):
            record("Logger", severity)

    if major >= 11:
        # 11.x: strong typing is always on; the weak-typing builder flags are gone.
        class BuilderFlag(enum.IntEnum):
            DEBUG = 2
            REFIT = 4

        class NetworkDefinitionCreationFlag(enum.IntEnum):
            STRONGLY_TYPED = 0  # deprecated in 11.0, ignored: strong typing is always on
            PREFER_JIT_PYTHON_PLUGINS = 1
            PREFER_AOT_PYTHON_PLUGINS = 2
    else:
        class BuilderFlag(enum.IntEnum):
            FP16 = 0
            INT8 = 1
            DEBUG = 2
            REFIT = 4

        class NetworkDefinitionCreationFlag(enum.IntEnum):
            EXPLICIT_BATCH = 0  # deprecated, ignored
            STRONGLY_TYPED = 1
            PREFER_JIT_PYTHON_PLUGINS = 2
            PREFER_AOT_PYTHON_PLUGINS = 3

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        BOOL = 4
        UINT8 = 5
        FP8 = 6
        BF16 = 7
        INT64 = 8

    class TensorFormat(enum.IntEnum):
        LINEAR = 0
        CHW2 = 1
        HWC8 = 2
        CHW4 = 3
        CHW16 = 4
        CHW32 = 5
        HWC = 8

    class Network:
        def __init__(self, flags):
            self.flags = flags

    class OnnxParser:
        def __init__(self, network, logger):
            record("OnnxParser")
            self.errors = list(parse_errors or [])

        def parse_from_file(self, path):
            record("parse_from_file", path)
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            record("get_error", index)
            return self.errors[index]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):  # noqa: A002  (TensorRT's parameter names)
            record("set_shape", name, tuple(min), tuple(opt), tuple(max))
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class TimingCache:
        """Serialised as JSON naming the TensorRT version and device it was made with."""

        def __init__(self, entries, device_name):
            self.entries = dict(entries)
            self.device = device_name

        def serialize(self):
            record("timing_cache.serialize")
            body = {"version": version, "device": self.device, "entries": self.entries}
            return HostMemory(CACHE_MAGIC + json.dumps(body, sort_keys=True).encode())

        def combine(self, input_cache, ignore_mismatch):
            record("timing_cache.combine", ignore_mismatch)
            if input_cache.device != self.device and not ignore_mismatch:
                return False
            self.entries = {**input_cache.entries, **self.entries}
            return True

    def read_cache(blob):
        """create_timing_cache's parse: None where the real call gives nullptr."""
        blob = bytes(blob)
        if not blob:
            return TimingCache({}, device)
        if not blob.startswith(CACHE_MAGIC):
            return None
        try:
            body = json.loads(blob[len(CACHE_MAGIC):])
        except ValueError:
            return None
        if body.get("version") != version:  # another TensorRT version's layout
            return None
        return TimingCache(body["entries"], body["device"])

    class Config:
        def __init__(self):
            object.__setattr__(self, "profiles", [])
            object.__setattr__(self, "cache", None)

        def __setattr__(self, name, value):
            record(f"config.{name}=", value)
            object.__setattr__(self, name, value)

        def set_flag(self, flag):
            record("set_flag", flag)

        def set_memory_pool_limit(self, pool, size):
            record("set_memory_pool_limit", pool, size)

        def add_optimization_profile(self, profile):
            record("add_optimization_profile")
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, blob):
            record("create_timing_cache", bytes(blob))
            return read_cache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            record("set_timing_cache", ignore_mismatch)
            if not isinstance(cache, TimingCache):
                raise TypeError("set_timing_cache(): incompatible function arguments")
            if cache.device != device and not ignore_mismatch:
                return False
            object.__setattr__(self, "cache", cache)
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            record("Builder")

        def create_network(self, flags=0):
            record("create_network", flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record("build_serialized_network")
            if build_fails:
                return None
            if config.cache is not None:  # the build adds its timings to the attached cache
                config.cache.entries[f"tactics-{len(config.cache.entries)}"] = device
            (lo, _opt, hi), = [p.shapes["image"] for p in config.profiles]
            plan = {"min": lo[0], "max": hi[0], "crop": lo[2], "version": version}
            return HostMemory(PLAN_MAGIC + json.dumps(plan).encode())

    class ExecutionContext:
        def __init__(self, plan):
            self.plan = plan
            self.batch = None
            self.addresses = {}

        def set_input_shape(self, name, shape):
            record("set_input_shape", name, tuple(shape))
            ok = name == "image" and self.plan["min"] <= shape[0] <= self.plan["max"]
            if ok:
                self.batch = shape[0]
            return ok

        def get_tensor_shape(self, name):
            record("get_tensor_shape", name)
            s = self.plan["crop"]
            return {"image": (self.batch, 3, s, s), "anomaly_map": (self.batch, 1, s, s), "score": (self.batch,)}[name]

        def set_tensor_address(self, name, address):
            record("set_tensor_address", name)
            if name not in Engine.names or int(address) % ALIGNMENT:
                return False
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle):
            record("execute_async_v3", stream_handle)
            if set(self.addresses) != {"image", "anomaly_map", "score"} or self.batch is None:
                return False
            addresses, batch = dict(self.addresses), self.batch  # fixed at enqueue (and capture) time

            def work():
                if trt.compute is not None:
                    trt.compute(addresses, batch)

            if trt.cuda is None:
                work()
                return True
            stream = trt.cuda.streams.get(int(stream_handle))
            if stream is None:
                return False
            stream.enqueue(work)
            return True

    class Engine:
        names = ("image", "anomaly_map", "score")

        def __init__(self, plan):
            self.plan = plan

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            record("get_tensor_dtype", name)
            return DataType[(io_dtypes or {}).get(name, "FLOAT")]

        def get_tensor_format(self, name, profile_index=0):
            record("get_tensor_format", name)
            return TensorFormat[(io_formats or {}).get(name, "LINEAR")]

        def create_execution_context(self):
            record("create_execution_context")
            return ExecutionContext(self.plan)

    class Runtime:
        def __init__(self, logger):
            record("Runtime")

        def deserialize_cuda_engine(self, data):
            record("deserialize_cuda_engine")
            data = bytes(data)
            if not data.startswith(PLAN_MAGIC):
                return None
            return Engine(json.loads(data[len(PLAN_MAGIC):]))

    for obj in (Logger, BuilderFlag, NetworkDefinitionCreationFlag, MemoryPoolType, TensorIOMode, DataType,
                TensorFormat, OnnxParser, Builder, Runtime):
        setattr(trt, obj.__name__, obj)
    return trt


def called(trt: types.ModuleType, name: str) -> list[tuple]:
    """Arguments of every recorded call of ``name``."""
    return [args for n, args in trt.calls if n == name]
