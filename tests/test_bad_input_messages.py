"""Bad input that used to end in a traceback or a misleading message: each now gives one clear line
(or one warning line where the work can go on). The rows of tests/README.md's table quote these."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from protoad_export.cli import main
from protoad_export.errors import ResourceError

from conftest import write_image

EFF = ["--backbone", "efficientnet_lite0", "--input", "tensor"]


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("error:", "Error:"))]


def _one_error(result, code: int) -> str:
    """The single error line of a CLI run that exited with ``code`` and no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = _errors(result.output)
    assert len(errors) == 1, result.output
    return errors[0]


def _images(folder: Path, count: int, size=(96, 80)) -> Path:
    for i in range(count):
        write_image(folder / f"{i:02d}.png", size=size, seed=i)
    return folder


# --------------------------------------------------------------------------------------------
# Item: tracebacks (bundle name length, edited manifests)


def test_an_engine_name_too_long_for_the_file_system_is_one_line_before_any_work(tmp_path, monkeypatch):
    import protoad_export.build.pipeline as builder

    monkeypatch.setattr(builder, "load_backbone", lambda *a, **k: pytest.fail("build started"))
    data = _images(tmp_path / "data", 6)
    result = CliRunner().invoke(main, ["build", str(data), "--name", "n" * 250, *EFF, "--out", str(tmp_path / "e")])
    assert _one_error(result, 2) == "error: bundle name is 250 bytes long; at most 200 are allowed"
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def _edit(manifest: dict, case: str) -> None:
    if case == "crop edited":
        manifest["preprocessing"]["crop"] = 256
    elif case == "crop and every shape edited":
        manifest["preprocessing"]["crop"] = manifest["preprocessing"]["resize"] = 256
        manifest["input"]["shape"][2:] = [256, 256]
        manifest["train"]["grid"] = [64, 64]
    elif case == "no preprocessing":
        del manifest["preprocessing"]
    elif case == "threshold not a number":
        manifest["threshold"] = {"value": "abc", "method": "manual"}
    elif case == "unknown align":
        manifest["align"] = "bicubic"
    else:
        raise AssertionError(case)


EDITS = {
    "crop edited": "preprocessing.crop 256 does not match the network's input 224x224 (input.shape)",
    "crop and every shape edited": "preprocessing.crop 256 does not match model.fp32.onnx's input 224x224",
    "no preprocessing": "preprocessing is missing",
    "threshold not a number": "the threshold must be a finite positive number (scores are 1 - cosine), got 'abc'",
    "unknown align": 'align must be one of bilinear, nearest, not "bicubic"',
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_manifest_is_one_line_naming_the_field_before_any_work(small_bundle, small_category, tmp_path,
                                                                          monkeypatch, case):
    """Checked when the manifest is loaded: eval stops before reading a test image, not after its run."""
    import protoad_export.evaluation.evaluate as evaluate_module

    engine = tmp_path / "eng"
    shutil.copytree(small_bundle, engine)
    path = engine / "manifest.json"
    manifest = json.loads(path.read_text())
    _edit(manifest, case)
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr(evaluate_module, "load_test_set", lambda *a, **k: pytest.fail("eval started"))
    result = CliRunner().invoke(main, ["eval", str(engine), str(small_category), "--out", str(tmp_path / "ev"), "--quiet"])
    line = _one_error(result, 3)
    assert line.startswith(f"error: {path}: ") and EDITS[case] in line, line
    remedy = "re-run calibrate" if case.startswith("threshold") else "the manifest was edited or is damaged; rebuild the bundle"
    assert line.endswith(remedy), line
    good = small_category / "test" / "good"
    result = CliRunner().invoke(main, ["predict", str(engine), str(good), "--out", str(tmp_path / "p"), "--threshold", "0.5"])
    assert EDITS[case] in _one_error(result, 3)


def test_the_schema_stride_is_every_backbones():
    from protoad_export import bundle
    from protoad_export.model.backbones import BACKBONES

    assert {spec.strides[0] for spec in BACKBONES.values()} == {bundle.STAGE1_STRIDE}


# --------------------------------------------------------------------------------------------
# Item: bench batch sizes


def test_bench_refuses_a_batch_that_cannot_fit_in_memory_before_any_image_is_decoded(small_bundle, monkeypatch):
    import protoad_export.evaluation.bench as bench_module

    monkeypatch.setattr(bench_module, "load_test_images", lambda *a, **k: pytest.fail("images were decoded"))
    result = CliRunner().invoke(main, ["bench", str(small_bundle), "--backend", "onnxruntime", "--fps",
                                       "--batch-sizes", "1,100000"])
    line = _one_error(result, 6)
    assert line.startswith("error: a batch of 100,000 images needs about ") and "GiB is available: use --batch-sizes of at most " in line


def test_the_batch_memory_rule_names_the_largest_batch_that_fits():
    from protoad_export.build.resources import BATCH_RESERVE, check_batch_memory, engine_batch_bytes

    manifest = {"preprocessing": {"crop": 64}, "train": {"grid": [16, 16]}, "prototypes": {"count": 100, "dim": 176}}
    per_image = engine_batch_bytes(manifest)
    assert per_image == 2 * 4 * (4 * 64 * 64 + (176 + 100) * 256)
    check_batch_memory([1, 8], manifest, memory=BATCH_RESERVE + 8 * per_image)
    with pytest.raises(ResourceError, match="use --batch-sizes of at most 8$"):
        check_batch_memory([1, 9], manifest, memory=BATCH_RESERVE + 8 * per_image)


@pytest.mark.parametrize("value", ["1,,2", "1,2,", ",8"])
def test_bench_batch_sizes_with_an_empty_item_are_refused(tmp_path, value):
    result = CliRunner().invoke(main, ["bench", str(tmp_path), "--batch-sizes", value])
    line = _one_error(result, 2)
    assert line == f"Error: Invalid value for '--batch-sizes': comma-separated positive integers expected, got {value!r}"


# --------------------------------------------------------------------------------------------
# Item: read-only output folders and the disk reserve


@pytest.mark.parametrize("how", ["read-only file system", "no write permission"])
def test_a_read_only_output_folder_is_named_as_such(tmp_path, monkeypatch, how):
    import protoad_export.build.pipeline as builder

    data = _images(tmp_path / "data", 6)
    out = tmp_path / "ro"
    out.mkdir()
    if how == "read-only file system":  # simulated: the tests may run as root, for whom chmod is no barrier
        real = os.statvfs

        class ReadOnly:
            def __init__(self, path):
                self.f_flag = real(path).f_flag | (os.ST_RDONLY if Path(path) == out else 0)

        monkeypatch.setattr(os, "statvfs", ReadOnly)
        message = f"error: --out {out}: {out} is on a read-only file system"
    else:
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: Path(path) != out or not mode & os.W_OK)
        message = f"error: --out {out}: {out} is read-only for this user (no write permission)"
    monkeypatch.setattr(builder, "load_backbone", lambda *a, **k: pytest.fail("build started"))
    result = CliRunner().invoke(main, ["build", str(data), "--name", "x", *EFF, "--out", str(out)])
    assert _one_error(result, 6) == message
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "no_engine"), str(data), "--out", str(out / "p")])
    assert _one_error(result, 6) == message.replace(f"--out {out}:", f"--out {out / 'p'}:")


def test_the_disk_reserve_grows_with_the_job_not_a_fixed_256_mib():
    """A 20 MB build with 240 MiB free: the old fixed 256 MiB reserve refused it."""
    from protoad_export.build.resources import DISK_FLOOR, DISK_SLACK, check_build_resources, engine_file_bytes

    n, dim = 56_818, 176  # 20 MB of FP16 features
    engine = engine_file_bytes(3_000_000, 1000, dim)
    need = int(DISK_SLACK * 2 * n * dim) + engine + DISK_FLOOR
    assert need < 240 << 20
    check_build_resources(n, n, dim, ".", True, 1000, memory=64 << 30, disk=240 << 20, engine_bytes=engine)
    with pytest.raises(ResourceError, match="of disk"):
        check_build_resources(n, n, dim, ".", True, 1000, memory=64 << 30, disk=need - 1, engine_bytes=engine)
    # A large engine's own files count: wide_resnet50_2-sized weights and 10,000 prototypes.
    assert engine_file_bytes(24_000_000, 10_000, 1792) > 256 << 20


# --------------------------------------------------------------------------------------------
# Item: few training images (no hold-out), tiny images; and the smaller items on one small build


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """A category of 5 training images of 16x16 pixels (no hold-out possible; upscaled 5x to the
    64x64 input) whose test defects have no ground-truth masks; built once."""
    from protoad_export.build.pipeline import BuildConfig, build
    from protoad_export.data.images import Preprocessing

    root = tmp_path_factory.mktemp("tiny")
    category = root / "cat"
    _images(category / "train" / "good", 5, size=(16, 16))
    _images(category / "test" / "good", 3, size=(16, 16))
    for i in range(3):
        write_image(category / "test" / "scratch" / f"s{i}.png", size=(16, 16), seed=100 + i)
    lines: list[str] = []
    config = BuildConfig(backbone="efficientnet_lite0", preprocessing=Preprocessing(resize=80, crop=64), batch_size=8)
    result = build(category, "tiny", root / "engines", config, log=lines.append, progress=False)
    return category, result.bundle_dir, lines


def test_a_build_without_room_for_a_hold_out_warns_and_calibrate_names_why(tiny_build, tmp_path):
    category, engine, lines = tiny_build
    warnings = [line for line in lines if line.startswith("warning: no hold-out")]
    assert warnings == ["warning: no hold-out kept: only 5 training images, all needed for fitting (a hold-out needs "
                        "at least 6: 5 to fit and 1 to hold out); calibrate will need --data, or predict a --threshold"]
    copy = tmp_path / "eng"
    shutil.copytree(engine, copy)
    result = CliRunner().invoke(main, ["calibrate", str(copy)])
    assert _one_error(result, 3) == (
        f"error: {copy} has no hold-out scores (only 5 training images, all needed for fitting (a hold-out needs at "
        "least 6: 5 to fit and 1 to hold out)): rebuild, or calibrate with --data CATEGORY, or give predict a --threshold")


def test_images_much_smaller_than_the_input_are_warned_about_once(tiny_build):
    _, _, lines = tiny_build
    warnings = [line for line in lines if "upscaled" in line]
    assert warnings == ["warning: the images are small (16x16 pixels) and are upscaled 5x to the 64x64 input: small "
                        "defects are blurred over many patches; a smaller --crop and --resize (at least 32) fit them better"]


def test_eval_on_a_category_without_masks_gives_image_metrics_and_says_so(tiny_build, tmp_path):
    category, engine, _ = tiny_build
    result = CliRunner().invoke(main, ["eval", str(engine), str(category), "--out", str(tmp_path / "ev"), "--quiet"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: no ground-truth masks in {category / 'ground_truth'}: image metrics only "
                        "(pixel AUROC and PRO are not available)"]
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["pixel_metrics"] == "not available: no ground-truth masks"
    overall = report["methods"]["protoad"]["metrics"]["overall"]
    assert 0 <= overall["image_auroc"] <= 1 and overall["pixel_auroc"] is None and overall["pro"] is None


def test_a_deleted_fp16_model_does_not_block_the_fp32_one(tiny_build, tmp_path):
    from protoad_export.errors import ArtifactError
    from protoad_export.runtime import load

    category, engine, _ = tiny_build
    copy = tmp_path / "eng"
    shutil.copytree(engine, copy)
    (copy / "model.fp16.onnx").unlink()
    result = CliRunner().invoke(main, ["predict", str(copy), str(category / "test" / "good"), "--out", str(tmp_path / "p"),
                                       "--threshold", "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ArtifactError, match="model.fp16.onnx is listed in the manifest but missing"):
        load(copy, "onnxruntime", precision="fp16")


def test_predict_on_cuda_without_a_gpu_provider_is_refused(tiny_build, tmp_path):
    import onnxruntime

    from protoad_export.runtime.onnxruntime import GPU_PROVIDERS

    if set(GPU_PROVIDERS) & set(onnxruntime.get_available_providers()):
        pytest.skip("ONNX Runtime has a GPU execution provider here")
    category, engine, _ = tiny_build
    result = CliRunner().invoke(main, ["predict", str(engine), str(category / "test" / "good"), "--out", str(tmp_path / "p"),
                                       "--threshold", "0.5", "--device", "cuda"])
    line = _one_error(result, 4)
    assert line.startswith("error: device cuda was asked for, but ONNX Runtime has no GPU execution provider here "
                           "(available: ") and line.endswith("): use device cpu or install onnxruntime-gpu")
    assert not (tmp_path / "p" / "results.csv").exists()
    # eval's --device is the torch backend's and the kNN baseline's: ONNX Runtime still runs.
    result = CliRunner().invoke(main, ["eval", str(engine), str(category), "--device", "cuda", "--out", str(tmp_path / "ev"),
                                       "--quiet"])
    assert result.exit_code == 0, result.output


def test_a_text_file_given_as_weights_is_named_as_not_a_weights_file(tmp_path):
    data = _images(tmp_path / "data", 6)
    weights = tmp_path / "weights.pth"
    weights.write_text("eh? not weights\n")
    result = CliRunner().invoke(main, ["build", str(data), "--name", "x", "--backbone", "resnet18", "--weights",
                                       str(weights), "--out", str(tmp_path / "e")])
    assert _one_error(result, 2) == (
        f"error: {weights}: not a PyTorch weights file (torch.save writes a zip archive or a pickle; this file starts "
        "with b'eh? '): give the .pth or .pt file of the backbone's state dict")


def test_unreadable_images_are_counted_against_the_images_read_for_fitting(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(16):
        (data / f"{i:02d}.png").write_text("a text file named .png")
    result = CliRunner().invoke(main, ["build", str(data), "--name", "x", *EFF, "--out", str(tmp_path / "e"), "--quiet"])
    line = _one_error(result, 2)
    assert line.startswith("error: 14 of the 14 images kept for fitting are unreadable (16 in the folder, 2 held out; "
                           f"first: {data / '00.png'}: not a readable image"), line
