"""Memory and disk that a build needs, checked before any work starts.

A product line's category can hold thousands of images: with ``wide_resnet50_2`` that is millions
of 1792-dim patch features. Features stream to disk, but FINCH's CPU search keeps a 16-bit copy of
every clustered feature in memory (``ivf.py``). Without these checks a build that cannot fit
extracts features for minutes and is then killed by the kernel's out-of-memory killer (no
message) or fills the disk; with them it stops at once with one line that names a remedy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from ..errors import ResourceError
from ..clustering.finch import EXACT_CPU_LIMIT

# The plan is SLACK x the bytes held per value + RESERVE (the IVF's pair tables, chunks, the ONNX
# export after FINCH). Measured growth of whole builds after this check (RESULTS.md section 3):
# 1.52 GiB for a 0.78 GiB copy (efficientnet_lite0, 762 images), 2.55 for 2.09 (wide_resnet50_2,
# 200 images), ~9.0 for 7.98 (wide_resnet50_2, 762 images); this plan gives 1.86, 3.30 and 9.78.
MEMORY_SLACK = 1.1
MEMORY_RESERVE = 1 << 30
# Disk: the FP16 features x DISK_SLACK, plus the engine's own files (engine_file_bytes), plus
# DISK_FLOOR for the manifest, temporary names and file system overhead. The reserve thus grows
# with the job: a fixed 256 MiB (until 2026-12-05) refused a 20 MB build on a nearly full disk and
# undercounted a wide_resnet50_2 engine's ~300 MB of ONNX files.
DISK_SLACK = 1.05
DISK_FLOOR = 16 << 20
# Bench: the host memory of one timed batch per image (engine_batch_bytes) x BATCH_SLACK, for the
# backbone's intermediate activations beside the features, plus BATCH_RESERVE.
BATCH_SLACK = 2.0
BATCH_RESERVE = 256 << 20


_CGROUP_FILES = {  # limit, usage, stats, the stat of reclaimable file cache
    "v2": ("memory.max", "memory.current", "memory.stat", "inactive_file"),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file"),
}


def _own_cgroups(cgroup: Path, proc_cgroup: Path) -> list[tuple[str, Path]]:
    """This process's memory cgroup folders (v2 and v1), each from its own up to the root: a
    container's limit may sit on any of them."""
    own = {"v2": Path("/"), "v1": Path("/")}
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                own["v2"] = Path(path)
            elif "memory" in controllers.split(","):
                own["v1"] = Path(path)
    except (OSError, ValueError):
        pass
    found = []
    for version, base in (("v2", cgroup), ("v1", cgroup / "memory")):
        found += [(version, base / p.relative_to("/")) for p in (own[version], *own[version].parents)]
    return found


def available_memory(meminfo: str | Path = "/proc/meminfo", cgroup: str | Path = "/sys/fs/cgroup",
                     proc_cgroup: str | Path = "/proc/self/cgroup") -> int | None:
    """Bytes this process can still take: the kernel's ``MemAvailable``, lowered to what the
    tightest limit of its cgroups (v2 or v1: a container's) leaves, that limit less the cgroup's
    usage without reclaimable file cache. ``None`` where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for version, folder in _own_cgroups(Path(cgroup), Path(proc_cgroup)):
        limit, usage, stat, inactive = _CGROUP_FILES[version]
        try:
            text = (folder / limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # no limit here
                continue
            cache = 0
            for line in (folder / stat).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == inactive:
                    cache = int(value)
            found.append(int(text) - (int((folder / usage).read_text()) - cache))
        except (OSError, ValueError):
            continue
    return max(0, min(found)) if found else None


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that ``path`` (or its first existing parent) is on."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _finch_bytes_per_value(fits_exact: bool, on_cpu: bool) -> float:
    # CPU: the IVF's 16-bit copy (exact search of a few rows: FP32); it is freed before the
    # level-0 cluster means (FP32, N/3.3 rows here: ~1.2 bytes per value) and their own search.
    # GPU: the exact search's rows live on the GPU; the host holds those means.
    return (4.0 if fits_exact else 2.0) if on_cpu else 1.5


def finch_memory(n: int, dim: int, sampled: bool, on_cpu: bool) -> int:
    """Bytes of host memory FINCH typically takes for ``n`` clustered features of ``dim`` values
    (``sampled``: a --max-train-patches sample read into memory first; ``on_cpu``: the CPU search,
    else exact search on a GPU)."""
    per_value = _finch_bytes_per_value(n <= EXACT_CPU_LIMIT, on_cpu) + (2 if sampled else 0)
    return int(MEMORY_SLACK * per_value * n * dim) + MEMORY_RESERVE


def engine_file_bytes(backbone_parameters: int, prototypes: int, dim: int) -> int:
    """Bytes of an engine's own files: the backbone's weights in the FP32 and FP16 ONNX graphs (6
    bytes each) and the prototypes in prototypes.npy, both graphs (4 + 4 + 2 bytes per value)."""
    return 6 * int(backbone_parameters) + 10 * int(prototypes) * int(dim)


def check_build_resources(n_features: int, n_clustered: int, dim: int, out: str | Path, on_cpu: bool,
                          max_prototypes: int, memory: int | None = None, disk: int | None = None,
                          *, engine_bytes: int = 0) -> None:
    """Raise ResourceError now when the disk under ``out`` cannot hold ``n_features`` FP16 features
    of ``dim`` values and the engine's files (``engine_bytes``, see :func:`engine_file_bytes`), or
    memory (``memory``: what is available, read here when ``None``) cannot hold FINCH on
    ``n_clustered`` of them; the memory message names the --max-train-patches that fits."""
    disk = free_disk(out) if disk is None else disk
    need_disk = int(DISK_SLACK * 2 * n_features * dim) + int(engine_bytes) + DISK_FLOOR
    if need_disk > disk:
        raise ResourceError(f"the features of this build ({n_features:,} patches x {dim} FP16 values) need about "
                            f"{need_disk / 2**30:.1f} GiB of disk beside {out}, {disk / 2**30:.1f} GiB is free: "
                            "free some space, use another --out, or fewer images")
    memory = available_memory() if memory is None else memory
    sampled = n_clustered < n_features
    need = finch_memory(n_clustered, dim, sampled, on_cpu)
    if memory is None or need <= memory:
        return
    # The largest sample that fits: a sample costs its FP16 rows on top of what FINCH holds.
    per_value = MEMORY_SLACK * (2 + _finch_bytes_per_value(fits_exact=False, on_cpu=on_cpu))
    fits = int((memory - MEMORY_RESERVE) / (per_value * dim)) if memory > MEMORY_RESERVE else 0
    remedy = (f"pass --max-train-patches {fits} (a seeded uniform sample), use fewer images or a smaller backbone"
              if fits >= max_prototypes else "use a machine with more memory or a smaller backbone")
    raise ResourceError(f"FINCH on {n_clustered:,} patch features of {dim} dims needs about {need / 2**30:.1f} GiB of "
                        f"memory, {memory / 2**30:.1f} GiB is available: {remedy}")


def engine_batch_bytes(manifest: dict) -> int:
    """Host memory per image of a batch through an engine: the float32 input and anomaly map, the
    patch features and one chunk of prototype similarities (network.py), x BATCH_SLACK."""
    crop = int(manifest["preprocessing"]["crop"])
    cells = int(manifest["train"]["grid"][0]) * int(manifest["train"]["grid"][1])
    protos = manifest["prototypes"]
    chunk = min(int(protos["count"]), int(protos.get("chunk", protos["count"])))
    return int(BATCH_SLACK * 4 * (4 * crop * crop + (int(protos["dim"]) + chunk) * cells))


def check_batch_memory(batch_sizes: Sequence[int], manifest: dict, *, memory: int | None = None) -> None:
    """Raise ResourceError before a bench when the largest of ``batch_sizes`` cannot be held in
    memory (``memory``: what is available, read here when ``None``); the message names the largest
    batch that fits."""
    memory = available_memory() if memory is None else memory
    largest = max(batch_sizes)
    per_image = engine_batch_bytes(manifest)
    need = largest * per_image + BATCH_RESERVE
    if memory is None or need <= memory:
        return
    fits = max(0, (memory - BATCH_RESERVE) // per_image)
    remedy = f"use --batch-sizes of at most {fits:,}" if fits >= 1 else "use a machine with more memory"
    raise ResourceError(f"a batch of {largest:,} images needs about {need / 2**30:.1f} GiB of memory "
                        f"({per_image / 2**20:.1f} MiB per image), {memory / 2**30:.1f} GiB is available: {remedy}")
