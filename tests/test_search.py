"""The two-stage prototype search (model/search.py) against the flat search: the same patch scores
wherever the best prototype is among the candidates, lower ones (never higher) elsewhere; its
graph (FP32 and FP16) on the TensorRT allow-list; ONNX Runtime against torch."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from protoad_export.contract import InputContract
from protoad_export.data.images import Preprocessing
from protoad_export.export import onnx as onnx_export
from protoad_export.model.backbones import load_backbone
from protoad_export.model.features import PatchFeatures
from protoad_export.model.network import ProtoADNetwork, patch_grid
from protoad_export.model.search import (TwoStage, TwoStageSearch, children_table, parents_from_levels, split_clusters,
                                         unit_rows)
from protoad_export.options import DEFAULT_TOLERANCES

C = 24


def _clustered(k: int = 600, clusters: int = 30, seed: int = 0):
    """Unit fine prototypes around ``clusters`` centres (unequal sizes), their parents, unit coarse means."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((clusters, C)))
    parent = np.minimum(rng.geometric(0.08, k) - 1, clusters - 1)  # a few large clusters, many small
    parent[:clusters] = np.arange(clusters)  # none empty
    fine = unit_rows(centres[parent] + 0.35 * rng.standard_normal((k, C)))
    coarse = unit_rows(np.stack([fine[parent == c].mean(axis=0) for c in range(clusters)]))
    return fine, parent, coarse


def _patches(fine: np.ndarray, b: int = 2, h: int = 6, w: int = 7, seed: int = 1) -> torch.Tensor:
    """Unit patch features [b, C, h, w] near random fine prototypes (like normal patches) and a few far."""
    rng = np.random.default_rng(seed)
    n = b * h * w
    x = fine[rng.integers(0, len(fine), n)] + 0.3 * rng.standard_normal((n, C))
    x[::9] = rng.standard_normal((len(x[::9]), C))
    return torch.from_numpy(unit_rows(x).reshape(b, h, w, C).transpose(0, 3, 1, 2).copy())


def _flat(x: torch.Tensor, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flat search in float64: max over all prototypes of cos - 1, and the best prototype, per patch."""
    cos = np.einsum("bchw,kc->bhwk", x.double().numpy(), fine.astype(np.float64))
    return cos.max(axis=-1) - 1.0, cos.argmax(axis=-1)


def test_parents_from_levels_and_children_table():
    fine_labels = np.array([0, 0, 1, 2, 2, 3, 4])
    coarse_labels = np.array([1, 1, 0, 1, 1, 0, 1])
    parent = parents_from_levels(fine_labels, coarse_labels)
    assert parent.tolist() == [1, 0, 1, 0, 1]
    table = children_table(parent, 2)
    # Cluster 0 has children 1, 3, padded with its first child (a duplicate never wins a max).
    assert table.tolist() == [[1, 3, 1], [0, 2, 4]]
    with pytest.raises(ValueError, match="does not nest"):
        parents_from_levels(np.array([0, 0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="no fine prototype"):
        children_table(np.array([0, 0, 2]), 3)


def test_split_clusters_caps_children_and_keeps_every_prototype():
    fine, parent, _ = _clustered()
    assert np.bincount(parent).max() > 40
    new_parent, coarse = split_clusters(fine, parent, 16)
    counts = np.bincount(new_parent, minlength=len(coarse))
    assert counts.max() <= 16 and counts.min() >= 1 and counts.sum() == len(fine)
    np.testing.assert_allclose(np.linalg.norm(coarse, axis=1), 1.0, atol=1e-6)
    # Parts never mix two original clusters.
    for g in range(len(coarse)):
        assert len(set(parent[new_parent == g].tolist())) == 1


def test_exact_where_the_best_prototype_is_a_candidate():
    """Equal to the flat search (within float32 summation) on every patch whose best prototype lies
    in one of its ``top`` probed clusters; below it on the others (the misses), fewer with more probes."""
    fine, parent, coarse = _clustered()
    x = _patches(fine)
    want, best = _flat(x, fine)
    coarse_cos = np.einsum("bchw,kc->bhwk", x.double().numpy(), coarse)
    misses = []
    for top in (1, 3, 8, 30):
        # Small chunks: the stage-1 TopK merge across chunks and the stage-2 steps are exercised.
        search = TwoStageSearch(fine, parent, coarse, top=top, coarse_chunk=max(top, 7), gather_rows=40).eval()
        assert search.coarse_chunks > 1 or top == 30
        with torch.no_grad():
            got = search(x)[:, 0].double().numpy()
            ext = torch.nn.functional.pad(x.flatten(2).transpose(1, 2), (0, 1), value=1.0)
            cand = search.candidates(ext).numpy().reshape(*got.shape, top)
        hit = (parent[best][..., None] == cand).any(axis=-1)
        np.testing.assert_allclose(got[hit], want[hit], atol=2e-6, rtol=0)
        assert np.all(got[~hit] < want[~hit] + 2e-6)
        misses.append(int((~hit).sum()))
        # The candidates are the top coarse cosines.
        ranked = np.argsort(-coarse_cos, axis=-1)[..., :top]
        assert np.array_equal(np.sort(ranked, axis=-1), np.sort(cand, axis=-1))
    assert misses[0] > 0 and misses == sorted(misses, reverse=True) and misses[-1] == 0, misses


def test_all_clusters_probed_is_the_flat_search():
    fine, parent, coarse = _clustered(seed=3)
    search = TwoStageSearch(fine, parent, coarse, top=len(coarse)).eval()
    x = _patches(fine, seed=4)
    with torch.no_grad():
        got = search(x)[:, 0].double().numpy()
    np.testing.assert_allclose(got, _flat(x, fine)[0], atol=2e-6, rtol=0)


def test_bad_arguments():
    fine, parent, coarse = _clustered()
    with pytest.raises(ValueError, match="top must lie"):
        TwoStageSearch(fine, parent, coarse, top=0)
    with pytest.raises(ValueError, match="one entry per fine prototype"):
        TwoStageSearch(fine, parent[:-1], coarse)
    with pytest.raises(ValueError, match="parent indices"):
        TwoStageSearch(fine, parent, coarse[:5], top=2)


# ------------------------------------------------------------------ the whole network, exported

CROP = 64


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """efficientnet_lite0 at crop 64; fine prototypes from one image's features + random; a flat
    and a two-stage network per precision, exported."""
    torch.manual_seed(0)
    backbone = load_backbone("efficientnet_lite0")
    prep = backbone.spec.preprocessing(Preprocessing(resize=72, crop=CROP, mode="crop"))
    pf = PatchFeatures(backbone.module, "bilinear", patch_grid(CROP)).eval()
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (3, 3, CROP, CROP)).astype(np.float32)
    with torch.no_grad():
        mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
        feats = pf((torch.from_numpy(images[:1]) - mean) / std)[0].flatten(1).T.numpy()
    real = feats[rng.choice(len(feats), 200, replace=False)]
    fine = unit_rows(np.concatenate([real, rng.standard_normal((100, feats.shape[1]))]))
    # Parents: 24 clusters by nearest of 24 sampled prototypes (a stand-in for a FINCH level).
    seeds = fine[rng.choice(len(fine), 24, replace=False)]
    parent = np.argmax(fine @ seeds.T, axis=1)
    used = np.unique(parent)
    parent = np.searchsorted(used, parent)
    coarse = unit_rows(np.stack([fine[parent == c].mean(axis=0) for c in range(len(used))]))
    out = tmp_path_factory.mktemp("search_onnx")
    nets, files = {}, {}
    for precision in ("fp32", "fp16"):
        for kind, two in (("flat", None), ("two", TwoStage(parent, coarse, top=4)), ("all", TwoStage(parent, coarse, top=len(used)))):
            net = ProtoADNetwork(copy.deepcopy(pf), fine, prep, precision, two_stage=two).eval()
            nets[kind, precision] = net
            if kind != "all":
                files[kind, precision] = onnx_export.export_onnx(net, out / f"{kind}.{precision}.onnx", InputContract("tensor", CROP))
    return {"nets": nets, "files": files, "images": images}


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_two_stage_graph_is_what_tensorrt_accepts(networks, precision):
    model = onnx.load(str(networks["files"]["two", precision]))
    onnx.checker.check_model(model, full_check=True)
    report = onnx_export.inspect_graph(model)
    assert report.problems == []
    assert set(report.ops) <= onnx_export.TENSORRT_OPS, set(report.ops) - onnx_export.TENSORRT_OPS
    assert {"TopK", "Gather", "MatMul", "ReduceMax"} <= set(report.ops) and "Conv" in report.ops
    # Only the batch is dynamic: every TopK's K is a constant.
    graph = onnx.shape_inference.infer_shapes(model).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    assert all(n.input[1] in constants for n in graph.node if n.op_type == "TopK")
    # FP16 products: the search's MatMuls take FP16 inputs in the FP16 graph.
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}
    types.update({t.name: t.data_type for t in graph.initializer})
    want = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types.get(i) == want for n in matmuls for i in n.input)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_equals_torch(networks, precision):
    x = networks["images"]
    with torch.no_grad():
        ref = [t.float().numpy() for t in networks["nets"]["two", precision](torch.from_numpy(x))]
    got = _ort(networks["files"]["two", precision]).run(["anomaly_map", "score"], {"image": x})
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, atol=1e-5 if precision == "fp32" else 2e-3, rtol=0)


def test_all_clusters_probed_gives_the_flat_networks_maps(networks):
    x = torch.from_numpy(networks["images"])
    with torch.no_grad():
        flat = networks["nets"]["flat", "fp32"](x)
        two = networks["nets"]["all", "fp32"](x)
    for a, b in zip(two, flat):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-6, rtol=0)


def test_fp16_two_stage_within_the_fp16_tolerance(networks):
    x = torch.from_numpy(networks["images"])
    with torch.no_grad():
        ref = networks["nets"]["two", "fp32"](x)
        got = networks["nets"]["two", "fp16"](x)
    atol, rtol = DEFAULT_TOLERANCES["fp16"]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.float().numpy(), b.numpy(), atol=atol, rtol=rtol)
