"""``protoad-export bench``: fidelity and speed on a small bundle, JSON, and tolerance failures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from protoad_export.bundle import read_manifest
from protoad_export.evaluation.bench import load_test_images
from protoad_export.evaluation.timing import Stats, time_cpu
from protoad_export.cli import main
from protoad_export.errors import InputError, MissingDependencyError, ToleranceError

REPO = Path(__file__).resolve().parents[1]


def test_bench_prints_fidelity_and_speed_and_writes_json(small_bundle, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "bench", str(small_bundle), "--backend", "onnxruntime", "--backend", "onnxruntime-fp16", "--device", "cpu",
        "--limit", "6", "--fps", "--batch-sizes", "1,2", "--warmup", "0", "--iterations", "2", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "fidelity vs PyTorch FP32 (6 images" in result.output and "PASS" in result.output
    assert "speed (ms per batch" in result.output
    report = json.loads(out.read_text())
    assert report["data"]["images"] == 6 and report["data"]["defective"] > 0
    assert report["reference"]["image_auroc"] is not None and report["reference"]["pixel_auroc"] is not None
    fid = {f["backend"]: f for f in report["fidelity"]}
    assert set(fid) == {"onnxruntime", "onnxruntime-fp16"}
    assert all(f["passed"] and f["map_max_abs"] >= f["map_mean_abs"] >= 0 for f in fid.values())
    assert fid["onnxruntime"]["map_max_abs"] < 1e-4
    cases = {(s["backend"], s["batch"]) for s in report["speed"]}
    assert cases == {(b, n) for b in ("torch", "onnxruntime", "onnxruntime-fp16") for n in (1, 2)}
    for s in report["speed"]:
        e = s["end_to_end"]
        assert 0 < e["min"] <= e["median"] <= e["p90"] <= e["p99"] <= e["max"] and s["throughput"] > 0
        assert s["compute"] is None  # CPU: no separate GPU compute time
    assert "cpus" in report["machine"]


def test_bench_exits_non_zero_when_a_tolerance_is_exceeded(small_bundle, tmp_path):
    out = tmp_path / "fail.json"
    result = CliRunner().invoke(main, [
        "bench", str(small_bundle), "--backend", "onnxruntime-fp16", "--device", "cpu", "--limit", "3",
        "--atol", "0", "--rtol", "0", "--json", str(out),
    ])
    assert result.exit_code == ToleranceError.exit_code
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: fidelity check failed: onnxruntime-fp16: map error")
    assert "Traceback" not in result.output
    report = json.loads(out.read_text())  # the report is written before the exit
    assert report["fidelity"][0]["passed"] is False


def test_a_named_backend_that_cannot_run_fails_after_the_report(small_bundle, tmp_path):
    """By default bench skips what this machine lacks; a backend named with --backend that is
    skipped (no TensorRT engine here) must not exit 0 as if it had been measured."""
    out = tmp_path / "trt.json"
    result = CliRunner().invoke(main, ["bench", str(small_bundle), "--backend", "onnxruntime", "--backend", "tensorrt",
                                       "--device", "cpu", "--limit", "2", "--json", str(out)])
    assert result.exit_code == MissingDependencyError.exit_code, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: requested backend not run: tensorrt: ") and "Traceback" not in result.output
    assert sum(line.startswith("error:") for line in lines) == 1
    report = json.loads(out.read_text())  # written before the exit, with what did run
    assert [f["backend"] for f in report["fidelity"]] == ["onnxruntime"] and report["fidelity"][0]["passed"]
    assert list(report["skipped"]) == ["tensorrt"] and report["requested"] == ["onnxruntime", "tensorrt"]


def test_bench_bad_input_is_one_line(small_bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["bench", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "bundle not found" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["bench", str(small_bundle), "--batch-sizes", "1,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output
    result = runner.invoke(main, ["bench", str(small_bundle), "--data", str(tmp_path / "missing")])
    assert result.exit_code == InputError.exit_code and "data folder not found" in result.output


def test_test_images_from_manifest_folder_or_nothing(small_bundle, small_category, tmp_path):
    manifest = read_manifest(small_bundle)
    images = load_test_images(manifest, None, limit=4)
    assert len(images.paths) == 4 and images.test is not None and images.test.masks.shape[1:] == (224, 224)
    assert 0 < images.test.labels.sum() < 4  # the even spread keeps both classes
    plain = load_test_images(manifest, small_category / "test" / "crack")
    assert plain.test is None and len(plain.paths) == 3
    with pytest.raises(InputError, match="pass --data"):
        load_test_images({**manifest, "test_data": None}, None)


def test_stats_and_cpu_timing():
    s = Stats.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.mean, s.median, s.min, s.max) == (22.0, 3.0, 1.0, 100.0)
    assert s.median <= s.p90 <= s.p99 <= s.max

    class Dummy:
        def predict(self, images):
            return images[:, 0], images.max(axis=(1, 2, 3))

    res = time_cpu(Dummy(), np.zeros((4, 3, 8, 8), np.float32), "dummy", warmup=1, iterations=5)
    assert res.batch == 4 and res.iterations >= 5 and res.throughput > 0 and res.compute is None


def test_gpu_bench_script_is_valid_bash_and_dry_runs():
    script = REPO / "benchmarks" / "gpu_bench.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(script), "--dry-run"], check=True, capture_output=True, text=True, cwd=REPO).stdout
    assert "protoad-export build" in out and "--weights random" in out and "wide_resnet50_2" in out
    assert "protoad-export bench" in out and "--fps" in out
    # The full-scale targets: whole train set with wide_resnet50_2, exact kNN over every patch.
    assert "--name wide_resnet50_2_full" in out and "--baseline knn --device cuda" in out
    # The timed stages first, in order: PyTorch speed, chunk sizes, the full-set GPU build (under
    # timeout), then the unbounded extended runs.
    speed, chunks = out.index("gpu_speed.py speed"), out.index("gpu_speed.py chunks")
    assert speed < chunks < out.index("--name wide_resnet50_2_full") < out.index("--name efficientnet_lite0_random")
    assert "--batches 1,8,32" in out and "--deadline" in out and "timeout" in out
    assert "prototype_chunks.py" in out and "--torch-device cuda" in out
    quick = subprocess.run(["bash", str(script), "--dry-run", "--quick"], check=True, capture_output=True, text=True,
                           cwd=REPO).stdout
    assert "--batches 1,8 " in quick and "wide_resnet50_2_full" not in quick
