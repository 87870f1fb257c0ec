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

from protoad_export.bundle import read_manifest
from protoad_export.cli import main
from protoad_export.errors import ArtifactError

from conftest import write_image


def _make(tmp_path: Path, case: str, monkeypatch=None) -> list[str]:
    """Create the bad input for ``case``; return the CLI arguments that use it."""
    data = tmp_path / "data"
    data.mkdir()
    out = ["--out", str(tmp_path / "engines"), "--quiet"]
    eff = ["--backbone", "efficientnet_lite0", "--input", "tensor"]
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
    if case == "bundle name with a slash":
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
    "mostly corrupt images": (2, "images kept for fitting are unreadable (9 in the folder, 1 held out; first:"),
    "negative prototype count": (2, "Invalid value for '--max-prototypes'"),
    "batch profile min > max": (2, "1 <= MIN <= OPT <= MAX"),
    "unknown backbone": (2, "Invalid value for '--backbone'"),
    "weights of another architecture": (2, "does not hold resnet18 weights"),
    "weights file that is a pickle": (2, "not a loadable weights file"),
    "missing weights file": (2, "weights file not found"),
    "weights path that is a folder": (2, "is a folder: give the weights file itself"),
    "wide_resnet50_2 without weights": (4, "--weights FILE"),
    "bundle name with a slash": (2, "plain folder name"),
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
def bundle_copy(small_bundle, tmp_path) -> Path:
    import shutil

    shutil.copytree(small_bundle, tmp_path / "eng")
    return tmp_path / "eng"


@pytest.mark.parametrize("name", ["model.fp32.onnx", "model.fp16.onnx", "prototypes.npy"])
def test_tampered_or_truncated_files_are_refused(bundle_copy, name):
    from protoad_export import runtime

    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name} does not match its sha256"):
        read_manifest(bundle_copy)
    path.write_bytes(bytes(data[:100]))
    # Each backend checks the files it opens: the FP16 graph, the prototypes of the torch reference.
    backend, precision = {"model.fp32.onnx": ("onnxruntime", "fp32"), "model.fp16.onnx": ("onnxruntime", "fp16"),
                          "prototypes.npy": ("torch", "fp32")}[name]
    with pytest.raises(ArtifactError, match=name):
        runtime.load(bundle_copy, backend, precision=precision)


@pytest.mark.parametrize("version,match", [(0, "schema version 0"), (99, "schema version 99"), (None, "no schema_version")])
def test_old_or_unknown_manifest_schema_is_refused(bundle_copy, version, match):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    if version is None:
        del manifest["schema_version"]
    else:
        manifest["schema_version"] = version
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match):
        read_manifest(bundle_copy)


def test_missing_engine_dir_and_garbage_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        read_manifest(tmp_path / "none")
    (tmp_path / "e").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "e")
    (tmp_path / "e" / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path / "e")


def test_prototypes_are_never_unpickled(bundle_copy):
    """An object array (which np.load could only read by unpickling) is refused, not executed."""
    import hashlib

    from protoad_export import runtime

    path = bundle_copy / "prototypes.npy"
    np.save(path, np.array([print], dtype=object), allow_pickle=True)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["prototypes.npy"] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception) as exc:
        runtime.load(bundle_copy, "torch")
    assert "pickle" in str(exc.value).lower() and isinstance(exc.value, ArtifactError)


def test_an_output_path_that_is_a_file_is_one_line_before_any_work(small_bundle, small_category, tmp_path, monkeypatch):
    """--out (or a folder above it, or --json's folder) naming an existing file: one line and exit 2
    before any work, not an OSError traceback after it. The CLI also maps such OSErrors raised later."""
    import protoad_export.build.pipeline as builder
    import protoad_export.evaluation.evaluate as evaluate_module

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
        (["predict", str(small_bundle), str(good), "--out", str(blocker)],
         f"error: --out {blocker}: {blocker} is a file, not a folder"),
        (["eval", str(small_bundle), str(small_category), "--out", str(blocker)],
         f"error: --out {blocker}: {blocker} is a file, not a folder"),
        (["eval", str(small_bundle), str(small_category), "--out", str(tmp_path / "ev"), "--json", str(blocker / "r.json")],
         f"error: --json {blocker}: {blocker} is a file, not a folder"),
        (["bench", str(small_bundle), "--json", str(blocker / "r.json")],
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
    import protoad_export.build.pipeline as builder

    def clash(*args, **kwargs):
        raise NotADirectoryError(20, "Not a directory", str(tmp_path / "a_file" / "x"))

    monkeypatch.setattr(builder, "training_images", clash)
    result = CliRunner().invoke(main, ["build", str(tmp_path), "--name", "x", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'a_file' / 'x'}: Not a directory"


def test_a_build_without_the_memory_for_finch_is_one_line_before_the_features(tmp_path, monkeypatch):
    """Memory (simulated: 100 MiB available) that cannot hold FINCH's plan: exit 6 and one line
    naming the remedy, before any feature is extracted, and no bundle."""
    import protoad_export.build.pipeline as builder
    import protoad_export.build.resources as resources

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


# --------------------------------------------------------------------------------------------
# Nothing of the user's is lost; nothing silently wrong (issue 17)

TINY = ["--backbone", "efficientnet_lite0", "--crop", "64", "--resize", "80", "--input", "tensor", "--quiet"]


def _six_images(folder: Path) -> Path:
    for i in range(6):
        write_image(folder / f"{i}.png", size=(96, 80), seed=i)
    return folder


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


def _one_error(result) -> str:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_build_replaces_only_a_bundle_of_its_own(tmp_path, monkeypatch):
    """`cd victim && build parts --out . --name parts` wiped the training images and exited 0. Now a
    build refuses, before any work and touching nothing, a --out/--name that is the data folder, a
    folder without a protoad-export manifest, a file, a symbolic link, or a bundle holding files
    its manifest does not list."""
    import protoad_export.build.pipeline as builder

    victim = tmp_path / "victim"
    parts = _six_images(victim / "parts")
    (parts / "notes.txt").write_text("mine")
    (victim / "folder").mkdir()
    (victim / "folder" / "report.txt").write_text("mine")
    (victim / "a_file").write_text("mine")
    (victim / "link").symlink_to(victim / "folder")
    bundle = victim / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"tool": "protoad-export", "schema_version": 1, "files": {}}))
    (bundle / "notes.txt").write_text("mine")
    before = _tree(victim)
    monkeypatch.setattr(builder, "load_backbone", lambda *a, **k: pytest.fail("the build started"))
    cases = {
        "parts": f"error: {victim / 'parts'} is the data folder {parts} (or holds it): a build would replace it; "
                 "choose another --out or --name",
        "folder": f"error: {victim / 'folder'} exists and is not a protoad-export bundle (no protoad-export manifest.json): "
                  "a build will not replace it; choose another --out or --name",
        "a_file": f"error: {victim / 'a_file'} exists and is not a protoad-export bundle (it is a file): "
                  "a build will not replace it; choose another --name",
        "link": f"error: {victim / 'link'} is a symbolic link: a build will not replace it; choose another --name",
        "bundle": f"error: {bundle} holds files its manifest does not list (notes.txt): a build would delete them; "
                  "move them out or choose another --name",
    }
    for name, message in cases.items():
        result = CliRunner().invoke(main, ["build", str(parts), "--out", str(victim), "--name", name, *TINY])
        assert result.exit_code == 2, (name, result.output)
        assert _one_error(result) == message
        assert _tree(victim) == before, name  # nothing moved aside, nothing removed, no lock file left


def test_commit_refuses_what_appeared_during_the_build(tmp_path):
    """The swap checks again: a folder put under the final name while the build ran is not replaced."""
    from protoad_export.bundle import commit_directory, staging_directory
    from protoad_export.errors import InputError

    final = tmp_path / "e"
    staging = staging_directory(final)
    final.mkdir()
    (final / "photo.png").write_text("mine")
    with pytest.raises(InputError, match="not a protoad-export bundle"):
        commit_directory(staging, final)
    assert (final / "photo.png").read_text() == "mine" and not list(tmp_path.glob(".e.*.old"))


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_a_threshold_that_is_not_finite_and_positive_is_refused(small_bundle, small_category, tmp_path, value):
    """`predict --threshold nan` gave "0 defective" and wrote "threshold": NaN; a NaN in the manifest
    did the same. Both are one line now, before any image is read."""
    import shutil

    good = small_category / "test" / "good"
    result = CliRunner().invoke(main, ["predict", str(small_bundle), str(good), "--out", str(tmp_path / "p"),
                                       "--threshold", value])
    assert result.exit_code == 2, result.output
    assert _one_error(result) == (f"error: --threshold: the threshold must be a finite positive number "
                                  f"(scores are 1 - cosine), got {float(value)!r}")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
    engine = shutil.copytree(small_bundle, tmp_path / "eng")
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["threshold"] = {"value": float(value), "method": "frr"}
    (engine / "manifest.json").write_text(json.dumps(manifest))  # json writes NaN and Infinity
    result = CliRunner().invoke(main, ["predict", str(engine), str(good), "--out", str(tmp_path / "q")])
    assert result.exit_code == 3, result.output
    assert _one_error(result) == (f"error: {engine / 'manifest.json'}: the threshold must be a finite positive number "
                                  f"(scores are 1 - cosine), got {float(value)!r}: re-run calibrate")
    assert not (tmp_path / "q" / "results.json").exists()


def test_weights_full_of_nan_stop_the_build_at_the_features(tmp_path):
    """resnet18 weights of NaN built a "successful" engine whose scores were NaN: every part "good"."""
    import torchvision

    weights = tmp_path / "nan.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, weights)
    data = _six_images(tmp_path / "data")
    result = CliRunner().invoke(main, ["build", str(data), "--name", "x", "--out", str(tmp_path / "engines"),
                                       "--backbone", "resnet18", "--weights", str(weights), "--crop", "64",
                                       "--resize", "80", "--quiet"])
    assert result.exit_code == 2, result.output
    assert _one_error(result) == ("error: [1/4] features: the backbone gives NaN or infinite features (first: 0.png): "
                                  "check the weights (--weights); nothing was written")
    assert not any((tmp_path / "engines").iterdir())


@pytest.mark.parametrize("stage", ["prototypes", "hold-out scores"])
def test_non_finite_prototypes_or_holdout_scores_stop_the_build(tmp_path, monkeypatch, stage):
    import protoad_export.build.pipeline as builder

    if stage == "prototypes":
        fit_prototypes = builder.fit_prototypes

        def poisoned(*args, **kwargs):
            fit = fit_prototypes(*args, **kwargs)
            fit.prototypes[0, 0] = np.nan
            return fit

        monkeypatch.setattr(builder, "fit_prototypes", poisoned)
    else:
        score_holdout = builder.score_holdout
        monkeypatch.setattr(builder, "score_holdout", lambda *a, **k: {**score_holdout(*a, **k), "scores": [np.inf]})
    data = _six_images(tmp_path / "data")
    write_image(data / "6.png", size=(96, 80), seed=6)  # 7 images: one is held out
    result = CliRunner().invoke(main, ["build", str(data), "--name", "x", "--out", str(tmp_path / "engines"), *TINY])
    assert result.exit_code == 2, result.output
    expected = {"prototypes": "error: [2/4] prototypes: 1 of ",
                "hold-out scores": "error: hold-out scores: 1 of 1 values are NaN or infinite (the network gives no usable "
                                   "scores: check --weights); nothing was written"}[stage]
    assert _one_error(result).startswith(expected)
    assert not any((tmp_path / "engines").iterdir())


def test_a_second_build_of_a_name_stops_at_once(tmp_path, monkeypatch):
    """Two builds of one name at once both exited 0 and the last won; the second now stops with one
    line before any work while the first holds the name's lock."""
    import os

    import protoad_export.build.pipeline as builder
    from protoad_export.bundle import build_lock, lock_path, remove_stale_work

    data = _six_images(tmp_path / "data")
    engines = tmp_path / "engines"
    monkeypatch.setattr(builder, "load_backbone", lambda *a, **k: pytest.fail("the second build started"))
    with build_lock(engines / "x"):
        result = CliRunner().invoke(main, ["build", str(data), "--name", "x", "--out", str(engines), *TINY])
        assert result.exit_code == 2, result.output
        assert _one_error(result) == (f"error: another build of {engines / 'x'} is running (pid {os.getpid()}): "
                                      "wait for it to finish or choose another --name")
        assert remove_stale_work(engines / "x") == [] and lock_path(engines / "x").exists()  # held: kept
    assert not lock_path(engines / "x").exists()
    # A lock file a killed build left is nobody's: taken over and removed.
    lock_path(engines / "x").write_text("12345\n")
    assert remove_stale_work(engines / "x") == [lock_path(engines / "x")]


def test_rebuilding_a_calibrated_engine_says_the_threshold_is_lost_and_honours_the_umask(tmp_path):
    """A rebuild of a name silently dropped its calibrated threshold; the bundle was created 0700
    whatever the umask, so an inference service of another account could not open it."""
    import os
    import stat

    from protoad_export.evaluation.thresholds import calibrate

    data = _six_images(tmp_path / "data")
    write_image(data / "6.png", size=(96, 80), seed=6)
    engines = tmp_path / "engines"
    args = ["build", str(data), "--name", "x", "--out", str(engines), *TINY]
    old_umask = os.umask(0o002)
    try:
        first = CliRunner().invoke(main, args)
        assert first.exit_code == 0, first.output
        assert "replacing engine" not in first.output
        bundle = engines / "x"
        modes = {str(p.relative_to(engines)): stat.S_IMODE(p.stat().st_mode) for p in [bundle, *bundle.rglob("*")]}
        assert modes == {str(p.relative_to(engines)): 0o775 if p.is_dir() else 0o664 for p in [bundle, *bundle.rglob("*")]}
        assert any(p.is_dir() for p in bundle.rglob("*"))  # golden/: folders follow the umask too
        t = calibrate(engines / "x", target_frr=0.01)
        second = CliRunner().invoke(main, args)
    finally:
        os.umask(old_umask)
    assert second.exit_code == 0, second.output
    assert f"warning: replacing bundle x (threshold {t.value:.6g} will be lost; re-run calibrate)" in second.output.splitlines()
    assert "threshold" not in read_manifest(engines / "x")
    assert sorted(p.name for p in engines.iterdir()) == ["x"]  # no lock file, staging or .old left
