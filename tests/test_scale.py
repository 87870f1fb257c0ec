"""Scale: FINCH on a disk-backed array keeps its memory well below loading it, and the
``--max-train-patches`` sampling rule."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from protoad_export.builder import BuildConfig
from protoad_export.errors import InputError
from protoad_export.prototypes import sample_rows

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from protoad_export import finch as F

    path, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n // 20, dim)).astype(np.float32)
    with open(path, "wb") as f:  # plain writes: building the file adds nothing to our RSS
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, 4096):
            m = min(4096, n - start)
            x = centres[rng.integers(0, len(centres), m)] + 0.3 * rng.normal(size=(m, dim)).astype(np.float32)
            f.write((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).tobytes())
    F._CHUNK_BYTES = 1 << 22  # small chunks, so the bound is about the design and not the chunk size
    data = np.load(path, mmap_mode="r")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = F.finch(data, stop_below=500)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"grew": after - before, "bytes": data.nbytes, "sizes": result.partition_sizes,
                      "methods": result.neighbour_methods}))
    """
)


def test_finch_on_a_memmap_stays_below_its_size(tmp_path):
    """Peak RSS growth during FINCH on a 100 MiB FP16 memmap: the FP16 index (1x the array) plus
    chunks. Loading it whole as FP32 (what finch-clust does) or keeping its pages mapped would
    each add another 2x or 1x on top; N x N would be 80 GB."""
    n, dim = 100_000, 512
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "x.npy"), str(n), str(dim)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["methods"][0] == "approx" and r["sizes"][-1] < 500
    assert r["grew"] < 1.4 * r["bytes"], r


def test_sample_rows_is_deterministic_uniform_and_sorted():
    assert sample_rows(1000, None) is None
    assert sample_rows(1000, 1000) is None
    a, b = sample_rows(100_000, 5000), sample_rows(100_000, 5000)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 5000 and (np.diff(a) > 0).all()
    # Uniform: every tenth of the rows gets close to a tenth of the sample.
    counts = np.bincount(a // 10_000, minlength=10)
    assert counts.min() > 400 and counts.max() < 600
    with pytest.raises(InputError):
        sample_rows(10, 1)


def test_build_config_validates_max_train_patches():
    assert BuildConfig(backbone="efficientnet_lite0").max_train_patches is None
    assert BuildConfig(backbone="efficientnet_lite0", max_train_patches=50_000).max_train_patches == 50_000
    for bad in (100, 1.5e5, True, "100000"):
        with pytest.raises(InputError):
            BuildConfig(backbone="efficientnet_lite0", max_train_patches=bad)


def test_cli_passes_max_train_patches(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from protoad_export import builder
    from protoad_export.cli import main

    seen = {}

    def fake_build(data, name, out, config, **kwargs):
        seen["config"] = config
        raise InputError("stop here")

    monkeypatch.setattr(builder, "build", fake_build)
    result = CliRunner().invoke(main, ["build", str(tmp_path), "--name", "x", "--backbone", "efficientnet_lite0",
                                       "--max-train-patches", "200000"])
    assert seen["config"].max_train_patches == 200_000, result.output
