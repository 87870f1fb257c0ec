"""The network against an independent numpy/scipy ProtoAD, ONNX Runtime against torch, and the
FP16 graph against what TensorRT accepts. A tiny network (efficientnet_lite0, crop 64, a few
hundred prototypes) keeps the two ONNX exports to a few seconds each."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from scipy import ndimage

from protoad_export.contract import InputContract
from protoad_export.export import onnx as onnx_export
from protoad_export.model.backbones import load_backbone
from protoad_export.model.features import PatchFeatures
from protoad_export.data.images import Preprocessing
from protoad_export.model.network import BLUR_SIGMA, GaussianBlur, ProtoADNetwork, gaussian_taps, patch_grid, symmetric_pad_index

CROP = 64
N_PROTOTYPES = 300


# ------------------------------------------------------------------------------------------ blur


@pytest.mark.parametrize("length", [1, 2, 5, 16, 17, 33, 40, 224])
@pytest.mark.parametrize("radius", [0, 1, 3, 16, 50])
def test_symmetric_pad_index_matches_numpy(length, radius):
    x = np.arange(length) * 10 + 7
    assert np.array_equal(x[symmetric_pad_index(length, radius)], np.pad(x, radius, mode="symmetric"))


def test_gaussian_taps_match_scipy_kernel():
    taps = gaussian_taps(BLUR_SIGMA)
    assert len(taps) == 2 * int(4.0 * BLUR_SIGMA + 0.5) + 1 == 33
    impulse = np.zeros(65)
    impulse[32] = 1.0
    ref = ndimage.gaussian_filter1d(impulse, BLUR_SIGMA, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(taps, ref[16:49], atol=1e-12)


@pytest.mark.parametrize("shape", [(224, 224), (64, 64), (56, 80), (100, 37), (20, 13), (5, 5), (1, 7), (32, 1)])
def test_blur_equals_scipy_gaussian_filter(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((2, 1, *shape)).astype(np.float32)
    x[1] = np.abs(x[1]) * 3 + np.linspace(0, 5, shape[1], dtype=np.float32)  # a ramp: edges matter
    blur = GaussianBlur(*shape)
    with torch.no_grad():
        got = blur(torch.from_numpy(x)).numpy()
    assert got.shape == x.shape
    for b in range(2):
        ref = ndimage.gaussian_filter(x[b, 0].astype(np.float64), BLUR_SIGMA, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(got[b, 0], ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- tiny real network


@pytest.fixture(scope="module")
def tiny():
    """efficientnet_lite0 (real weights), crop 64, prototypes: unit features of one image + random units."""
    torch.manual_seed(0)
    backbone = load_backbone("efficientnet_lite0")
    prep = backbone.spec.preprocessing(Preprocessing(resize=72, crop=CROP, mode="crop"))
    pf = PatchFeatures(backbone.module, "bilinear", patch_grid(CROP)).eval()
    images = _images(5)
    with torch.no_grad():
        mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        std = torch.tensor(prep.std).view(1, 3, 1, 1)
        feats = pf((torch.from_numpy(images[:1]) - mean) / std)[0].flatten(1).T.numpy()
    rng = np.random.default_rng(0)
    # Real features of image 0 (so image 0 scores near 0) plus random directions.
    real = feats[rng.choice(len(feats), N_PROTOTYPES // 2, replace=False)]
    rand = rng.standard_normal((N_PROTOTYPES - len(real), feats.shape[1]))
    protos = np.concatenate([real, rand]).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    protos[::7] *= 0.8  # raw FINCH means are shorter than 1: the formula must not assume unit prototypes
    return {"prep": prep, "pf": pf, "protos": protos, "images": images}


def _images(n: int) -> np.ndarray:
    """Smooth, textured RGB images in [0, 1] (a bright blob on images 1.. as an 'anomaly')."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:CROP, 0:CROP] / CROP
    out = []
    for i in range(n):
        base = 0.5 + 0.2 * np.sin(2 * np.pi * (3 * xx + 2 * yy + i * 0.1))
        noise = ndimage.gaussian_filter(rng.standard_normal((CROP, CROP)), 1.5) * 0.2
        img = np.stack([base + noise, base * 0.9 + noise, base * 0.8 + noise])
        if i:
            img += 0.6 * np.exp(-(((xx - 0.3 * i % 1) ** 2 + (yy - 0.6) ** 2) / 0.005))
        out.append(np.clip(img, 0, 1))
    return np.stack(out).astype(np.float32)


def _bilinear_half_pixel(x: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) / torch align_corners=False for upsampling: half-pixel centres, edge clamp."""

    def axis(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, wr = axis(x.shape[0])
    c0, c1, wc = axis(x.shape[1])
    rows = x[r0] * (1 - wr)[:, None] + x[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc)[None] + rows[:, c1] * wc[None]


def _reference(tiny, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ProtoAD in float64 numpy/scipy from PatchFeatures' output."""
    prep = tiny["prep"]
    mean = np.array(prep.mean).reshape(1, 3, 1, 1)
    std = np.array(prep.std).reshape(1, 3, 1, 1)
    x = torch.from_numpy(((images - mean) / std).astype(np.float32))
    with torch.no_grad():
        feats = tiny["pf"](x).double().numpy()  # [B, C, h, w]
    unit = feats / np.sqrt(np.sum(feats**2, axis=1, keepdims=True))
    cos = np.einsum("bchw,kc->bkhw", unit, tiny["protos"].astype(np.float64))
    patch = 1.0 - cos.max(axis=1)
    maps = np.stack([
        ndimage.gaussian_filter(_bilinear_half_pixel(p, CROP), 4.0, mode="reflect", truncate=4.0) for p in patch
    ])
    return maps, maps.reshape(len(maps), -1).max(axis=1)


def test_network_equals_numpy_protoad(tiny):
    net = ProtoADNetwork(tiny["pf"], tiny["protos"], tiny["prep"], "fp32").eval()
    with torch.no_grad():
        maps, scores = net(torch.from_numpy(tiny["images"]))
    ref_maps, ref_scores = _reference(tiny, tiny["images"])
    assert maps.shape == (5, 1, CROP, CROP) and scores.shape == (5,)
    assert maps.dtype == scores.dtype == torch.float32
    np.testing.assert_allclose(maps[:, 0].numpy(), ref_maps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-4, rtol=0)
    assert ref_maps.std() > 1e-2  # the comparison is not between two constant maps
    assert scores[0] < scores[1:].min()  # image 0's own features are prototypes


# ------------------------------------------------------------------------------------------ ONNX


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    nets, files = {}, {}
    for precision in ("fp32", "fp16"):
        pf = copy.deepcopy(tiny["pf"]) if precision == "fp16" else tiny["pf"]
        nets[precision] = ProtoADNetwork(pf, tiny["protos"], tiny["prep"], precision).eval()
        files[precision] = onnx_export.export_onnx(nets[precision], out / f"model.{precision}.onnx", InputContract("tensor", nets[precision].size))
    return nets, files


def _ort(path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_fp32_equals_torch(tiny, exported, batch):
    nets, files = exported
    x = tiny["images"][:batch]
    with torch.no_grad():
        ref_maps, ref_scores = nets["fp32"](torch.from_numpy(x))
    maps, scores = _ort(files["fp32"]).run(["anomaly_map", "score"], {"image": x})
    assert maps.shape == (batch, 1, CROP, CROP) and scores.shape == (batch,)
    np.testing.assert_allclose(maps, ref_maps.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-4, rtol=0)


def test_onnxruntime_fp16_close_to_fp32(tiny, exported):
    """A sanity bound only: ORT CPU casts FP16 ops to float (see benchmarks/results/build_options.md)."""
    nets, files = exported
    x = tiny["images"]
    with torch.no_grad():
        ref_maps, _ = nets["fp32"](torch.from_numpy(x))
    maps, scores = _ort(files["fp16"]).run(["anomaly_map", "score"], {"image": x})
    assert maps.dtype == scores.dtype == np.float32
    assert np.abs(maps - ref_maps.numpy()).max() < 2e-2


def test_torch_fp16_maps_match_fp32_within_the_bench_tolerances(tiny, exported):
    """The FP16 network (channel max in FP16) against FP32, with the bench's FP16 tolerances."""
    from protoad_export.evaluation.bench import DEFAULT_TOLERANCES

    nets, _ = exported
    x = torch.from_numpy(tiny["images"])
    with torch.no_grad():
        ref_maps, ref_scores = nets["fp32"](x)
        maps, scores = nets["fp16"](x)  # FP16 on the CPU: slow but exact in dtype
    atol, rtol = DEFAULT_TOLERANCES["fp16"]
    np.testing.assert_allclose(maps.numpy(), ref_maps.numpy(), atol=atol, rtol=rtol)
    np.testing.assert_allclose(scores.numpy(), ref_scores.numpy(), atol=atol, rtol=rtol)


def _graph_facts(model: onnx.ModelProto):
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {t.name: t for t in g.initializer}
    types.update({name: t.data_type for name, t in inits.items()})
    consts = set(inits)
    for n in g.node:
        if n.op_type == "Constant":
            consts.update(n.output)
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                inits[n.output[0]] = value
                types[n.output[0]] = value.data_type
    return g, types, inits, consts


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_is_what_tensorrt_accepts(exported, precision):
    _, files = exported
    model = onnx.load(str(files[precision]))
    onnx.checker.check_model(model, full_check=True)
    report = onnx_export.inspect_graph(model)
    assert report.problems == []
    assert 17 <= report.opset <= 20
    assert set(report.ops) <= onnx_export.TENSORRT_OPS, set(report.ops) - onnx_export.TENSORRT_OPS

    g, types, inits, consts = _graph_facts(model)
    ops = {n.op_type for n in g.node}
    assert "Col2Im" not in ops
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Resize":
            assert attrs.get("antialias", 0) == 0
        if node.op_type.startswith("Reduce"):
            # opset >= 18: axes are an input, which TensorRT needs as an initializer or Constant
            assert "axes" not in attrs
            assert len(node.input) > 1 and node.input[1] in consts, f"{node.name}: axes must be a constant input"
    assert [o.name for o in g.output] == list(onnx_export.OUTPUT_NAMES)
    assert all(types[o.name] == onnx.TensorProto.FLOAT for o in g.output)
    assert types[g.input[0].name] == onnx.TensorProto.FLOAT

    # The prototype conv: the Conv whose weight is [K, C, 1, 1] with K = the prototype count.
    proto_convs = [
        n for n in g.node
        if n.op_type == "Conv" and n.input[1] in inits and tuple(inits[n.input[1]].dims[:1]) == (N_PROTOTYPES,)
        and tuple(inits[n.input[1]].dims[2:]) == (1, 1)
    ]
    assert len(proto_convs) == 1
    conv = proto_convs[0]
    want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    assert [types[i] for i in conv.input if i] == [want] * len([i for i in conv.input if i])
    assert len(conv.input) == 3  # the bias (-1) is part of the conv, added in the accumulator
    bias = onnx.numpy_helper.to_array(inits[conv.input[2]])
    assert np.all(bias == -1)

    # The L2 norm's sum of squares runs on float32 in both graphs; there is exactly one ReduceSum.
    sums = [n for n in g.node if n.op_type == "ReduceSum"]
    assert len(sums) == 1 and types[sums[0].input[0]] == onnx.TensorProto.FLOAT
    if precision == "fp16":
        casts = [onnx.helper.get_attribute_value(a) for n in g.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
        assert onnx.TensorProto.FLOAT16 in casts and onnx.TensorProto.FLOAT in casts
        # the backbone's convolutions run in FP16: only the two blur convs (one channel) stay FP32
        conv_types = [types[n.input[0]] for n in g.node if n.op_type == "Conv"]
        assert conv_types.count(onnx.TensorProto.FLOAT) == 2
        # the prototypes' channel max is a plain FP16 ReduceMax on the conv's output, no casts around it
        assert report.cast_wrapped_reductions == []
        (proto_max,) = [n for n in g.node if n.op_type == "ReduceMax" and n.input[0] == conv.output[0]]
        assert types[proto_max.input[0]] == types[proto_max.output[0]] == onnx.TensorProto.FLOAT16


def test_inspect_graph_flags_a_reduction_between_casts(tmp_path):
    """torch.amax of FP16 exports as Cast(FLOAT) -> ReduceMax -> Cast(FLOAT16); torch.max does not."""

    class Reduce(torch.nn.Module):
        def __init__(self, use_amax: bool) -> None:
            super().__init__()
            self.use_amax = use_amax

        def forward(self, x):
            h = x.half() * 2
            m = torch.amax(h, dim=1, keepdim=True) if self.use_amax else torch.max(h, dim=1, keepdim=True).values
            return (m * 2).float()

    reports = {}
    for use_amax in (True, False):
        with onnx_export._quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(Reduce(use_amax), (torch.rand(2, 4, 3, 3),), dynamo=True, opset_version=18)
        reports[use_amax] = onnx_export.inspect_graph(program.model_proto)
    assert len(reports[True].cast_wrapped_reductions) == 1
    assert any("runs in FP32 between casts" in p for p in reports[True].problems)
    assert reports[False].cast_wrapped_reductions == [] and reports[False].problems == []


# ------------------------------------------------------------------------- chunked prototype conv


@pytest.mark.parametrize("chunk", [1, 7, 128, N_PROTOTYPES - 1, N_PROTOTYPES, 4096])
def test_chunked_prototype_conv_equals_one_conv(tiny, chunk):
    """Chunks of the prototype conv, each with its own channel max, combined by Max: same maps."""
    x = torch.from_numpy(tiny["images"])
    whole = ProtoADNetwork(tiny["pf"], tiny["protos"], tiny["prep"], "fp32", chunk=N_PROTOTYPES).eval()
    parts = ProtoADNetwork(tiny["pf"], tiny["protos"], tiny["prep"], "fp32", chunk=chunk).eval()
    assert parts.chunks == -(-N_PROTOTYPES // chunk) and parts.n_prototypes == N_PROTOTYPES
    with torch.no_grad():
        (m1, s1), (m2, s2) = whole(x), parts(x)
    np.testing.assert_allclose(m2.numpy(), m1.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(s2.numpy(), s1.numpy(), atol=1e-6, rtol=0)


def test_chunk_must_be_positive(tiny):
    with pytest.raises(ValueError, match="chunk"):
        ProtoADNetwork(tiny["pf"], tiny["protos"], tiny["prep"], "fp32", chunk=0)


@pytest.fixture(scope="module")
def exported_chunked(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_chunked")
    files = {}
    for precision in ("fp32", "fp16"):
        pf = copy.deepcopy(tiny["pf"]) if precision == "fp16" else tiny["pf"]
        net = ProtoADNetwork(pf, tiny["protos"], tiny["prep"], precision, chunk=128).eval()
        files[precision] = onnx_export.export_onnx(net, out / f"model.{precision}.onnx", InputContract("tensor", net.size))
    return files


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_chunked_graph_is_what_tensorrt_accepts(tiny, exported, exported_chunked, precision):
    """300 prototypes in chunks of 128: three convs with constant [k, C, 1, 1] weights and bias -1
    in the precision's dtype, their maxima combined by Max in that dtype; ONNX Runtime gives the
    one-conv graph's outputs."""
    model = onnx.load(str(exported_chunked[precision]))
    report = onnx_export.inspect_graph(model)
    assert report.problems == [] and set(report.ops) <= onnx_export.TENSORRT_OPS
    g, types, inits, _ = _graph_facts(model)
    want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    proto_convs = [n for n in g.node if n.op_type == "Conv" and n.input[1] in inits
                   and tuple(inits[n.input[1]].dims[1:]) == (tiny["protos"].shape[1], 1, 1)]
    assert sorted(inits[n.input[1]].dims[0] for n in proto_convs) == [44, 128, 128]
    for conv in proto_convs:
        assert [types[i] for i in conv.input] == [want] * 3
        assert np.all(onnx.numpy_helper.to_array(inits[conv.input[2]]) == -1)
    maxes = [n for n in g.node if n.op_type == "Max"]
    assert len(maxes) == 2 and all(types[i] == want for n in maxes for i in n.input)
    x = tiny["images"]
    one = _ort(exported[1][precision]).run(["anomaly_map", "score"], {"image": x})
    chunked = _ort(exported_chunked[precision]).run(["anomaly_map", "score"], {"image": x})
    for a, b in zip(chunked, one):
        np.testing.assert_allclose(a, b, atol=1e-6 if precision == "fp32" else 1e-3, rtol=0)
