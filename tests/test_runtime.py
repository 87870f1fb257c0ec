"""One runtime interface: torch and onnxruntime agree on real images; bad requests fail with one line."""

from __future__ import annotations

import numpy as np
import pytest

from protoad_export.evaluation.bench import DEFAULT_TOLERANCES
from protoad_export.errors import InputError, MissingDependencyError
from protoad_export.data.datasets import category_test_set
from protoad_export.options import PROTOTYPE_CHUNK
from protoad_export.options import SIMILARITY_BUDGET_BYTES
from protoad_export.runtime import fitting_batch, load, predict_paths, preprocess_paths


@pytest.fixture(scope="module")
def real_batch(small_bundle, small_category):
    from protoad_export.bundle import read_manifest

    paths = [s.path for s in category_test_set(small_category)][:6]
    return paths, preprocess_paths(paths, read_manifest(small_bundle))


@pytest.fixture(scope="module")
def torch_fp32(small_bundle):
    return load(small_bundle, "torch")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_agrees_with_torch_fp32(small_bundle, real_batch, torch_fp32, precision):
    _paths, images = real_batch
    ref_maps, ref_scores = torch_fp32.predict(images)
    rt = load(small_bundle, "onnxruntime", precision=precision)
    assert rt.backend == "onnxruntime" and rt.precision == precision and "CPUExecutionProvider" in rt.providers
    maps, scores = rt.predict(images)
    assert maps.shape == ref_maps.shape == (len(images), *images.shape[2:]) and maps.dtype == np.float32
    atol, rtol = DEFAULT_TOLERANCES[precision]
    np.testing.assert_allclose(maps, ref_maps, atol=atol, rtol=rtol)
    np.testing.assert_allclose(scores, ref_scores, atol=atol, rtol=rtol)
    # Scores are the maxima of the maps, whatever the backend.
    np.testing.assert_allclose(scores, maps.max(axis=(1, 2)), rtol=1e-6)


def test_predict_paths_batches_like_predict(small_bundle, real_batch):
    paths, images = real_batch
    rt = load(small_bundle, "onnxruntime")
    pred = predict_paths(rt, paths, batch_size=4)
    maps, scores = rt.predict(images)
    assert pred.paths == list(paths)
    np.testing.assert_allclose(pred.maps, maps, atol=1e-6)
    np.testing.assert_allclose(pred.scores, scores, atol=1e-6)


def test_bad_requests_are_input_errors(small_bundle, torch_fp32):
    with pytest.raises(InputError, match="unknown backend"):
        load(small_bundle, "tflite")
    with pytest.raises(InputError, match="CUDA only"):
        load(small_bundle, "torch", precision="fp16", device="cpu")
    with pytest.raises(InputError, match="CUDA only"):
        load(small_bundle, "torch", precision="fp32", device="cpu", compile=True)
    with pytest.raises(InputError, match="FP16"):
        load(small_bundle, "tensorrt", precision="fp32")
    with pytest.raises(MissingDependencyError, match="NoSuchExecutionProvider"):
        load(small_bundle, "onnxruntime", providers=["NoSuchExecutionProvider"])
    with pytest.raises(InputError, match=r"expected float32 \[B, 3, 224, 224\].*got shape"):
        torch_fp32.predict(np.zeros((2, 3, 32, 32), np.float32))


def test_tampered_file_is_refused(small_bundle, tmp_path):
    import shutil

    from protoad_export.errors import ArtifactError

    copy = shutil.copytree(small_bundle, tmp_path / "e")
    with open(copy / "model.fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        load(copy, "onnxruntime")


def test_batches_are_cut_to_the_similarity_budget():
    # The prototype-similarity tensor (batch x chunk x h x w FP32) is the network's largest
    # intermediate; before the conv was chunked, a 51k-prototype engine at batch 8 needed 5.2 GB of
    # it and was once OOM-killed. Now only one chunk's similarities exist at a time.
    def manifest(k, grid=(56, 56)):
        return {"train": {"grid": list(grid)}, "prototypes": {"count": k, "chunk": PROTOTYPE_CHUNK}}

    assert fitting_batch(manifest(3_000), 8) == 8
    assert fitting_batch(manifest(51_361), 8) == 8  # 8 x 1024 x 56 x 56 x 4 = 103 MB
    assert fitting_batch(manifest(10_000_000), 8) == 8  # the count beyond one chunk does not matter
    per_image = PROTOTYPE_CHUNK * 400 * 400 * 4  # a large grid: 655 MB per image and chunk
    assert fitting_batch(manifest(51_361, (400, 400)), 8) == SIMILARITY_BUDGET_BYTES // per_image < 8
    small = 100 * 400 * 400 * 4  # fewer prototypes than a chunk: their own count counts
    assert fitting_batch(manifest(100, (400, 400)), 64) == min(64, SIMILARITY_BUDGET_BYTES // small)
    assert fitting_batch(manifest(10_000, (4000, 4000)), 8) == 1  # never below one image
    # The manifest's chunk counts; an engine from before chunking (no "chunk") has one conv.
    chunked = {"train": {"grid": [56, 56]}, "prototypes": {"count": 51_361, "chunk": 16_384}}
    assert fitting_batch(chunked, 64) == SIMILARITY_BUDGET_BYTES // (16_384 * 56 * 56 * 4)
    legacy = manifest(51_361)
    del legacy["prototypes"]["chunk"]
    assert fitting_batch(legacy, 8) == SIMILARITY_BUDGET_BYTES // (51_361 * 56 * 56 * 4) < 8


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_out_of_range_and_non_finite_input_is_refused(small_bundle, real_batch, torch_fp32, backend):
    """Input the graph would score silently wrong: uint8 0-255 (every part defective), other dtypes,
    bool, values outside [0, 1] and NaN or inf. One InputError saying what is expected."""
    rt = torch_fp32 if backend == "torch" else load(small_bundle, "onnxruntime")
    _paths, images = real_batch
    x = images[:2]
    cases = {
        "uint8": ((x * 255).astype(np.uint8), r"expected float32 RGB in \[0, 1\] \(the graph's input\), got uint8 \(uint8 pixels: divide by 255\)"),
        "float64": (x.astype(np.float64), "got float64"),
        "bool": (x > 0.5, "got bool"),
        "x10": (x * 10, r"in \[0, 1\], got values from [\d.]+ to [\d.]+ \(normalisation is done inside the graph"),
        "[-1, 1]": (x * 2 - 1, r"got values from -[\d.]+ to"),
        "nan": (np.where(x > 0.5, np.nan, x).astype(np.float32), "NaN or infinite"),
        "inf": (np.where(x > 0.5, np.inf, x).astype(np.float32), "NaN or infinite"),
    }
    for name, (bad, match) in cases.items():
        with pytest.raises(InputError, match=match):
            rt.predict(bad)
    with pytest.raises(InputError, match="differ in shape"):
        rt.predict([x[0], x[0, :, :10]])


def test_pil_images_of_any_size_are_preprocessed_like_files(small_bundle, real_batch, torch_fp32):
    """A list of PIL images of different sizes (a raw numpy error before) is preprocessed with the
    engine's own preprocessing, as files are."""
    from PIL import Image

    from protoad_export.data.images import Preprocessing

    paths, images = real_batch
    pictures = [Image.open(p) for p in paths[:3]]
    pictures[1] = pictures[1].convert("RGB").resize((pictures[1].width // 2, pictures[1].height))  # another size
    expected = np.stack([images[0], Preprocessing.from_manifest(torch_fp32.manifest).image_array(pictures[1]), images[2]])
    maps, scores = torch_fp32.predict(pictures)
    ref_maps, ref_scores = torch_fp32.predict(expected)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    np.testing.assert_allclose(maps, ref_maps, atol=1e-6)
    with pytest.raises(InputError, match="not a mix"):
        torch_fp32.predict([pictures[0], images[0]])


def test_a_picture_with_an_exif_orientation_scores_as_upright(small_bundle, real_batch, torch_fp32, tmp_path):
    """The same real picture stored turned with orientation tag 6 scores as the upright one (it scored
    0.575 against 0.435 when the tag was ignored)."""
    from PIL import Image

    paths, _images = real_batch
    upright = Image.open(paths[3]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.save(tmp_path / "upright.png")
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tagged.png", exif=exif)
    pred = predict_paths(torch_fp32, [tmp_path / "upright.png", tmp_path / "tagged.png"])
    assert pred.scores[0] == pytest.approx(pred.scores[1], abs=1e-6)
    np.testing.assert_allclose(pred.maps[0], pred.maps[1], atol=1e-6)
