"""A non-square model input (``--width``): elongated parts keep their aspect ratio.

Two bundles on synthetic 256 x 112 parts, both with a 128 x 64 (W x H) input: squash with the float
tensor input (built through the CLI) and letterbox with the uint8 frames input.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from protoad_export.build import BuildConfig, build
from protoad_export.bundle import check_manifest, read_manifest
from protoad_export.cli import main
from protoad_export.contract import InputContract, output_shapes
from protoad_export.data.images import Preprocessing, load_image
from protoad_export.data.synthetic import DatasetSpec, make_dataset
from protoad_export.errors import ArtifactError, InputError
from protoad_export.export.onnx import read_metadata
from protoad_export.model.frames import FrameInput
from protoad_export.runtime import load

SPEC = DatasetSpec(train=10, test_good=3, test_per_defect=2, width=256, height=112)
CROP, WIDTH = 64, 128
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("parts") / "parts", seed=5, spec=SPEC)


@pytest.fixture(scope="module")
def squash_bundle(parts, tmp_path_factory):
    """Built by ``protoad-export build --resize-mode squash --crop 64 --width 128 --input tensor``."""
    out = tmp_path_factory.mktemp("engines")
    result = CliRunner().invoke(main, ["build", str(parts), "--name", "wide", "--out", str(out),
                                       "--backbone", "efficientnet_lite0", "--resize-mode", "squash",
                                       "--crop", str(CROP), "--width", str(WIDTH), "--input", "tensor",
                                       "--max-prototypes", "200", "--batch-size", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "input: float32 [B, 3, 64, 128] RGB in [0, 1]" in result.output
    return out / "wide"


@pytest.fixture(scope="module")
def letterbox_result(parts, tmp_path_factory):
    config = BuildConfig(backbone="efficientnet_lite0", batch_size=4, max_prototypes=200,
                         preprocessing=Preprocessing(crop=CROP, mode="letterbox", width=WIDTH))
    return build(parts, "lbox", tmp_path_factory.mktemp("engines"), config, log=None, progress=False)


def _test_paths(parts):
    return sorted((parts / "test").rglob("*.png"))


# Geometry (no build)


def test_the_input_size_is_width_by_crop():
    assert Preprocessing(crop=CROP, mode="squash", width=WIDTH).input_size == (WIDTH, CROP)
    assert Preprocessing(crop=CROP, mode="squash").input_size == (CROP, CROP)
    assert Preprocessing(crop=CROP).input_size == (CROP, CROP)


@pytest.mark.parametrize("size,resized,paste", [((256, 112), (128, 56), (0, 4)),  # wider than the input
                                                ((100, 200), (32, 64), (48, 0)),  # portrait
                                                ((240, 120), (128, 64), (0, 0))])  # the input's own aspect
def test_letterbox_fits_inside_the_non_square_input(size, resized, paste):
    prep = Preprocessing(crop=CROP, mode="letterbox", width=WIDTH, **PLAIN)
    assert prep.geometry(*size) == (resized, (0, 0, *resized), paste)
    entry = prep.geometry_entry(*size)
    assert entry["model_input"] == [WIDTH, CROP] and entry["paste"] == list(paste)
    valid = prep.valid_mask(*size)
    assert valid.shape == (CROP, WIDTH) and valid.sum() == resized[0] * resized[1]
    assert prep.image_array(Image.new("RGB", size, (255, 255, 255))).shape == (3, CROP, WIDTH)
    mask = prep.mask_array(Image.new("L", size, 255))
    assert mask.shape == (CROP, WIDTH) and np.array_equal(mask, valid)


def test_squash_maps_go_back_to_the_image_pixels():
    prep = Preprocessing(crop=CROP, mode="squash", width=WIDTH, **PLAIN)
    model_map = np.zeros((CROP, WIDTH), np.float32)
    model_map[:, WIDTH // 2 :] = 1.0  # the right half of the part
    full, inspected = prep.map_to_image(model_map, 300, 100)
    assert full.shape == inspected.shape == (100, 300) and inspected.all()
    assert full[:, :140].max() == 0.0 and full[:, 160:].min() == 1.0


@pytest.mark.parametrize("mode", ["squash", "letterbox"])
@pytest.mark.parametrize("size,order", [((256, 112), "rgb"), ((90, 210), "bgr"), ((300, 301), "gray")])
def test_frame_input_equals_the_python_path_non_square(mode, size, order):
    """The graph's uint8 frame input makes the same W x H tensor as ``pixels_array``."""
    prep = Preprocessing(crop=CROP, mode=mode, width=WIDTH, **PLAIN)
    rng = np.random.default_rng(2)
    rgb = (rng.random((2, size[1], size[0], 3)) * 255).astype(np.uint8)
    if order == "gray":
        rgb = np.repeat(rgb[..., :1], 3, axis=3)
    frames = {"rgb": rgb, "bgr": rgb[..., ::-1], "gray": rgb[..., :1]}[order]
    with torch.no_grad():
        out = FrameInput(prep, *size, order)(torch.from_numpy(np.ascontiguousarray(frames))).numpy()
    ref = np.stack([prep.pixels_array(p) for p in rgb])
    assert out.shape == ref.shape == (2, 3, CROP, WIDTH)
    np.testing.assert_allclose(out, ref, atol=2e-6)


# Old manifests and bad input


def test_a_manifest_without_width_is_square():
    """Every bundle built before ``width`` existed: no key, a square input."""
    prep = Preprocessing(crop=224, mode="squash", **PLAIN)
    entry = prep.to_dict()
    assert "width" not in entry  # square bundles' manifests are written as before
    assert Preprocessing.from_dict(entry) == prep and prep.input_size == (224, 224)
    old = {"preprocessing": entry, "input": {"kind": "tensor", "shape": ["batch", 3, 224, 224]}}
    contract = InputContract.from_manifest(old)
    assert contract == InputContract("tensor", 224) and contract.model_input == (224, 224)
    assert contract.shape(2) == (2, 3, 224, 224) and output_shapes(contract, 2)["anomaly_map"] == (2, 1, 224, 224)
    legacy = {"preprocessing": entry}  # before frames were an input
    assert InputContract.from_manifest(legacy).shape(1) == (1, 3, 224, 224)


@pytest.mark.parametrize("kwargs,message", [
    (dict(crop=CROP, width=WIDTH), "width 128 needs resize mode squash or letterbox: crop mode's input is the square crop x crop"),
    (dict(crop=CROP, mode="squash", width=100), "width must be a multiple of 16 (the stage-3 stride), got 100"),
    (dict(crop=CROP, mode="letterbox", width=8192), "width must be an integer in 32..4096, got 8192"),
    (dict(crop=CROP, mode="squash", width=True), "width must be an integer in 32..4096, got True"),
])
def test_bad_widths_are_refused(kwargs, message):
    with pytest.raises(InputError) as info:
        Preprocessing(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("args,message", [
    (["--width", "128", "--resize-mode", "crop"],
     "error: width 128 needs resize mode squash or letterbox: crop mode's input is the square crop x crop"),
    (["--width", "100", "--resize-mode", "squash"], "error: width must be a multiple of 16 (the stage-3 stride), got 100"),
])
def test_cli_refuses_bad_widths_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["build", str(tmp_path), "--name", "x", "--out", str(tmp_path / "engines"),
                                       "--crop", "64", "--resize", "80", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [message]
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


# The bundles


def test_non_square_bundles_record_their_geometry(squash_bundle, letterbox_result):
    for bundle_dir, kind in ((squash_bundle, "tensor"), (letterbox_result.bundle_dir, "frames")):
        manifest = read_manifest(bundle_dir)
        assert manifest["preprocessing"]["width"] == WIDTH and manifest["preprocessing"]["crop"] == CROP
        assert manifest["train"]["grid"] == [CROP // 4, WIDTH // 4]
        assert manifest["outputs"]["anomaly_map"] == ["batch", 1, CROP, WIDTH]
        assert Preprocessing.from_manifest(manifest).input_size == (WIDTH, CROP)
        for precision in ("fp32", "fp16"):
            model = onnx.load(str(bundle_dir / f"model.{precision}.onnx"))
            dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                    for v in [*model.graph.input, *model.graph.output]}
            assert dims["anomaly_map"] == ["batch", 1, CROP, WIDTH] and dims["score"] == ["batch"]
            assert dims["image" if kind == "tensor" else "frames"] == (
                ["batch", 3, CROP, WIDTH] if kind == "tensor" else ["batch", SPEC.height, SPEC.width, 3])
            meta = read_metadata(model)
            assert json.loads(meta["preprocessing"])["width"] == WIDTH
            assert meta["outputs"].startswith(f"anomaly_map float32 [B,1,{CROP},{WIDTH}]")
    geometry = read_manifest(letterbox_result.bundle_dir)["geometry"]
    assert geometry["model_input"] == [WIDTH, CROP] and geometry["paste"] == [0, 4] and geometry["resized"] == [128, 56]


def test_onnx_runtime_equals_pytorch_on_the_tensor_input(squash_bundle, parts):
    from protoad_export.runtime.pytorch import build_torch_network

    manifest = read_manifest(squash_bundle)
    prep = Preprocessing.from_manifest(manifest)
    images = np.stack([prep.image_array(load_image(p)) for p in _test_paths(parts)])
    maps, scores = load(squash_bundle, "onnxruntime").predict(images)
    with torch.no_grad():
        ref_maps, ref_scores = build_torch_network(squash_bundle, manifest)(torch.from_numpy(images))
    assert maps.shape == (len(images), CROP, WIDTH)
    np.testing.assert_allclose(maps, ref_maps[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-4)


@pytest.mark.parametrize("precision,atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_the_frames_graph_equals_the_python_path(letterbox_result, parts, precision, atol):
    """uint8 frames through ONNX Runtime against the PyTorch network fed by the Python preprocessing."""
    paths = _test_paths(parts)
    frames = np.stack([np.asarray(load_image(p)) for p in paths])
    maps, scores = load(letterbox_result.bundle_dir, "onnxruntime", precision=precision).predict(frames)
    prep = Preprocessing.from_manifest(letterbox_result.manifest)
    with torch.no_grad():
        ref_maps, ref_scores = letterbox_result.network.network(
            torch.from_numpy(np.stack([prep.image_array(load_image(p)) for p in paths])))
    assert maps.shape == (len(paths), CROP, WIDTH)
    np.testing.assert_allclose(maps, ref_maps[:, 0].numpy(), atol=atol)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=atol)


def test_verify_passes_on_the_golden_outputs(letterbox_result):
    from protoad_export.evaluation.verify import check_report, verify

    report = verify(letterbox_result.bundle_dir, ["onnxruntime", "onnxruntime-fp16", "torch"], log=None)
    check_report(report)
    assert len(report["results"]) == 3


def test_predict_maps_come_back_in_the_images_pixels(squash_bundle, parts, tmp_path):
    from protoad_export.bundle import add_files_to_manifest
    from protoad_export.predict import predict

    add_files_to_manifest(squash_bundle, [], {"threshold": {"value": 0.01, "method": "manual"}})
    results = predict(squash_bundle, [parts / "test" / "good", parts / "test" / "crack"], tmp_path / "out")
    assert results and all(r.decision != "error" for r in results)
    for r in results:
        assert (r.width, r.height) == (SPEC.width, SPEC.height)
        assert r.inspected_box == [0, 0, SPEC.width, SPEC.height]
        with Image.open(tmp_path / "out" / r.heatmap) as h, Image.open(tmp_path / "out" / r.mask) as m:
            assert h.size == m.size == (SPEC.width, SPEC.height)


def test_eval_pixel_metrics_run_on_both_bundles(squash_bundle, letterbox_result, parts):
    from protoad_export.evaluation.evaluate import evaluate_bundle

    for bundle_dir, baseline in ((squash_bundle, "knn"), (letterbox_result.bundle_dir, None)):
        report = evaluate_bundle(bundle_dir, parts, baseline=baseline)
        assert report["map_resolution"] == [CROP, WIDTH]
        for method in ("protoad", "knn") if baseline else ("protoad",):
            overall = report["methods"][method]["metrics"]["overall"]
            assert 0.0 <= overall["pixel_auroc"] <= 1.0 and 0.0 <= overall["pro"] <= 1.0, method
            assert overall["pixel_images"] == len(_test_paths(parts))


def test_an_edited_width_is_refused(squash_bundle, letterbox_result):
    """The manifest's width against the graph's input shape (tensor) and the patch grid (frames)."""
    manifest = read_manifest(squash_bundle)
    dropped = copy.deepcopy(manifest)
    del dropped["preprocessing"]["width"]
    with pytest.raises(ArtifactError, match=r"preprocessing.crop 64 does not match the network's input 64x128 \(input.shape\)"):
        check_manifest(dropped)
    frames = copy.deepcopy(read_manifest(letterbox_result.bundle_dir))
    frames["preprocessing"]["width"] = 256
    with pytest.raises(ArtifactError, match=r"train.grid \[16, 32\] does not match the input 256x64 \(the network's patch grid is 16x64\)"):
        check_manifest(frames)


def test_serving_configs_take_the_non_square_dims(squash_bundle, tmp_path):
    from protoad_export.export.serving import write_deepstream_config, write_triton_repository

    model = write_triton_repository(squash_bundle, tmp_path / "repo", log=None)
    config = (model / "config.pbtxt").read_text()
    assert f"dims: [ 3, {CROP}, {WIDTH} ]" in config and f"dims: [ 1, {CROP}, {WIDTH} ]" in config
    assert 'preprocessing.width' in config
    nvinfer = write_deepstream_config(squash_bundle, tmp_path / "pgie.txt", use_engine=False, log=None).read_text()
    assert f"infer-dims=3;{CROP};{WIDTH}" in nvinfer and "maintain-aspect-ratio=0" in nvinfer



@pytest.mark.parametrize("kind", ["tensor", "frames"])
def test_the_tensorrt_profile_takes_the_non_square_shape(kind):
    """The optimisation profile comes from the manifest's contract (recording fake TensorRT, tests/fake_tensorrt.py)."""
    from fake_tensorrt import called, make_fake_tensorrt

    from protoad_export.export import tensorrt as engine

    prep = Preprocessing(crop=CROP, mode="letterbox", width=WIDTH, **PLAIN)
    entry = {"kind": "tensor"} if kind == "tensor" else {"kind": "frames", "shape": ["batch", 112, 256, 3],
                                                         "channel_order": "rgb"}
    contract = InputContract.from_manifest({"preprocessing": prep.to_dict(), "input": entry})
    trt = make_fake_tensorrt("10.9.0.34")
    engine._builder_config(trt, trt.Builder(None), contract, batch_profile=(1, 2, 4), workspace_gib=1,
                           optimization_level=3)
    per_image = (3, CROP, WIDTH) if kind == "tensor" else (112, 256, 3)
    assert called(trt, "set_shape") == [(contract.name, *((b, *per_image) for b in (1, 2, 4)))]
    assert output_shapes(contract, 4)["anomaly_map"] == (4, 1, CROP, WIDTH)
