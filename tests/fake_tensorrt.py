"""A recording stand-in for the ``tensorrt`` Python module, 10.x or 11.x flavour.

Only the API surface protoad-export uses exists, so a call to anything else (for example
``BuilderFlag.FP16`` on 11.x, where TensorRT removed it) fails as it would on the real module.
Every call is appended to ``module.calls`` as ``(name, args)``. The "plan" the fake builder
returns is JSON that the fake runtime reads back (profile and crop), so shape checks work.
``module.compute(addresses, batch)``, when set, plays the engine: it gets the tensor addresses
bound with ``set_tensor_address`` and must fill the outputs.
"""

from __future__ import annotations

import enum
import json
import types
from dataclasses import dataclass

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


def make_fake_tensorrt(version: str = "10.9.0.34", parse_errors: list[FakeParserError] | None = None,
                       build_fails: bool = False) -> types.ModuleType:
    """A fresh fake module; ``parse_errors`` make parsing fail, ``build_fails`` makes the build return None."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []
    trt.compute = None

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
            PREFER_AOT_PYTHON_PLUGINS = 1
    else:
        class BuilderFlag(enum.IntEnum):
            FP16 = 0
            INT8 = 1
            DEBUG = 2
            REFIT = 4

        class NetworkDefinitionCreationFlag(enum.IntEnum):
            EXPLICIT_BATCH = 0
            STRONGLY_TYPED = 1

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

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
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            record("timing_cache.serialize")
            return HostMemory(b"TIMING" + str(len(self.blob)).encode())

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
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            record("set_timing_cache", ignore_mismatch)
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
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle):
            record("execute_async_v3", stream_handle)
            if set(self.addresses) != {"image", "anomaly_map", "score"} or self.batch is None:
                return False
            if trt.compute is not None:
                trt.compute(dict(self.addresses), self.batch)
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

    for obj in (Logger, BuilderFlag, NetworkDefinitionCreationFlag, MemoryPoolType, TensorIOMode, OnnxParser,
                Builder, Runtime):
        setattr(trt, obj.__name__, obj)
    return trt


def called(trt: types.ModuleType, name: str) -> list[tuple]:
    """Arguments of every recorded call of ``name``."""
    return [args for n, args in trt.calls if n == name]
