"""Device buffers, pinned host buffers and one stream through ``cuda-python``: the TensorRT
runtime's memory on a machine without PyTorch.

The same interface as ``runtime.tensorrt.TorchCudaMemory`` (``device_empty``, ``host_empty``,
``copy``, ``synchronize``, ``stream``, ``stream_handle``), with numpy dtypes. Host buffers are numpy
arrays over ``cudaMallocHost`` memory (``HostBuffer``: slicing, ``copy_``, ``numpy()``,
``data_ptr()``); device buffers are an integer pointer with a shape (``DeviceBuffer``: slicing
along the batch axis, ``data_ptr()``), as TensorRT's ``set_tensor_address`` takes them.

Every ``cudart`` call returns a tuple ``(cudaError_t, *values)``, as NVIDIA's own samples check it
(``cuda_call`` in TensorRT's ``samples/python/common_runtime.py``); a non-zero error becomes an
exception naming the call and CUDA's error name. ``cudart`` is ``cuda.bindings.runtime``
(cuda-python >= 12.8) or ``cuda.cudart`` (before); tests pass a recording fake.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

from ..errors import MissingDependencyError, ProtoADError, ResourceError


class CudaError(ProtoADError):
    """A CUDA runtime call failed (driver, device or launch): this machine's CUDA, not the bundle."""

    exit_code = 4


def import_cudart():
    """The CUDA runtime module of cuda-python, or one line saying how to install it."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.8
        except ImportError:
            raise MissingDependencyError("cuda-python is not installed (pip install cuda-python): "
                                         "the tensorrt backend needs it without PyTorch") from None
    return cudart


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check(cudart, call: str, result: tuple) -> Any:
    """``result`` of ``cudart.<call>(...)`` without its error code: None, one value or a tuple."""
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        name = _text(cudart.cudaGetErrorName(err)[1])
        what = _text(cudart.cudaGetErrorString(err)[1])
        if err == cudart.cudaError_t.cudaErrorMemoryAllocation:
            raise ResourceError(f"{call} failed: {name} ({what}): not enough GPU or pinned host memory")
        raise CudaError(f"{call} failed: {name} ({what})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class HostBuffer:
    """Pinned host memory seen as a numpy array; slices are views of the same pinned memory."""

    def __init__(self, array: np.ndarray, owner: Any) -> None:
        self.array = array
        self._owner = owner  # keeps the pinned allocation alive while any view exists

    def __getitem__(self, key) -> "HostBuffer":
        view = self.array[key]
        if not isinstance(view, np.ndarray) or not np.may_share_memory(view, self.array):
            raise IndexError("only basic indexing keeps a host buffer in pinned memory")
        return HostBuffer(view, self._owner)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def numpy(self) -> np.ndarray:
        """The buffer as a numpy view (valid until the memory is closed)."""
        return self.array

    def copy_(self, src) -> "HostBuffer":
        """Copy a numpy array (or another host buffer) of the same shape into this buffer."""
        src = src.array if isinstance(src, HostBuffer) else np.asarray(src)
        if src.shape != self.shape:
            raise ValueError(f"cannot copy shape {list(src.shape)} into a host buffer of shape {list(self.shape)}")
        np.copyto(self.array, src, casting="no")
        return self


class DeviceBuffer:
    """Device memory: an address, a shape and a numpy dtype. Slices along the first axis are views."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype, owner: Any = None) -> None:
        self.ptr, self.shape, self.dtype = int(ptr), tuple(int(s) for s in shape), np.dtype(dtype)
        self._owner = owner

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def data_ptr(self) -> int:
        return self.ptr

    def __getitem__(self, key) -> "DeviceBuffer":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise IndexError("device buffers are sliced along the batch axis only ([start:stop])")
        start, stop, _ = key.indices(self.shape[0])
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        return DeviceBuffer(self.ptr + start * row, (max(0, stop - start), *self.shape[1:]), self.dtype, self._owner)

    def numpy(self):
        raise TypeError("device memory has no numpy view: copy it into a host buffer first")


class CudaMemory:
    """Device buffers, pinned host buffers and one stream from the CUDA runtime (no PyTorch).

    Allocations live until :meth:`close` (also on garbage collection); ``copy`` is asynchronous
    on the memory's stream, ``synchronize`` waits for it.
    """

    def __init__(self, cudart=None) -> None:
        self.cudart = cudart or import_cudart()
        self._device: list[int] = []
        self._host: list[int] = []
        self.stream = None
        self.stream = self._call("cudaStreamCreate")

    def _call(self, name: str, *args) -> Any:
        return check(self.cudart, name, getattr(self.cudart, name)(*args))

    @property
    def stream_handle(self) -> int:
        """The stream as the integer ``execute_async_v3`` takes."""
        return int(self.stream)

    def _allocate(self, call: str, shape: tuple[int, ...], dtype) -> tuple[int, np.dtype, int]:
        """(pointer, dtype, bytes) of a new ``cudaMalloc`` / ``cudaMallocHost`` buffer."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes <= 0:
            raise ValueError(f"empty buffer of shape {list(shape)}")
        ptr = int(self._call(call, nbytes))
        (self._device if call == "cudaMalloc" else self._host).append(ptr)
        return ptr, dtype, nbytes

    def device_empty(self, shape: tuple[int, ...], dtype) -> DeviceBuffer:
        ptr, dtype, _ = self._allocate("cudaMalloc", shape, dtype)
        return DeviceBuffer(ptr, shape, dtype, self)

    def host_empty(self, shape: tuple[int, ...], dtype) -> HostBuffer:
        ptr, dtype, nbytes = self._allocate("cudaMallocHost", shape, dtype)
        # A byte view first, then the dtype: ctypes has no float16 type (as in TensorRT's samples).
        raw = np.ctypeslib.as_array(ctypes.cast(ctypes.c_void_p(ptr), ctypes.POINTER(ctypes.c_ubyte)), (nbytes,))
        return HostBuffer(raw.view(dtype).reshape(shape), self)

    def copy(self, dst, src) -> None:
        """Asynchronous copy on the memory's stream: pinned host <-> device, or device -> device."""
        if dst.nbytes != src.nbytes or np.dtype(dst.dtype) != np.dtype(src.dtype):
            raise ValueError(f"copy between {src.dtype} {list(src.shape)} and {dst.dtype} {list(dst.shape)}")
        for buf in (dst, src):
            if isinstance(buf, HostBuffer) and not buf.array.flags.c_contiguous:
                raise ValueError("host buffers copied to or from the device must be contiguous")
        kinds = self.cudart.cudaMemcpyKind
        kind = {
            (HostBuffer, DeviceBuffer): kinds.cudaMemcpyHostToDevice,
            (DeviceBuffer, HostBuffer): kinds.cudaMemcpyDeviceToHost,
            (DeviceBuffer, DeviceBuffer): kinds.cudaMemcpyDeviceToDevice,
        }.get((type(src), type(dst)))
        if kind is None:
            raise TypeError(f"copy from {type(src).__name__} to {type(dst).__name__}: one side must be on the device")
        self._call("cudaMemcpyAsync", dst.data_ptr(), src.data_ptr(), dst.nbytes, kind, self.stream)

    def synchronize(self) -> None:
        self._call("cudaStreamSynchronize", self.stream)

    def close(self) -> None:
        """Wait for the stream, free every buffer and destroy the stream (views become invalid)."""
        if self.stream is None:
            return
        stream, self.stream = self.stream, None
        try:
            check(self.cudart, "cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(stream))
        finally:
            while self._device:
                check(self.cudart, "cudaFree", self.cudart.cudaFree(self._device.pop()))
            while self._host:
                check(self.cudart, "cudaFreeHost", self.cudart.cudaFreeHost(self._host.pop()))
            check(self.cudart, "cudaStreamDestroy", self.cudart.cudaStreamDestroy(stream))

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown or a dead context: nothing left to free
            pass


def gpu_info(cudart=None) -> dict[str, str]:
    """Name and compute capability of the current GPU (``export.tensorrt.gpu_info`` without PyTorch)."""
    cudart = cudart or import_cudart()
    device = check(cudart, "cudaGetDevice", cudart.cudaGetDevice())
    props = check(cudart, "cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(device))
    return {"gpu": _text(props.name).rstrip("\0"), "compute_capability": f"{props.major}.{props.minor}"}
