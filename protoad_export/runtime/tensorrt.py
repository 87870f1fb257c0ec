"""TensorRT backend: a compiled engine with ``execute_async_v3``, named tensors and a dynamic batch.

Engines are compiled by ``export.tensorrt`` (``protoad-export compile``); this module only runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..contract import OUTPUT_NAMES, output_shapes
from ..errors import ArtifactError, InputError, MissingDependencyError
from ..bundle import verify_file
from ..export import tensorrt as compiler
from .base import Runtime

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


class TensorRTRuntime(Runtime):
    """A compiled engine with ``execute_async_v3``, named tensors and a dynamic batch within its profile."""

    backend = "tensorrt"
    precision = "fp16"
    on_gpu = True

    def __init__(self, bundle_dir: str | Path, manifest: dict, memory_factory: Callable[[], Any] | None = None) -> None:
        import torch

        super().__init__(manifest)
        engines = compiler._engine_entries(manifest)
        if not engines:
            raise ArtifactError(f"{bundle_dir} has no TensorRT engine: run `protoad-export compile {bundle_dir}` on the target machine")
        trt = compiler._import_tensorrt()
        if memory_factory is None and not compiler._cuda_available():
            raise MissingDependencyError("the tensorrt backend needs a CUDA GPU, and none is visible")
        info = compiler.gpu_info()
        entry = engines.get(compiler.gpu_slug(info["gpu"]))
        if entry is None:
            built = ", ".join(sorted(e["gpu"] for e in engines.values()))
            raise ArtifactError(f"no engine for this GPU ({info['gpu']}) in {bundle_dir}: built for {built}; compile it here")
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
        path = verify_file(bundle_dir, manifest, entry["file"])
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
        self.input_name = self.contract.name
        if inputs != [self.input_name] or sorted(set(names) - set(inputs)) != sorted(OUTPUT_NAMES):
            raise ArtifactError(f"{path.name} has tensors {names}; expected input {self.input_name!r} and outputs {list(OUTPUT_NAMES)}")
        # The buffers below hold the contract's dtypes in linear layout; an engine whose I/O differs
        # (FP16 outputs, a vectorised format) would read or write them wrongly without an error.
        io_dtypes = {n: "FLOAT" for n in names}
        io_dtypes[self.input_name] = "UINT8" if self.contract.kind == "frames" else "FLOAT"
        for name in names:
            dtype = self.engine.get_tensor_dtype(name)
            if dtype != getattr(trt.DataType, io_dtypes[name]):
                raise ArtifactError(f"{path.name}: tensor {name!r} is {dtype.name}, this runtime feeds {io_dtypes[name]}: recompile it")
            layout = self.engine.get_tensor_format(name)
            if layout != trt.TensorFormat.LINEAR:
                raise ArtifactError(f"{path.name}: tensor {name!r} has format {layout.name}, this runtime needs LINEAR: recompile it")
        bp = entry["batch_profile"]
        self.min_batch, self.max_batch = int(bp["min"]), int(bp["max"])
        self.memory = (memory_factory or TorchCudaMemory)()
        b = self.max_batch
        shapes = {self.input_name: self.contract.shape(b), **output_shapes(self.contract, b)}
        dtypes = {n: torch.float32 for n in shapes}
        dtypes[self.input_name] = torch.uint8 if self.contract.kind == "frames" else torch.float32
        self.device = {n: self.memory.device_empty(shp, dtypes[n]) for n, shp in shapes.items()}
        self.host = {n: self.memory.host_empty(shp, dtypes[n]) for n, shp in shapes.items()}
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
            shape = self.contract.shape(batch)
            if not self.context.set_input_shape(self.input_name, shape):
                raise ArtifactError(f"TensorRT rejected input shape {list(shape)}")
            got = tuple(self.context.get_tensor_shape("anomaly_map"))
            if got != output_shapes(self.contract, batch)["anomaly_map"]:
                raise ArtifactError(f"engine output anomaly_map has shape {list(got)} for batch {batch}")
            self._batch = batch

    def upload(self, images: np.ndarray) -> None:
        """Host -> pinned buffer -> device (asynchronous on the runtime's stream)."""
        import torch

        b = len(images)
        self.host[self.input_name][:b].copy_(torch.from_numpy(images))
        self.memory.copy(self.device[self.input_name][:b], self.host[self.input_name][:b])

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

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Any B, run in profile-sized chunks."""
        maps, scores = [], []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            n = len(chunk)
            if n < self.min_batch:  # pad up to the profile's minimum; the extra rows are dropped
                chunk = np.concatenate([chunk, np.zeros((self.min_batch - n, *chunk.shape[1:]), chunk.dtype)])
            self.set_batch(len(chunk))
            self.upload(chunk)
            self.execute()
            self.download()
            self.memory.synchronize()
            maps.append(self.host["anomaly_map"][:n, 0].numpy().copy())
            scores.append(self.host["score"][:n].numpy().copy())
        return np.concatenate(maps), np.concatenate(scores)
