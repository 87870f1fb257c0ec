"""A recording stand-in for cuda-python's CUDA runtime module (``cuda.bindings.runtime``) on the CPU.

Like the real binding, every call returns a tuple ``(cudaError_t, *values)`` and fails by returning
a non-zero ``cudaError_t`` (and None for its value), never by raising. "Device" memory is host RAM
here, but kept apart from the pinned host allocations: a copy whose pointers are not inside
allocations of the kinds its direction names fails with ``cudaErrorInvalidValue``. Copies are
asynchronous as on a GPU: they happen at ``cudaStreamSynchronize`` of their stream, so code that
reads a result before synchronising sees stale memory, as it would on a GPU.

``fail={"cudaMalloc": cudaError_t.cudaErrorMemoryAllocation}`` makes a call fail.
"""

from __future__ import annotations

import ctypes
import enum


class cudaError_t(enum.IntEnum):  # values as in CUDA's driver_types.h
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:
    def __init__(self, ptr: int = 0) -> None:
        self._ptr = ptr

    def __int__(self) -> int:
        return self._ptr

    def getPtr(self) -> int:
        return self._ptr


class cudaDeviceProp:
    def __init__(self, name: bytes, major: int, minor: int) -> None:
        self.name, self.major, self.minor = name, major, minor


_NAMES = {
    cudaError_t.cudaSuccess: (b"cudaSuccess", b"no error"),
    cudaError_t.cudaErrorInvalidValue: (b"cudaErrorInvalidValue", b"invalid argument"),
    cudaError_t.cudaErrorMemoryAllocation: (b"cudaErrorMemoryAllocation", b"out of memory"),
    cudaError_t.cudaErrorInvalidMemcpyDirection: (b"cudaErrorInvalidMemcpyDirection", b"invalid copy direction for memcpy"),
    cudaError_t.cudaErrorNoDevice: (b"cudaErrorNoDevice", b"no CUDA-capable device is detected"),
    cudaError_t.cudaErrorInvalidResourceHandle: (b"cudaErrorInvalidResourceHandle", b"invalid resource handle"),
}

_DIRECTIONS = {  # kind -> (source pool, destination pool)
    cudaMemcpyKind.cudaMemcpyHostToDevice: ("host", "device"),
    cudaMemcpyKind.cudaMemcpyDeviceToHost: ("device", "host"),
    cudaMemcpyKind.cudaMemcpyDeviceToDevice: ("device", "device"),
    cudaMemcpyKind.cudaMemcpyHostToHost: ("host", "host"),
}


class FakeCudart:
    """The subset of ``cuda.bindings.runtime`` that ``runtime.cuda_memory`` calls."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStream_t = cudaStream_t

    def __init__(self, fail: dict[str, cudaError_t] | None = None, gpu=(b"NVIDIA Fake GPU", 8, 9)) -> None:
        self.fail = dict(fail or {})
        self.calls: list[tuple] = []
        self.pools: dict[str, dict[int, ctypes.Array]] = {"device": {}, "host": {}}
        self.streams: dict[int, list] = {}
        self._next_stream = 0x5000
        self.gpu = gpu

    def _failed(self, name: str, args: tuple):
        self.calls.append((name, *args))
        return self.fail.get(name)

    def _alloc(self, pool: str, name: str, size: int):
        err = self._failed(name, (size,))
        if err is not None:
            return err, None
        if size <= 0:
            return cudaError_t.cudaErrorInvalidValue, None
        buf = (ctypes.c_ubyte * size)()
        address = ctypes.addressof(buf)
        self.pools[pool][address] = buf
        return cudaError_t.cudaSuccess, address

    def _free(self, pool: str, name: str, ptr: int):
        err = self._failed(name, (ptr,))
        if err is not None:
            return (err,)
        if self.pools[pool].pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def _inside(self, pool: str, ptr: int, count: int) -> bool:
        return any(a <= ptr and ptr + count <= a + len(b) for a, b in self.pools[pool].items())

    def cudaMalloc(self, size):
        return self._alloc("device", "cudaMalloc", size)

    def cudaMallocHost(self, size):
        return self._alloc("host", "cudaMallocHost", size)

    def cudaFree(self, devPtr):
        return self._free("device", "cudaFree", devPtr)

    def cudaFreeHost(self, ptr):
        return self._free("host", "cudaFreeHost", ptr)

    def cudaStreamCreate(self):
        err = self._failed("cudaStreamCreate", ())
        if err is not None:
            return err, None
        self._next_stream += 0x10
        self.streams[self._next_stream] = []
        return cudaError_t.cudaSuccess, cudaStream_t(self._next_stream)

    def cudaStreamDestroy(self, stream):
        err = self._failed("cudaStreamDestroy", (int(stream),))
        if err is not None:
            return (err,)
        if self.streams.pop(int(stream), None) is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        err = self._failed("cudaMemcpyAsync", (int(dst), int(src), count, kind, int(stream)))
        if err is not None:
            return (err,)
        if int(stream) not in self.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if kind not in _DIRECTIONS:
            return (cudaError_t.cudaErrorInvalidMemcpyDirection,)
        source, destination = _DIRECTIONS[kind]
        if not (self._inside(source, int(src), count) and self._inside(destination, int(dst), count)):
            return (cudaError_t.cudaErrorInvalidValue,)
        self.streams[int(stream)].append((int(dst), int(src), count))
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        err = self._failed("cudaStreamSynchronize", (int(stream),))
        if err is not None:
            return (err,)
        pending = self.streams.get(int(stream))
        if pending is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for dst, src, count in pending:
            ctypes.memmove(dst, src, count)
        pending.clear()
        return (cudaError_t.cudaSuccess,)

    def cudaGetDevice(self):
        err = self._failed("cudaGetDevice", ())
        return (err, None) if err is not None else (cudaError_t.cudaSuccess, 0)

    def cudaGetDeviceProperties(self, device):
        err = self._failed("cudaGetDeviceProperties", (device,))
        return (err, None) if err is not None else (cudaError_t.cudaSuccess, cudaDeviceProp(*self.gpu))

    def cudaGetErrorName(self, error):
        return cudaError_t.cudaSuccess, _NAMES[error][0]

    def cudaGetErrorString(self, error):
        return cudaError_t.cudaSuccess, _NAMES[error][1]

    def called(self, name: str) -> list[tuple]:
        """The arguments of every call of ``name``, in order."""
        return [c[1:] for c in self.calls if c[0] == name]

    def live(self) -> int:
        """Allocations and streams not yet freed."""
        return len(self.pools["device"]) + len(self.pools["host"]) + len(self.streams)
