"""The build pipeline end to end on real images: artifacts, manifest, determinism, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from protoad_export.bundle import read_manifest, sha256_file
from protoad_export.build.pipeline import BuildConfig, build
from protoad_export.data.images import Preprocessing
from protoad_export.clustering.prototypes import near_miss

REQUIRED_FILES = {"prototypes.npy", "model.fp32.onnx", "model.fp16.onnx"}


def test_build_on_40_real_images_gives_every_artifact(small_bundle):
    manifest = read_manifest(small_bundle, verify=True)
    assert set(manifest["files"]) >= REQUIRED_FILES
    assert {p.name for p in small_bundle.iterdir()} >= REQUIRED_FILES | {"manifest.json"}
    assert manifest["schema_version"] == 2
    assert manifest["backbone"]["name"] == "efficientnet_lite0"
    # The offline weights are TF EfficientNet-Lite0: TF padding host and [-1, 1] inputs.
    assert manifest["backbone"]["architecture"] == "tf_efficientnet_lite0"
    assert manifest["preprocessing"]["mean"] == manifest["preprocessing"]["std"] == [0.5, 0.5, 0.5]
    assert manifest["backbone"]["weights_sha256"] == sha256_file(manifest["backbone"]["weights"])
    assert manifest["preprocessing"]["crop"] == 224 and manifest["align"] == "bilinear"
    protos = np.load(small_bundle / "prototypes.npy", allow_pickle=False)
    assert protos.dtype == np.float32 and protos.shape == (manifest["prototypes"]["count"], 176)
    sizes = manifest["finch"]["partition_sizes"]
    # FINCH stops at the first partition below the limit, and the prototypes are that partition.
    assert sizes[-1] == len(protos) < 10_000 and all(s >= 10_000 for s in sizes[:-1])
    # The product kernels FINCH's CPU searches used, with the rates they were chosen from.
    for record in manifest["finch"]["product_kernels"].values():
        assert record["kernel"] in ("fp32", "bf16", "int8", "fp16") and record["rates_gops"]["fp32"] > 0
    assert manifest["finch"]["product_kernels"]
    assert manifest["train"]["patches"] == manifest["train"]["images"] * 56 * 56
    for key in ("features", "clustering", "export"):
        assert manifest["build"]["seconds"][key] > 0
    assert manifest["build"]["peak_rss_mib"] > 0
    assert {"torch", "onnx", "numpy"} <= set(manifest["versions"])
    for precision in ("fp32", "fp16"):
        model = onnx.load(str(small_bundle / f"model.{precision}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert 17 <= manifest["onnx"][precision]["opset"] <= 20
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert "float16" in manifest["onnx"]["fp16"]["casts"] and not manifest["onnx"]["fp32"]["casts"]


def test_no_pickles_anywhere(small_bundle):
    files = [p for p in small_bundle.rglob("*") if p.is_file()]
    assert any(p.parent.name == "golden" for p in files)
    for path in files:
        head = path.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02", f"{path.name} looks like a pickle"


def _tiny_config(**kw) -> BuildConfig:
    kw = {"max_prototypes": 10_000, **kw}  # the paper's rule (auto: test_levels.py)
    return BuildConfig(backbone="efficientnet_lite0", batch_size=4, input="tensor", preprocessing=Preprocessing(mode="crop"), **kw)


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory, magnetic_tile) -> Path:
    folder = tmp_path_factory.mktemp("ten")
    for p in sorted((magnetic_tile / "train" / "good").iterdir())[:10]:
        (folder / p.name).symlink_to(p)
    return folder


def test_two_builds_are_identical(ten_images, tmp_path):
    """Same data and options: byte-identical prototypes and ONNX files (only the manifest's times differ)."""
    a = build(ten_images, "a", tmp_path, _tiny_config(), log=None, progress=False).manifest
    b = build(ten_images, "b", tmp_path, _tiny_config(), log=None, progress=False).manifest
    for name in REQUIRED_FILES:
        assert a["files"][name]["sha256"] == b["files"][name]["sha256"], name


def _run_cli(args, env=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "protoad_export", *args], capture_output=True, text=True, env=env, **kw)


def test_build_warns_when_finch_passes_over_a_partition_just_above_the_limit(ten_images, tmp_path):
    logged: list[str] = []
    first = build(ten_images, "a", tmp_path, _tiny_config(), log=logged.append, progress=False).manifest
    passed = first["finch"]["partition_sizes"][-1]
    assert near_miss(first["finch"]["partition_sizes"], 10_000) is None  # the premise: no warning here
    assert not any(line.startswith("warning: FINCH") for line in logged)
    # With the limit at that partition's size it is passed over for the next, far smaller one.
    logged.clear()
    second = build(ten_images, "b", tmp_path, _tiny_config(max_prototypes=passed), log=logged.append, progress=False).manifest
    sizes = second["finch"]["partition_sizes"]
    assert sizes[-2] == passed and sizes[-1] < passed
    assert second["finch"]["passed_over_near_miss"] == passed and first["finch"]["passed_over_near_miss"] is None
    assert [line for line in logged if line.startswith("warning: FINCH")] == [
        f"warning: FINCH passed over a partition of {passed:,} clusters, just above --max-prototypes {passed:,}, "
        f"for {sizes[-1]:,}; fewer prototypes usually score lower (--max-prototypes {passed + 1} keeps the {passed:,})"
    ]


@pytest.mark.parametrize("stage", ["[1/4]", "[2/4]", "[3/4]"])
def test_sigkill_at_each_stage_leaves_previous_engine_intact(small_bundle, ten_images, tmp_path, stage):
    out = tmp_path / "engines"
    shutil.copytree(small_bundle, out / "eng")
    before = read_manifest(out / "eng")
    proc = subprocess.Popen(
        [sys.executable, "-m", "protoad_export", "build", str(ten_images), "--name", "eng", "--out", str(out),
         "--backbone", "efficientnet_lite0", "--input", "tensor", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(stage):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    after = read_manifest(out / "eng", verify=True)
    assert after == before
    assert sorted(p.name for p in (out / "eng").iterdir()) == sorted(p.name for p in small_bundle.iterdir())
    # The killed build's hidden staging folders are removed by the next build of the same name.
    leftovers = [p for p in out.iterdir() if p.name.startswith(".eng.")]
    assert leftovers
    from protoad_export.bundle import remove_stale_work

    assert set(remove_stale_work(out / "eng")) == set(leftovers)


def test_sigterm_during_build_cleans_up_and_exits_143(small_bundle, ten_images, tmp_path):
    """A scheduler's SIGTERM mid-build: one line, exit 143, the previous engine untouched and no
    hidden scratch or staging folder left behind (unlike SIGKILL, nothing waits for the next build)."""
    out = tmp_path / "engines"
    shutil.copytree(small_bundle, out / "eng")
    before = read_manifest(out / "eng")
    proc = subprocess.Popen(
        [sys.executable, "-m", "protoad_export", "build", str(ten_images), "--name", "eng", "--out", str(out),
         "--backbone", "efficientnet_lite0", "--input", "tensor"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[2/4]"):  # features written to the scratch folder, FINCH next
            assert [p for p in out.iterdir() if p.name.startswith(".eng.")], "".join(seen)
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, "".join(seen) + err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM); nothing was replaced" and "Traceback" not in err
    assert read_manifest(out / "eng", verify=True) == before
    assert [p.name for p in out.iterdir()] == ["eng"]


def test_disk_full_during_export_leaves_nothing(ten_images, tmp_path, monkeypatch):
    import errno

    import protoad_export.export.onnx as onnx_export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model.fp32.onnx")

    monkeypatch.setattr(onnx_export.onnx, "save_model", full)
    from click.testing import CliRunner

    from protoad_export.cli import main

    result = CliRunner().invoke(main, ["build", str(ten_images), "--name", "e", "--out", str(tmp_path),
                                       "--backbone", "efficientnet_lite0", "--input", "tensor", "--quiet"])
    assert result.exit_code == 6
    assert result.output.strip().splitlines()[-1].startswith("error: disk full")
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_json_with_sorted_keys(small_bundle):
    """Sorted keys at every level, so that two manifests diff line by line."""
    text = (small_bundle / "manifest.json").read_text()
    manifest = json.loads(text)
    assert manifest["tool"] == "protoad-export"
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def test_prototype_chunk_changes_the_graph_not_the_scores(ten_images, magnetic_tile, tmp_path):
    """--prototype-chunk: the default graph runs the prototype conv in chunks of 1,024; one conv
    over all prototypes (a chunk larger than K) gives the same prototypes and the same scores."""
    from protoad_export.runtime import load, predict_paths

    chunked = build(ten_images, "chunked", tmp_path, _tiny_config(), log=None, progress=False)
    whole = build(ten_images, "whole", tmp_path, _tiny_config(prototype_chunk=1_000_000), log=None, progress=False)
    k = chunked.manifest["prototypes"]["count"]
    assert k > 1024  # so the default graph really has several chunks
    assert chunked.manifest["prototypes"]["chunk"] == 1024 and whole.manifest["prototypes"]["chunk"] == 1_000_000
    assert chunked.manifest["files"]["prototypes.npy"]["sha256"] == whole.manifest["files"]["prototypes.npy"]["sha256"]
    for precision in ("fp32", "fp16"):
        convs = chunked.manifest["onnx"][precision]["ops"]["Conv"] - whole.manifest["onnx"][precision]["ops"]["Conv"]
        assert convs == -(-k // 1024) - 1
        assert chunked.manifest["onnx"][precision]["ops"]["Max"] == -(-k // 1024) - 1
        assert "Max" not in whole.manifest["onnx"][precision]["ops"]
    images = sorted((magnetic_tile / "test" / "crack").iterdir())[:3]
    a = predict_paths(load(chunked.bundle_dir, "onnxruntime"), images)
    b = predict_paths(load(whole.bundle_dir, "onnxruntime"), images)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.maps, b.maps, atol=1e-6, rtol=0)


def test_prototype_chunk_must_be_positive():
    from protoad_export.errors import InputError

    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="prototype chunk"):
            _tiny_config(prototype_chunk=bad)


def test_a_version_1_manifest_is_upgraded_on_read_without_being_rewritten():
    """Back-compatibility lives in one function keyed by the schema version."""
    from protoad_export.bundle import upgrade_manifest

    old = {"schema_version": 1, "input": {"name": "image", "shape": ["batch", 3, 224, 224]},
           "prototypes": {"count": 9000}, "backbone": {"name": "efficientnet_lite0"}}
    new = upgrade_manifest(old)
    assert new["schema_version"] == 2 and new["input"]["kind"] == "tensor" and new["input"]["channel_order"] == "rgb"
    assert new["prototypes"]["chunk"] == 9000  # before the chunked conv: one conv over all prototypes
    assert new["backbone"]["architecture"] == "efficientnet_lite0"  # the host those bundles used
    assert old["schema_version"] == 1 and "kind" not in old["input"]  # the caller's dict is untouched
    assert upgrade_manifest(new) == new
