"""Golden outputs written by the build and ``protoad-export verify`` (Polygraphy's --load-outputs, built in),
in process and in a subprocess where torch cannot be imported (a line PC)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protoad_export.build.golden import DEFECTS, draw_defect
from protoad_export.bundle import MANIFEST_NAME, add_files_to_manifest, read_manifest, sha256_file
from protoad_export.cli import main
from protoad_export.evaluation.verify import compare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle_copy(small_bundle, tmp_path):
    """A private copy of the shared small_bundle fixture (these tests change or damage it)."""
    return shutil.copytree(small_bundle, tmp_path / "small")


def run_cli(*args):
    """The CLI with stdout and stderr apart (click 8.1 mixes them unless told not to)."""
    import inspect

    separate = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters else {}
    return CliRunner(**separate).invoke(main, [str(a) for a in args])


def test_build_stores_golden_inputs_and_fp32_outputs_hashed(small_bundle):
    from protoad_export.runtime import load

    manifest = read_manifest(small_bundle)
    golden = manifest["golden"]
    for name in golden["files"]:
        assert manifest["files"][name]["sha256"] == sha256_file(small_bundle / name)
    rows = golden["rows"]
    assert [r["synthetic"] for r in rows[-2:]] == list(DEFECTS)
    assert golden["count"] == len(rows) >= 3 and any(r["source"] == "holdout" for r in rows)
    inputs = np.load(small_bundle / golden["inputs"], allow_pickle=False)
    maps = np.load(small_bundle / golden["outputs"]["anomaly_map"], allow_pickle=False)
    scores = np.load(small_bundle / golden["outputs"]["score"], allow_pickle=False)
    size = manifest["preprocessing"]["crop"]
    assert inputs.dtype == np.float32 and inputs.shape == (len(rows), 3, size, size)
    assert maps.shape == (len(rows), 1, size, size) and scores.shape == (len(rows),)
    # The stored outputs are the FP32 module's on the stored inputs.
    ref_maps, ref_scores = load(small_bundle, "torch").predict(inputs)
    np.testing.assert_allclose(maps[:, 0], ref_maps, atol=1e-5)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # The drawn defects reach the decision path: each scores above every normal row.
    assert scores[-2:].min() > scores[:-2].max()


def test_drawn_defects_are_deterministic_dark_and_central():
    pixels = np.full((60, 80, 3), 200, np.uint8)
    for kind in DEFECTS:
        out = draw_defect(pixels, kind)
        np.testing.assert_array_equal(out, draw_defect(pixels, kind))
        changed = np.argwhere((out != pixels).any(axis=2))
        assert len(changed) > 0 and out[tuple(changed[0])].max() == 40
        assert 15 <= changed[:, 0].mean() <= 45 and 20 <= changed[:, 1].mean() <= 60
    assert (pixels == 200).all()  # the caller's image is not drawn on


def test_verify_passes_on_onnxruntime_fp32_and_fp16_with_a_report(small_bundle, tmp_path):
    result = run_cli("verify", small_bundle, "--json", tmp_path / "r" / "verify.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "verify.json").read_text())
    assert [r["backend"] for r in report["results"]] == ["onnxruntime", "onnxruntime-fp16"]
    for r in report["results"]:
        assert r["passed"] and set(r["outputs"]) == {"anomaly_map", "score"}
        assert set(r["outputs"]["anomaly_map"]) >= {"max_abs", "mean_abs", "median_abs", "p99_abs", "allclose"}
        assert r["largest_score_difference"]["difference"] == pytest.approx(r["outputs"]["score"]["max_abs"])
    fp32, fp16 = report["results"]
    assert fp32["outputs"]["anomaly_map"]["max_abs"] < 1e-4 < fp16["outputs"]["anomaly_map"]["max_abs"] < 2e-2
    assert "largest score difference" in result.output and "no threshold stored" in result.output


def test_verify_past_a_tolerance_exits_5_after_the_report(small_bundle):
    result = run_cli("verify", small_bundle, "--backend", "onnxruntime-fp16", "--atol", "0", "--rtol", "0")
    assert result.exit_code == 5
    assert "FAIL" in result.stdout
    assert result.stderr.startswith("error: verify failed: onnxruntime-fp16: anomaly_map: ")
    assert "past atol 0 + rtol 0 x |ref|" in result.stderr and len(result.stderr.splitlines()) == 1


def test_compare_applies_atol_plus_rtol_elementwise_and_lists_flips():
    golden = {"anomaly_map": np.array([[[[1.0, 10.0]]], [[[0.0, 0.0]]]], np.float32),
              "score": np.array([0.50, 0.20], np.float32)}
    rows = [{"image": "a.png", "synthetic": None}, {"image": "a.png", "synthetic": "dark spot"}]
    # |err| <= 0.1 + 0.1 |ref|: 0.15 away from 1 passes, 1.05 away from 10 passes, 0.11 away from 0 fails.
    out = {"anomaly_map": np.array([[[[1.15, 11.05]]], [[[0.0, 0.0]]]], np.float32),
           "score": np.array([0.49, 0.26], np.float32)}
    r = compare("onnxruntime", out, golden, rows, threshold=0.25, atol=0.1, rtol=0.1)
    assert r["passed"] and r["outputs"]["anomaly_map"]["max_abs"] == pytest.approx(1.05, abs=1e-5)
    assert [(f["image"], f["reference_defective"], f["defective"]) for f in r["flips"]] == [("a.png (dark spot)", False, True)]
    assert r["largest_score_difference"]["row"] == 1
    out["anomaly_map"][1, 0, 0, 0] = 0.11
    r = compare("onnxruntime", out, golden, rows, threshold=None, atol=0.1, rtol=0.1)
    assert not r["passed"] and r["failures"] == ["anomaly_map: 1 values past atol 0.1 + rtol 0.1 x |ref| (max error 1.05)"]
    assert r["flips"] == []
    out["score"][0] = np.nan
    r = compare("onnxruntime", out, golden, rows, threshold=0.25, atol=0.1, rtol=0.1)
    assert "score has non-finite values" in r["failures"]


def test_verify_reports_decisions_that_flip_at_the_stored_threshold(bundle_copy, tmp_path):
    from protoad_export.runtime import load

    golden = read_manifest(bundle_copy)["golden"]
    ref = np.load(bundle_copy / golden["outputs"]["score"])
    fp16 = load(bundle_copy, "onnxruntime", precision="fp16").predict(np.load(bundle_copy / golden["inputs"]))[1]
    row = int(np.argmax(np.abs(fp16 - ref)))
    assert fp16[row] != ref[row]
    add_files_to_manifest(bundle_copy, [], {"threshold": {"value": float(ref[row] + fp16[row]) / 2, "method": "manual"}})
    result = run_cli("verify", bundle_copy, "--json", tmp_path / "v.json")
    assert result.exit_code == 0, result.output  # within tolerance: reported, not failed
    report = json.loads((tmp_path / "v.json").read_text())
    fp32, half = report["results"]
    assert fp32["flips"] == [] and [f["row"] for f in half["flips"]] == [row]
    assert "decisions: none flips at" in result.stdout and "decision flips on" in result.stdout


@pytest.mark.parametrize("damage, message", [
    ("tamper", "golden/score.npy does not match its sha256 in the manifest: the file is corrupt or was modified"),
    ("delete", "golden/inputs.npy is listed in the manifest but missing"),
    ("unlisted", "has no golden outputs (built before they were stored): rebuild it to verify it"),
])
def test_missing_or_tampered_golden_files_are_refused_naming_the_file(bundle_copy, damage, message):
    if damage == "tamper":
        array = np.load(bundle_copy / "golden/score.npy")
        np.save(bundle_copy / "golden/score.npy", array + 1.0)  # same size, other bytes
    elif damage == "delete":
        (bundle_copy / "golden/inputs.npy").unlink()
    else:
        manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
        del manifest["golden"]
        (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = run_cli("verify", bundle_copy)
    assert result.exit_code == 3
    assert result.stderr.startswith("error: ") and result.stderr.rstrip().endswith(message)
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_a_backend_that_cannot_run_is_named_after_the_others_report(small_bundle):
    result = run_cli("verify", small_bundle, "--backend", "onnxruntime", "--backend", "tensorrt")
    assert result.exit_code == 3  # the bundle has no engine: the loader's own exit code
    assert "onnxruntime" in result.stdout and "PASS" in result.stdout
    assert result.stderr == (f"error: backend not run: tensorrt: {small_bundle} has no TensorRT engine: "
                             f"run `protoad-export compile {small_bundle}` on the target machine\n")


# A line PC: every import of torch, timm or torchvision fails.
NO_TORCH = """
import sys
startup = set(sys.modules)  # what site and .pth files load, whatever runs after
for name in ("torch", "timm", "torchvision"):
    sys.modules[name] = None
sys.argv = ["protoad-export", *sys.argv[1:]]
from protoad_export.cli import main
try:
    main()
finally:
    loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "timm", "torchvision"))
    assert not loaded, loaded
    import json, os
    if os.environ.get("MODULES_OUT"):
        with open(os.environ["MODULES_OUT"], "w") as handle:
            json.dump(sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None and m not in startup}), handle)
"""


def run_without_torch(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def line_distributions() -> set[str]:
    """requirements/line.txt and everything those packages require (their own dependencies)."""
    import re
    from importlib import metadata

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

    todo = [name(r) for r in (REPO / "requirements" / "line.txt").read_text().splitlines() if r.strip() and not r.startswith("#")]
    seen = set()
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [name(r) for r in requires if "extra ==" not in r]
    return seen


@pytest.mark.slow
def test_verify_and_predict_run_where_torch_cannot_be_imported(small_bundle, small_category, tmp_path):
    result = run_without_torch("verify", small_bundle)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime-fp16" in result.stdout and result.stdout.count("PASS") == 2
    images = sorted((small_category / "test" / "crack").iterdir())[:2] + sorted((small_category / "test" / "good").iterdir())[:1]
    modules = tmp_path / "modules.json"
    result = run_without_torch("predict", small_bundle, *images, "--out", tmp_path / "pred", "--threshold", "0.5",
                               "--quiet", env={"MODULES_OUT": str(modules)})
    assert result.returncode == 0, result.stderr
    # requirements/line.txt covers every third-party package predict imports.
    from importlib import metadata

    owners = metadata.packages_distributions()
    imported = {d.lower().replace("_", "-") for m in json.loads(modules.read_text()) if m != "protoad_export"
                for d in owners.get(m, [])}
    assert imported and imported <= line_distributions(), imported - line_distributions()
    rows = json.loads((tmp_path / "pred" / "results.json").read_text())["images"]
    assert [r["decision"] in ("good", "defective") for r in rows] == [True] * 3
    assert (tmp_path / "pred" / "heatmaps" / f"{images[0].stem}.png").is_file()
    # A backend that needs torch says so in one line.
    result = run_without_torch("verify", small_bundle, "--backend", "torch")
    assert result.returncode == 4
    assert result.stderr == ("error: backend not run: torch: the torch backend needs PyTorch, which is not installed "
                             "here: use --backend onnxruntime (or tensorrt)\n")


@pytest.mark.slow
def test_runtime_load_and_infer_without_torch(small_bundle):
    script = NO_TORCH.split("sys.argv")[0] + f"""
import numpy as np
from protoad_export import runtime
rt = runtime.load({str(small_bundle)!r}, backend="onnxruntime")
inputs = np.load({str(small_bundle / "golden" / "inputs.npy")!r})
out = rt.infer(inputs, threshold=0.5)
print(out.maps.shape, out.scores.dtype, out.decisions.tolist())
assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "float32" in result.stdout
