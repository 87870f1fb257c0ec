"""Image decoding, geometry and dataset discovery, including every odd file a line camera may give."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from protoad_export.errors import InputError
from protoad_export.data.datasets import category_test_set, collect_images, list_images, mask_for, training_images
from protoad_export.data.images import Preprocessing, load_image

from conftest import write_image


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "1", "LA", "I", "RGB"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    ext = ".jpg" if mode == "CMYK" else (".tif" if mode in ("I",) else ".png")
    path = write_image(tmp_path / f"x{ext}", mode=mode)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_16bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((10, 12), 65535, dtype=np.uint16)
    arr[:, :6] = 32768
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb[0, 0, 0] == 128 and rgb[0, -1, 0] == 255  # a clip would give 255 everywhere


def test_rgba_drops_alpha_keeps_colour(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (8, 8), (10, 200, 30, 0)).save(path)
    assert tuple(np.asarray(load_image(path))[0, 0]) == (10, 200, 30)


@pytest.mark.parametrize("content,match", [
    (b"", "not a readable image"),
    (b"this is a text file", "not a readable image"),
])
def test_unreadable_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as exc:
        load_image(path)
    assert "bad.png" in str(exc.value)


def test_truncated_jpeg(tmp_path):
    path = write_image(tmp_path / "t.jpg", size=(200, 200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(path)


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    import protoad_export.data.images as images

    path = write_image(tmp_path / "big.png", size=(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(InputError, match="decompression-bomb"):
        load_image(path)


@pytest.mark.parametrize("mode", ["crop", "squash", "letterbox"])
@pytest.mark.parametrize("size", [(632, 222), (103, 300), (224, 224)])
def test_geometry_is_shared_by_image_and_mask(mode, size):
    """A white rectangle drawn into image and mask lands on the same output pixels."""
    prep = Preprocessing(mode=mode)
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    box = (w // 3, h // 3, w // 2, h // 2)
    img[box[1]:box[3], box[0]:box[2]] = 255
    mask = Image.fromarray(img[..., 0])
    out_img = prep.image_array(Image.fromarray(img))[0] > 0.5
    out_mask = prep.mask_array(mask, (w, h))
    assert out_img.shape == out_mask.shape == (224, 224)
    # Bilinear vs nearest differ only along the rectangle's border.
    assert (out_img ^ out_mask).sum() <= 2 * (out_mask.sum() ** 0.5) * 4 + 8


def test_letterbox_keeps_whole_part_and_pads():
    prep = Preprocessing(mode="letterbox")
    img = Image.new("RGB", (600, 200), (255, 255, 255))
    arr = prep.image_array(img)
    assert arr.shape == (3, 224, 224)
    rows = np.where(arr[0].max(axis=1) > 0.5)[0]
    assert 70 <= len(rows) <= 76 and arr[0, 0, 0] == 0.0  # 224/3 rows of part, black above


def test_mask_of_other_resolution_is_scaled_and_other_shape_refused():
    prep = Preprocessing(mode="squash")
    half = Image.new("L", (50, 100), 255)
    assert prep.mask_array(half, (100, 200)).all()
    with pytest.raises(InputError, match="does not match"):
        prep.mask_array(Image.new("L", (100, 100), 255), (100, 200))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="stretch"), "unknown resize mode"),
    (dict(crop=100), "multiple of 16"),
    (dict(resize=200, crop=224), "resize"),
])
def test_preprocessing_validates(kwargs, match):
    with pytest.raises(InputError, match=match):
        Preprocessing(**kwargs)


def test_discovery_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        training_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        list_images(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        training_images(tmp_path / "docs")
    with pytest.raises(InputError, match="no images match"):
        collect_images([str(tmp_path / "*.png")])


def test_mvtec_category_without_masks_is_refused(tmp_path):
    write_image(tmp_path / "train" / "good" / "a.png")
    write_image(tmp_path / "test" / "good" / "b.png")
    write_image(tmp_path / "test" / "scratch" / "c.png")
    with pytest.raises(InputError, match="no ground-truth mask for .*c.png"):
        category_test_set(tmp_path)
    assert [s.defect for s in category_test_set(tmp_path, require_masks=False)] == ["good", "scratch"]


def test_real_category_masks_align(magnetic_tile):
    samples = category_test_set(magnetic_tile)
    assert len(samples) == 582 and sum(s.label for s in samples) == 392
    prep = Preprocessing(mode="squash")
    sample = next(s for s in samples if s.defect == "fray")
    assert 0 < mask_for(sample, prep).mean() < 0.6


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=400), cut=st.integers(0, 2000), flip=st.integers(0, 2000))
def test_fuzz_loading_never_raises_anything_but_input_error(tmp_path, data, cut, flip):
    """Random bytes and mutated real encodings either decode to RGB or raise InputError."""
    buf = io.BytesIO()
    Image.fromarray((np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(40, 48, 3)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    png[flip % len(png)] ^= 0xFF
    for i, blob in enumerate((data, bytes(png[: max(1, cut % len(png))]), bytes(png))):
        path = tmp_path / f"f{i}.png"
        path.write_bytes(blob)
        try:
            img = load_image(path)
        except InputError:
            continue
        assert img.mode == "RGB"


def test_valid_mask_marks_the_letterbox_padding():
    prep = Preprocessing(mode="letterbox")
    valid = prep.valid_mask(600, 200)
    drawn = prep.image_array(Image.new("RGB", (600, 200), (255, 255, 255)))[0] > 0.5
    assert (valid == drawn).all() and 0 < valid.mean() < 0.5
    assert Preprocessing(mode="squash").valid_mask(600, 200).all()


def _exif_pair(tmp_path, orientation: int, transpose, mode: str = "RGB"):
    """An upright picture, and the same picture stored as a sideways camera does: the pixels
    turned and an EXIF orientation tag that turns them back (lossless PNG, so they compare exactly)."""
    rng = np.random.default_rng(orientation)
    upright = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8), "RGB").convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.save(tmp_path / f"upright_{orientation}.png")
    upright.transpose(transpose).save(tmp_path / f"tagged_{orientation}.png", exif=exif)
    return tmp_path / f"upright_{orientation}.png", tmp_path / f"tagged_{orientation}.png"


@pytest.mark.parametrize("orientation,transpose", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path, orientation, transpose):
    """The same picture stored sideways with its orientation tag is read exactly as the upright one,
    by the one loader every command uses; its size (mask geometry, aspect warning) is the upright one's."""
    from protoad_export.data.images import image_size, load_batch, load_mask

    upright, tagged = _exif_pair(tmp_path, orientation, transpose)
    np.testing.assert_array_equal(np.asarray(load_image(tagged)), np.asarray(load_image(upright)))
    assert image_size(tagged) == image_size(upright) == (60, 40)
    prep = Preprocessing(resize=48, crop=32)
    np.testing.assert_array_equal(load_batch([tagged], prep), load_batch([upright], prep))
    (tmp_path / "masks").mkdir()
    mask_upright, mask_tagged = _exif_pair(tmp_path / "masks", orientation, transpose, "L")
    np.testing.assert_array_equal(np.asarray(load_mask(mask_tagged)), np.asarray(load_mask(mask_upright)))


def test_a_white_image_through_the_float_resize_passes_the_input_check():
    """Pillow's bilinear weights sum to 1 only up to float32 rounding: a white 100x222 image comes out
    at 1.0000002 after the letterbox resize, and eval refused every such image before the check
    allowed ``RANGE_SLACK``. Values a visible step outside [0, 1] are still refused."""
    import numpy as np

    from protoad_export.contract import RANGE_SLACK, InputContract
    from protoad_export.data.images import Preprocessing
    from protoad_export.errors import InputError

    prep = Preprocessing(mode="letterbox", crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = prep.pixels_array(np.full((222, 100, 3), 255, np.uint8))[None]
    assert 1.0 < float(x.max()) <= 1.0 + RANGE_SLACK
    contract = InputContract("tensor", 224)
    assert contract.check(x).shape == (1, 3, 224, 224)
    with pytest.raises(InputError, match="got values from"):
        contract.check(x + np.float32(1e-3))
