"""Scale: FINCH on a disk-backed array keeps its memory well below loading it, and the
``--max-train-patches`` sampling rule."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from protoad_export.build.pipeline import BuildConfig
from protoad_export.data.images import Preprocessing
from protoad_export.errors import InputError
from protoad_export.clustering.prototypes import near_miss, sample_rows

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    from protoad_export.clustering import finch as F, ivf, neighbours

    path, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n // 20, dim)).astype(np.float32)
    with open(path, "wb") as f:  # plain writes: building the file adds nothing to our RSS
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)})
        for start in range(0, n, 4096):
            m = min(4096, n - start)
            x = centres[rng.integers(0, len(centres), m)] + 0.1 * rng.normal(size=(m, dim)).astype(np.float32)
            f.write((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).tobytes())
    neighbours.CHUNK_BYTES = 1 << 22  # small chunks and blocks: the bound is about the design, not them
    neighbours.BLOCK_ELEMENTS = 1 << 20
    ivf.IVF_TRAIN_PER_LIST = 5
    ivf.EXHAUSTIVE_LIMIT = 0  # keep the capped nprobe, never scan every list
    ivf.IVF_SCAN_OPS = 1e10  # and keep it short
    ivf.IVF_LISTS_PER_ROOT = 0.5
    data = np.load(path, mmap_mode="r")
    F.finch(np.asarray(data[:3000], dtype=np.float32), method="approx")  # BLAS/OpenMP buffers: not data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = F.finch(data, stop_below=500)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"grew": after - before, "bytes": int(data.nbytes), "sizes": result.partition_sizes,
                      "methods": result.neighbour_methods}))
    """
)


def test_finch_on_a_memmap_stays_below_its_size(tmp_path):
    """Peak RSS growth during FINCH on a 60 MB FP16 memmap: the index's 16-bit copy in two int8
    halves (1x the array) plus chunks and glibc's heap slack (1.36-1.54x measured in all).
    Loading it whole as FP32 (what finch-clust does) or keeping its pages mapped would each add
    another 2x or 1x on top; N x N would be 14 GB."""
    n, dim = 60_000, 512
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "x.npy"), str(n), str(dim)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["methods"][0].startswith("ivf") and r["sizes"][-1] < 500
    assert r["grew"] < 1.75 * r["bytes"], r


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


def test_near_miss_names_the_partition_passed_over_just_above_the_limit():
    # The full magnetic tile set's letterbox build (2026-11-28): 10,084 passed over for 1,904.
    assert near_miss([663_663, 174_301, 43_454, 10_084, 1_904], 10_000) == 10_084
    assert near_miss([655_192, 170_702, 42_297, 9_636], 10_000) is None  # landed under the limit
    assert near_miss([40_000, 9_000], 10_000) is None  # far above: no near miss
    assert near_miss([9_000], 10_000) is None
    assert near_miss([12_500, 2_000], 10_000) == 12_500 and near_miss([12_501, 2_000], 10_000) is None


def test_build_config_validates_max_train_patches():
    assert BuildConfig(backbone="efficientnet_lite0").max_train_patches is None
    assert BuildConfig(backbone="efficientnet_lite0", max_train_patches=50_000).max_train_patches == 50_000
    for bad in (100, 1.5e5, True, "100000"):  # 100: fewer patches than the paper's rule's 10,000 prototypes
        with pytest.raises(InputError):
            BuildConfig(backbone="efficientnet_lite0", max_prototypes=10_000, max_train_patches=bad)
    # auto keeps a FINCH level of the sample, so any sample of at least two patches will do.
    assert BuildConfig(backbone="efficientnet_lite0", max_train_patches=100).max_train_patches == 100
    with pytest.raises(InputError):
        BuildConfig(backbone="efficientnet_lite0", max_train_patches=1)


def test_cli_passes_max_train_patches(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from protoad_export.build import pipeline as builder
    from protoad_export.cli import main

    seen = {}

    def fake_build(data, name, out, config, **kwargs):
        seen["config"] = config
        raise InputError("stop here")

    monkeypatch.setattr(builder, "build", fake_build)
    result = CliRunner().invoke(main, ["build", str(tmp_path), "--name", "x", "--backbone", "efficientnet_lite0",
                                       "--max-train-patches", "200000"])
    assert seen["config"].max_train_patches == 200_000, result.output


@pytest.mark.slow
def test_build_clusters_the_sample_only(tmp_path, small_category):
    from protoad_export.build.pipeline import build

    config = BuildConfig(backbone="efficientnet_lite0", max_prototypes=500, max_train_patches=4000, batch_size=8,
                         input="tensor", preprocessing=Preprocessing(mode="crop"))
    result = build(small_category, "sampled", tmp_path, config, log=None, progress=False)
    train = result.manifest["train"]
    assert train["patches_clustered"] == 4000 and train["max_train_patches"] == 4000
    assert train["patches"] > 4000
    assert result.manifest["prototypes"]["count"] < 500
    assert result.manifest["finch"]["partition_sizes"][0] < 4000


def test_available_memory_reads_meminfo_and_both_cgroup_versions(tmp_path):
    from protoad_export.build.resources import available_memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:    8388608 kB\n")  # 8 GiB
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{4 << 30}\n")
    (v2 / "memory.current").write_text(f"{3 << 30}\n")
    (v2 / "memory.stat").write_text(f"anon 123\ninactive_file {1 << 30}\nactive_file 5\n")
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{16 << 30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{10 << 30}\n")
    (v1 / "memory" / "memory.stat").write_text(f"cache 9\ntotal_inactive_file {2 << 30}\n")
    # A container's limit less its usage without reclaimable cache: 4 - (3 - 1) GiB, below MemAvailable.
    root_only = tmp_path / "no_proc_cgroup"  # the cgroup roots alone
    assert available_memory(meminfo, v2, root_only) == 2 << 30
    assert available_memory(meminfo, v1, root_only) == 8 << 30  # 16 - (10 - 2) = 8 GiB: the same as MemAvailable
    (v2 / "memory.max").write_text("max\n")  # no limit: MemAvailable alone
    assert available_memory(meminfo, v2, root_only) == 8 << 30
    assert available_memory(tmp_path / "none", tmp_path / "none", root_only) is None
    # The process's own cgroup (from /proc/self/cgroup) and its parents: here a v2 limit two levels down.
    own = v2 / "system.slice" / "box"
    own.mkdir(parents=True)
    (own / "memory.max").write_text(f"{3 << 30}\n")
    (own / "memory.current").write_text(f"{2 << 30}\n")
    (own / "memory.stat").write_text("inactive_file 0\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/box\n")
    assert available_memory(meminfo, v2, proc) == 1 << 30
    proc.write_text("4:memory:/system.slice/box\n0::/\n")  # v1 names the memory controller's path
    assert available_memory(meminfo, v2, proc) == 8 << 30  # v2 at the root: no limit there


def test_a_build_that_cannot_fit_stops_before_any_work(tmp_path):
    """FINCH's plan (its 16-bit copy, 2 bytes per value on a CPU, plus a sample's FP16 rows) against
    the memory available: the message names a --max-train-patches that fits, and it does fit."""
    from protoad_export.errors import ResourceError
    from protoad_export.build.resources import check_build_resources, engine_file_bytes, finch_memory

    n, dim, gib = 2_389_632, 1792, 1 << 30  # the full magnetic tile set with wide_resnet50_2
    plan = finch_memory(n, dim, sampled=False, on_cpu=True)
    assert 2 * n * dim < plan < 2.6 * n * dim + gib  # the copy, with slack
    check_build_resources(n, n, dim, tmp_path, True, 10_000, memory=plan, disk=100 * gib)  # fits: no error
    with pytest.raises(ResourceError, match=r"^FINCH on 2,389,632 patch features of 1792 dims needs about 9\.8 GiB of "
                                            r"memory, 6\.0 GiB is available: pass --max-train-patches (\d+) ") as info:
        check_build_resources(n, n, dim, tmp_path, True, 10_000, memory=6 * gib, disk=100 * gib)
    fits = int(re.search(r"--max-train-patches (\d+)", str(info.value)).group(1))
    check_build_resources(n, fits, dim, tmp_path, True, 10_000, memory=6 * gib, disk=100 * gib)  # the sample fits
    with pytest.raises(ResourceError):
        check_build_resources(n, fits + 50_000, dim, tmp_path, True, 10_000, memory=6 * gib, disk=100 * gib)
    # On a GPU the rows live there: the host keeps the cluster means only.
    on_gpu = finch_memory(n, dim, sampled=False, on_cpu=False)
    assert on_gpu < plan
    check_build_resources(n, n, dim, tmp_path, False, 10_000, memory=on_gpu, disk=100 * gib)
    with pytest.raises(ResourceError):
        check_build_resources(n, n, dim, tmp_path, True, 10_000, memory=on_gpu, disk=100 * gib)
    with pytest.raises(ResourceError, match="more memory or a smaller backbone"):
        check_build_resources(n, n, dim, tmp_path, True, 10_000, memory=gib // 2, disk=100 * gib)
    # The disk holds the features and the engine's files: wide_resnet50_2's 24.9 M weights of stages 1-3.
    engine = engine_file_bytes(24_862_528, 10_000, dim)
    with pytest.raises(ResourceError, match=r"^the features of this build \(2,389,632 patches x 1792 FP16 values\) need "
                                            r"about 8\.7 GiB of disk beside .*, 5\.0 GiB is free"):
        check_build_resources(n, n, dim, tmp_path, True, 10_000, memory=100 * gib, disk=5 * gib, engine_bytes=engine)
