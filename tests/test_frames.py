"""Preprocessing in the graph: the resize tables, the Python path and the ``frames`` graph input agree."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from protoad_export.data.images import Preprocessing
from protoad_export.data.resample import axis_resample, triangle_weights
from protoad_export.export.onnx import TENSORRT_OPS
from protoad_export.model.frames import FrameInput

SIZES = [((632, 300), (256, 121)), ((103, 222), (256, 552)), ((640, 480), (298, 224)), ((200, 200), (200, 200)),
         ((2048, 1536), (341, 256))]


def _frame(width, height, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, channels)) * 255).astype(np.uint8)


@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_is_pillows_bilinear_without_its_8bit_rounding(src, dst):
    """The tables hold Pillow's BILINEAR weights: the float result is within one 8-bit step of
    Pillow's (which rounds after each pass), and exactly the identity at the same size."""
    pixels = _frame(*src)
    ref = np.asarray(Image.fromarray(pixels).resize(dst, Image.BILINEAR), dtype=np.float32)
    axis_w, axis_h = axis_resample(src[0], dst[0]), axis_resample(src[1], dst[1])
    out = axis_w.apply_last(axis_h.apply_first(pixels.astype(np.float32)).transpose(2, 0, 1)).transpose(1, 2, 0)
    assert np.abs(out - ref).max() <= 1.0
    if src == dst:
        assert np.array_equal(out, pixels.astype(np.float32))


@pytest.mark.parametrize("n_in,n_out,kept", [(2048, 341, None), (300, 256, (16, 240)), (50, 200, (3, 197)), (7, 7, None)])
def test_block_tables_equal_the_dense_band(n_in, n_out, kept):
    """Blocks, spans and padding change nothing: the tables are the dense band, row by row."""
    table = axis_resample(n_in, n_out, kept)
    starts, weights = triangle_weights(n_in, n_out)
    lo, hi = kept or (0, n_out)
    dense = np.zeros((n_in, hi - lo))
    for j in range(lo, hi):
        dense[starts[j] : starts[j] + len(weights[j]), j - lo] = weights[j]
    np.testing.assert_allclose(table.matrix(), dense, atol=1e-7)
    np.testing.assert_allclose(dense.sum(axis=0), 1.0, atol=1e-9)
    x = np.random.default_rng(1).random((5, n_in)).astype(np.float32)
    np.testing.assert_allclose(table.apply_last(x), x @ dense, atol=1e-5)
    np.testing.assert_allclose(table.apply_first(x.T.copy()), (x @ dense).T, atol=1e-5)


@pytest.mark.parametrize("mode", ["crop", "squash", "letterbox"])
@pytest.mark.parametrize("size,order", [((640, 480), "rgb"), ((300, 620), "bgr"), ((401, 257), "gray")])
def test_frame_input_module_equals_the_python_path(mode, size, order):
    prep = Preprocessing(mode=mode, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    channels = 1 if order == "gray" else 3
    frames = np.stack([_frame(*size, channels, seed=s) for s in range(2)])
    with torch.no_grad():
        got = FrameInput(prep, *size, order)(torch.from_numpy(frames)).numpy()
    rgb = {"rgb": frames, "bgr": frames[..., ::-1], "gray": np.repeat(frames, 3, axis=3)}[order]
    want = np.stack([prep.pixels_array(np.ascontiguousarray(f)) for f in rgb])
    assert got.shape == (2, 3, prep.crop, prep.crop)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_frames_graph_runs_in_onnxruntime_with_tensorrt_ops_only():
    prep = Preprocessing(mode="letterbox", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    module = FrameInput(prep, 320, 200, "bgr").eval()
    frames = np.stack([_frame(320, 200, 3, seed=s) for s in range(3)])
    program = torch.onnx.export(
        module, (torch.from_numpy(frames[:2]),), dynamo=True, opset_version=18, input_names=["frames"],
        output_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
    )
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    assert set(n.op_type for n in model.graph.node) <= TENSORRT_OPS
    # TensorRT takes uint8 only into a cast to float: the first consumer of the input is a Cast.
    consumers = [n for n in model.graph.node if "frames" in n.input]
    assert [n.op_type for n in consumers] == ["Cast"]
    inference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = inference.run(None, {"frames": frames})[0]
    want = np.stack([prep.pixels_array(np.ascontiguousarray(f[..., ::-1])) for f in frames])
    np.testing.assert_allclose(got, want, atol=1e-6)
