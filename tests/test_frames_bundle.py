"""A ``frames`` bundle end to end on synthetic camera frames: uint8 frames in, map, score and decision
out, the same numbers as the Python path, the geometry in the manifest and in the ONNX file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from protoad_export.build import BuildConfig, build
from protoad_export.bundle import read_manifest
from protoad_export.contract import InputContract
from protoad_export.data.images import Preprocessing, load_image
from protoad_export.data.synthetic import DatasetSpec, make_dataset
from protoad_export.errors import InputError
from protoad_export.export.onnx import read_metadata
from protoad_export.runtime import load, predict_paths

SPEC = DatasetSpec(train=12, test_good=2, test_per_defect=2, width=200, height=150)


@pytest.fixture(scope="module")
def frames_bundle(tmp_path_factory):
    """A BGR frames bundle (letterbox) built on synthetic 200x150 frames."""
    root = tmp_path_factory.mktemp("frames")
    data = make_dataset(root / "parts", seed=3, spec=SPEC)
    config = BuildConfig(backbone="efficientnet_lite0", preprocessing=Preprocessing(resize=128, crop=128, mode="letterbox"),
                         batch_size=4, channel_order="bgr", max_prototypes=500)
    result = build(data, "cam", root / "bundles", config, log=None, progress=False)
    return data, result


def test_the_build_takes_the_frame_size_from_the_images(frames_bundle):
    _data, result = frames_bundle
    manifest = result.manifest
    assert manifest["input"] == {"kind": "frames", "name": "frames", "shape": ["batch", 150, 200, 3], "dtype": "uint8",
                                 "channel_order": "bgr", "range": [0, 255]}
    assert manifest["geometry"]["frame"] == [200, 150] and manifest["geometry"]["paste"] == [0, 16]
    model = onnx.load(str(result.bundle_dir / "model.fp32.onnx"))
    graph_input = model.graph.input[0]
    assert graph_input.name == "frames" and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    meta = read_metadata(model)
    assert json.loads(meta["input"]) == manifest["input"] and json.loads(meta["geometry"]) == manifest["geometry"]
    assert "threshold" not in meta  # calibrate changes the manifest only


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_frames_graph_equals_the_python_path(frames_bundle, precision, atol):
    """ONNX Runtime on uint8 frames against the PyTorch network fed by the Python preprocessing."""
    data, result = frames_bundle
    paths = sorted((data / "test").rglob("*.png"))
    frames = np.stack([np.asarray(load_image(p))[..., ::-1] for p in paths])  # BGR, as the camera gives them
    maps, scores = load(result.bundle_dir, "onnxruntime", precision=precision).predict(frames)
    prep = Preprocessing.from_manifest(result.manifest)
    import torch

    with torch.no_grad():
        python_path = torch.from_numpy(np.stack([prep.image_array(load_image(p)) for p in paths]))
        ref_maps, ref_scores = result.network.network(python_path)
    np.testing.assert_allclose(maps, ref_maps[:, 0].numpy(), atol=atol)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=atol)


def test_files_are_fed_as_frames_and_the_wrong_frame_is_refused(frames_bundle, tmp_path):
    data, result = frames_bundle
    rt = load(result.bundle_dir, "onnxruntime")
    paths = sorted((data / "test" / "good").glob("*.png"))
    pred = predict_paths(rt, paths)
    frames = np.stack([np.asarray(load_image(p))[..., ::-1] for p in paths])
    np.testing.assert_allclose(pred.scores, rt.predict(frames)[1], atol=1e-6)
    Image.open(paths[0]).resize((180, 150)).save(tmp_path / "other.png")
    with pytest.raises(InputError, match=r"180x150 pixels, but this bundle takes uint8 \[B, 150, 200, 3\] BGR frames"):
        predict_paths(rt, [tmp_path / "other.png"])
    with pytest.raises(InputError, match=r"expected uint8 \[B, 150, 200, 3\] BGR frames .* got float32"):
        rt.predict(frames.astype(np.float32))
    with pytest.raises(InputError, match=r"got shape \[2, 150, 200, 1\]"):
        rt.predict(frames[:2, ..., :1])


def test_infer_gives_the_decision_at_the_calibrated_threshold(frames_bundle):
    from protoad_export.evaluation.thresholds import calibrate

    data, result = frames_bundle
    calibrate(result.bundle_dir, target_frr=0.5)
    rt = load(result.bundle_dir, "onnxruntime")
    frames = np.stack([np.asarray(load_image(p))[..., ::-1] for p in sorted((data / "test").rglob("*.png"))])
    out = rt.infer(frames)
    assert out.threshold == read_manifest(result.bundle_dir)["threshold"]["value"]
    np.testing.assert_array_equal(out.decisions, out.scores > out.threshold)
    with pytest.raises(InputError, match="finite positive"):
        rt.infer(frames, threshold=float("nan"))


def test_mixed_image_sizes_ask_for_the_frame_size(tmp_path):
    data = make_dataset(tmp_path / "a", seed=1, spec=DatasetSpec(train=6, test_good=1, test_per_defect=1, width=64, height=48))
    Image.open(data / "train" / "good" / "000.png").resize((70, 48)).save(data / "train" / "good" / "000.png")
    config = BuildConfig(backbone="efficientnet_lite0", preprocessing=Preprocessing(resize=64, crop=64, mode="squash"),
                         input="frames")
    with pytest.raises(InputError, match=r"2 different sizes \(64x48 \(5\), 70x48 \(1\)\): pass the camera frame's size "
                                         r"\(--input-size WxH\) or --input tensor"):
        build(data, "x", tmp_path / "out", config, log=None, progress=False)
    assert not (tmp_path / "out" / "x").exists()


def test_contract_round_trips_through_the_manifest():
    contract = InputContract("frames", 224, 640, 480, "gray")
    manifest = {"preprocessing": {"crop": 224}, "input": contract.to_manifest()}
    assert InputContract.from_manifest(manifest) == contract
    assert contract.shape(4) == (4, 480, 640, 1)
    legacy = {"preprocessing": {"crop": 224}, "input": {"name": "image", "shape": ["batch", 3, 224, 224]}}
    assert InputContract.from_manifest(legacy) == InputContract("tensor", 224)
