"""Every bad input a user can give ends in one line on stderr and a non-zero exit, never a traceback,
and nothing is written. The table in tests/README.md lists these cases with their messages."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protoad_export.artifacts import read_manifest
from protoad_export.cli import main
from protoad_export.errors import ArtifactError

from conftest import write_image


def _make(tmp_path: Path, case: str, monkeypatch=None) -> list[str]:
    """Create the bad input for ``case``; return the CLI arguments that use it."""
    data = tmp_path / "data"
    data.mkdir()
    out = ["--out", str(tmp_path / "engines"), "--quiet"]
    eff = ["--backbone", "efficientnet_lite0"]
    if case == "missing folder":
        return ["build", str(tmp_path / "nope"), "--name", "x", *eff, *out]
    if case == "empty folder":
        return ["build", str(data), "--name", "x", *eff, *out]
    if case == "folder without images":
        (data / "notes.txt").write_text("not an image")
        return ["build", str(data), "--name", "x", *eff, *out]
    if case == "too few images":
        for i in range(3):
            write_image(data / f"{i}.png", seed=i)
        return ["build", str(data), "--name", "x", *eff, *out]
    if case == "mostly corrupt images":
        for i in range(6):
            write_image(data / f"{i}.png", seed=i)
        (data / "zero.png").write_bytes(b"")
        (data / "text.png").write_text("a text file named .png")
        good = write_image(data / "trunc.jpg", size=(200, 200))
        good.write_bytes(good.read_bytes()[:300])
        return ["build", str(data), "--name", "x", *eff, *out]
    if case == "negative prototype count":
        return ["build", str(data), "--name", "x", "--max-prototypes", "-5", *out]
    if case == "batch profile min > max":
        return ["build", str(data), "--name", "x", "--batch", "8:4:1", *out]
    if case == "unknown backbone":
        return ["build", str(data), "--name", "x", "--backbone", "vgg16", *out]
    if case in ("weights of another architecture", "weights file that is a pickle", "missing weights file",
                "weights path that is a folder"):
        for i in range(6):
            write_image(data / f"{i}.png", seed=i)
    if case == "weights of another architecture":
        path = tmp_path / "w.pth"
        torch.save({"conv.weight": torch.zeros(3, 3)}, path)
        return ["build", str(data), "--name", "x", "--backbone", "resnet18", "--weights", str(path), *out]
    if case == "weights file that is a pickle":
        path = tmp_path / "evil.pth"
        path.write_bytes(pickle.dumps(print))
        return ["build", str(data), "--name", "x", "--backbone", "resnet18", "--weights", str(path), *out]
    if case == "weights path that is a folder":
        return ["build", str(data), "--name", "x", "--backbone", "resnet18", "--weights", str(tmp_path), *out]
    if case == "missing weights file":
        return ["build", str(data), "--name", "x", "--backbone", "resnet18", "--weights", str(tmp_path / "none.pth"), *out]
    if case == "wide_resnet50_2 without weights":
        for i in range(6):
            write_image(data / f"{i}.png", seed=i)
        return ["build", str(data), "--name", "x", *out]
    if case == "unknown product kernel":
        for i in range(6):
            write_image(data / f"{i}.png", seed=i)
        monkeypatch.setenv("PROTOAD_PRODUCT_KERNEL", "fp8")
        return ["build", str(data), "--name", "x", *eff, *out]
    if case == "engine name with a slash":
        for i in range(6):
            write_image(data / f"{i}.png", seed=i)
        return ["build", str(data), "--name", "a/b", *eff, *out]
    raise AssertionError(case)


CASES = {
    # case: (exit code, fragment of the message)
    "missing folder": (2, "data folder not found"),
    "empty folder": (2, "no images"),
    "folder without images": (2, "no images"),
    "too few images": (2, "at least 5 are needed"),
    "mostly corrupt images": (2, "images are unreadable (first:"),
    "negative prototype count": (2, "Invalid value for '--max-prototypes'"),
    "batch profile min > max": (2, "1 <= MIN <= OPT <= MAX"),
    "unknown backbone": (2, "Invalid value for '--backbone'"),
    "weights of another architecture": (2, "does not hold resnet18 weights"),
    "weights file that is a pickle": (2, "not a loadable weights file"),
    "missing weights file": (2, "weights file not found"),
    "weights path that is a folder": (2, "is a folder: give the weights file itself"),
    "wide_resnet50_2 without weights": (4, "--weights FILE"),
    "engine name with a slash": (2, "plain folder name"),
    "unknown product kernel": (2, "unknown product kernel 'fp8'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_build_input(tmp_path, case, monkeypatch, recwarn):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_cache"))
    args = _make(tmp_path, case, monkeypatch)
    result = CliRunner().invoke(main, args)
    code, fragment = CASES[case]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert fragment in result.output
    errors = [line for line in result.output.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1
    # Nor any library warning printed beside it (torch.load warned about a pickle's protocol).
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]
    engines = tmp_path / "engines"
    assert not engines.exists() or not any(p for p in engines.iterdir() if not p.name.startswith("."))
    assert not engines.exists() or not list(engines.glob(".x.*"))


def test_a_few_corrupt_images_are_skipped_with_a_warning(tmp_path):
    data = tmp_path / "data"
    for i in range(12):
        write_image(data / f"{i:02d}.png", size=(96, 80), seed=i)
    (data / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = CliRunner().invoke(main, ["build", str(data), "--name", "ok", "--out", str(tmp_path / "e"),
                                       "--backbone", "efficientnet_lite0", "--crop", "64", "--resize", "80", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable images: zz_broken.png" in result.output
    manifest = read_manifest(tmp_path / "e" / "ok")
    assert manifest["train"]["skipped"] == ["zz_broken.png"] and manifest["train"]["images"] >= 10  # less the hold-out


@pytest.fixture()
def engine_copy(small_engine, tmp_path) -> Path:
    import shutil

    shutil.copytree(small_engine, tmp_path / "eng")
    return tmp_path / "eng"


@pytest.mark.parametrize("name", ["model.fp32.onnx", "model.fp16.onnx", "prototypes.npy"])
def test_tampered_or_truncated_files_are_refused(engine_copy, name):
    from protoad_export import runtime

    path = engine_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name} does not match its sha256"):
        read_manifest(engine_copy)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(ArtifactError, match=name):
        runtime.load(engine_copy, "onnxruntime")


@pytest.mark.parametrize("version,match", [(0, "schema version 0"), (99, "schema version 99"), (None, "no schema_version")])
def test_old_or_unknown_manifest_schema_is_refused(engine_copy, version, match):
    path = engine_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    if version is None:
        del manifest["schema_version"]
    else:
        manifest["schema_version"] = version
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match):
        read_manifest(engine_copy)


def test_missing_engine_dir_and_garbage_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        read_manifest(tmp_path / "none")
    (tmp_path / "e").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "e")
    (tmp_path / "e" / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path / "e")


def test_prototypes_are_never_unpickled(engine_copy):
    """An object array (which np.load could only read by unpickling) is refused, not executed."""
    import hashlib

    from protoad_export import runtime

    path = engine_copy / "prototypes.npy"
    np.save(path, np.array([print], dtype=object), allow_pickle=True)
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["files"]["prototypes.npy"] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception) as exc:
        runtime.load(engine_copy, "torch")
    assert "pickle" in str(exc.value).lower() and isinstance(exc.value, ArtifactError)


def test_an_output_path_that_is_a_file_is_one_line_before_any_work(small_engine, small_category, tmp_path, monkeypatch):
    """--out (or a folder above it, or --json's folder) naming an existing file: one line and exit 2
    before any work, not an OSError traceback after it. The CLI also maps such OSErrors raised later."""
    import protoad_export.builder as builder
    import protoad_export.evaluate as evaluate_module

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # Work that must not start: the backbone load (build) and the test set (eval).
    monkeypatch.setattr(builder, "load_backbone", lambda *a, **k: pytest.fail("build started"))
    monkeypatch.setattr(evaluate_module, "load_test_set", lambda *a, **k: pytest.fail("eval started"))
    good = small_category / "test" / "good"
    cases = [
        (["build", str(small_category), "--name", "x", "--backbone", "efficientnet_lite0", "--out", str(blocker)],
         f"error: --out {blocker}: {blocker} is a file, not a folder"),
        (["build", str(small_category), "--name", "x", "--backbone", "efficientnet_lite0", "--out", str(blocker / "sub")],
         f"error: --out {blocker / 'sub'}: {blocker} is a file, not a folder"),
        (["predict", str(small_engine), str(good), "--out", str(blocker)],
         f"error: --out {blocker}: {blocker} is a file, not a folder"),
        (["eval", str(small_engine), str(small_category), "--out", str(blocker)],
         f"error: --out {blocker}: {blocker} is a file, not a folder"),
        (["eval", str(small_engine), str(small_category), "--out", str(tmp_path / "ev"), "--json", str(blocker / "r.json")],
         f"error: --json {blocker}: {blocker} is a file, not a folder"),
        (["bench", str(small_engine), "--json", str(blocker / "r.json")],
         f"error: --json {blocker}: {blocker} is a file, not a folder"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.strip().splitlines() == [message], (args, result.output)
    assert blocker.read_text() == "not a folder" and not (tmp_path / "ev").exists()


def test_os_errors_about_files_and_folders_are_one_line(tmp_path, monkeypatch):
    """The safety net behind those checks: a file where a folder goes (or the reverse) found while
    writing is one line and exit 2, whichever command meets it."""
    import protoad_export.builder as builder

    def clash(*args, **kwargs):
        raise NotADirectoryError(20, "Not a directory", str(tmp_path / "a_file" / "x"))

    monkeypatch.setattr(builder, "training_images", clash)
    result = CliRunner().invoke(main, ["build", str(tmp_path), "--name", "x", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'a_file' / 'x'}: Not a directory"


def test_a_build_without_the_memory_for_finch_is_one_line_before_the_features(tmp_path, monkeypatch):
    """Memory (simulated: 100 MiB available) that cannot hold FINCH's plan: exit 6 and one line
    naming the remedy, before any feature is extracted, and no engine directory."""
    import protoad_export.builder as builder
    import protoad_export.resources as resources

    data = tmp_path / "data"
    for i in range(6):
        write_image(data / f"{i}.png", seed=i)
    monkeypatch.setattr(resources, "available_memory", lambda: 100 << 20)
    monkeypatch.setattr(builder, "extract_features", lambda *a, **k: pytest.fail("features were extracted"))
    result = CliRunner().invoke(main, ["build", str(data), "--name", "x", "--backbone", "efficientnet_lite0",
                                       "--out", str(tmp_path / "engines"), "--quiet"])
    assert result.exit_code == 6, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: FINCH on ") and "GiB of memory, 0.1 GiB is available: " in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())
