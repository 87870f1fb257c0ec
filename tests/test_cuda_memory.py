"""runtime.cuda_memory (TensorRT's buffers and stream through cuda-python, no PyTorch) against a
recording fake of the CUDA runtime that returns and fails like the real binding."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from fake_cudart import FakeCudart, cudaError_t, cudaMemcpyKind

from protoad_export.errors import MissingDependencyError, ResourceError
from protoad_export.runtime.cuda_memory import CudaError, CudaMemory, gpu_info, import_cudart

USED = ("cudaMalloc", "cudaMallocHost", "cudaFree", "cudaFreeHost", "cudaMemcpyAsync", "cudaStreamCreate",
        "cudaStreamSynchronize", "cudaStreamDestroy", "cudaGetDevice", "cudaGetDeviceProperties",
        "cudaGetErrorName", "cudaGetErrorString")


def test_upload_and_download_round_trip_on_the_stream_asynchronously():
    cudart = FakeCudart()
    memory = CudaMemory(cudart)
    shape = (4, 3, 2, 2)
    device, host_in, host_out = memory.device_empty(shape, np.float32), memory.host_empty(shape, np.float32), \
        memory.host_empty(shape, np.float32)
    data = np.arange(2 * 12, dtype=np.float32).reshape(2, 3, 2, 2)
    host_in[:2].copy_(data)
    memory.copy(device[:2], host_in[:2])
    memory.copy(host_out[:2], device[:2])
    assert not host_out.numpy().any()  # asynchronous: nothing has arrived before the stream is synchronised
    memory.synchronize()
    np.testing.assert_array_equal(host_out[:2].numpy(), data)
    assert not host_out.numpy()[2:].any()
    handle = memory.stream_handle
    assert cudart.called("cudaMemcpyAsync") == [
        (device.data_ptr(), host_in.data_ptr(), 2 * 12 * 4, cudaMemcpyKind.cudaMemcpyHostToDevice, handle),
        (host_out.data_ptr(), device.data_ptr(), 2 * 12 * 4, cudaMemcpyKind.cudaMemcpyDeviceToHost, handle),
    ]


def test_slices_are_views_at_byte_offsets_and_dtypes_without_ctypes_work():
    memory = CudaMemory(FakeCudart())
    device = memory.device_empty((8, 3, 4, 4), np.uint8)
    assert device[2:5].data_ptr() == device.data_ptr() + 2 * 48 and device[2:5].shape == (3, 3, 4, 4)
    assert device[:20].shape[0] == 8
    with pytest.raises(IndexError):
        device[1]
    half = memory.host_empty((2, 5), np.float16)  # ctypes has no float16: mapped through a byte view
    half[1].copy_(np.full(5, 0.5, np.float16))
    assert half.numpy().dtype == np.float16 and half[1].data_ptr() == half.data_ptr() + 10
    np.testing.assert_array_equal(half.numpy()[1], 0.5)
    with pytest.raises(ValueError, match="cannot copy shape"):
        half[:1].copy_(np.zeros((2, 5), np.float16))
    with pytest.raises(ValueError):  # another dtype is refused, not cast
        memory.copy(memory.device_empty((2, 5), np.float32), half)


def test_allocation_failure_is_a_resource_error_naming_the_call():
    memory = CudaMemory(FakeCudart(fail={"cudaMalloc": cudaError_t.cudaErrorMemoryAllocation}))
    with pytest.raises(ResourceError, match=re.escape(
            "cudaMalloc failed: cudaErrorMemoryAllocation (out of memory): not enough GPU or pinned host memory")):
        memory.device_empty((1024, 1024), np.float32)


def test_other_cuda_failures_name_the_call_and_exit_4():
    with pytest.raises(CudaError, match=re.escape("cudaStreamCreate failed: cudaErrorNoDevice (no CUDA-capable device is detected)")) as info:
        CudaMemory(FakeCudart(fail={"cudaStreamCreate": cudaError_t.cudaErrorNoDevice}))
    assert info.value.exit_code == 4
    memory = CudaMemory(FakeCudart())
    host = memory.host_empty((2, 3), np.float32)
    with pytest.raises(TypeError, match="one side must be on the device"):
        memory.copy(host, memory.host_empty((2, 3), np.float32))
    memory.cudart.fail["cudaStreamSynchronize"] = cudaError_t.cudaErrorInvalidValue
    with pytest.raises(CudaError, match="cudaStreamSynchronize failed: cudaErrorInvalidValue"):
        memory.synchronize()


def test_close_frees_every_buffer_and_the_stream_once():
    cudart = FakeCudart()
    memory = CudaMemory(cudart)
    memory.device_empty((2, 3), np.float32)
    memory.host_empty((2, 3), np.uint8)
    assert cudart.live() == 3
    memory.close()
    memory.close()
    assert cudart.live() == 0
    assert len(cudart.called("cudaStreamDestroy")) == 1


def test_gpu_info_without_torch():
    assert gpu_info(FakeCudart(gpu=(b"NVIDIA H200", 9, 0))) == {"gpu": "NVIDIA H200", "compute_capability": "9.0"}


def test_missing_cuda_python_is_one_line(monkeypatch):
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"cuda-python is not installed \(pip install cuda-python\)"):
        import_cudart()


def test_the_fake_has_the_real_bindings_signatures_and_values():
    """Where cuda-python is installed (it comes with CUDA builds of PyTorch), the fake's calls take the
    real functions' arguments and its enums have the real values."""
    real = pytest.importorskip("cuda.bindings.runtime")
    from inspect import signature

    fake = FakeCudart()
    for name in USED:
        doc = getattr(real, name).__doc__.strip().splitlines()[0]  # e.g. "cudaMemcpyAsync(dst, src, size_t count, ...)"
        params = [p for p in doc.split("(", 1)[1].rsplit(")", 1)[0].split(",") if p.strip()]
        assert len(signature(getattr(fake, name)).parameters) == len(params), (name, doc)
    for enum in ("cudaError_t", "cudaMemcpyKind"):
        for member in getattr(fake, enum):
            assert int(getattr(getattr(real, enum), member.name)) == int(member), member
