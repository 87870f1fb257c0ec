"""TensorRT: compile ``model.fp16.onnx`` into an engine (TensorRT 10.x and 11.x); ``runtime.tensorrt`` runs it.

The FP16 ONNX graph carries its precision as explicit casts (see ``network.py``), so it is built as
a *strongly typed* network on both major versions: TensorRT 11 only builds strongly typed networks
and has no FP16 builder flag; on 10.x the STRONGLY_TYPED creation flag gives the same engine.

API sources, checked for both versions (see the report in ``benchmarks/results/engines.md``):
- Python API reference, Builder / NetworkDefinitionCreationFlag:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
- Migrating 10.x -> 11.x (Python), removed APIs (BuilderFlag.FP16 ...):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
- IParserError (desc, node, nodeName, nodeOperator; 10.x C++ reference, mirrored in Python):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvonnxparser_1_1_i_parser_error.html
- Timing cache (createTimingCache / setTimingCache / serialize), "Optimizing Builder Performance":
  https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/performance/builder-performance.html
- IExecutionContext tensor-name API (setInputShape, setTensorAddress, enqueueV3, getTensorShape):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_execution_context.html
- Sources (NVIDIA/TensorRT, release/10.9, 10.16, 11.0, 11.1): ``include/NvInfer.h`` (flags,
  createTimingCache / setTimingCache), ``python/src/infer/pyCore.cpp`` (the Python bindings),
  trtexec's ``shared/utils/cacheUtils.cpp`` and ``samples/common/sampleDevice.h`` (thread-local
  graph capture), Polygraphy's ``backend/trt/loader.py`` and ``runner.py``; PyTorch's
  ``aten/src/ATen/cuda/CUDAGraph.cpp`` (replay on the current stream). ``tests/fake_tensorrt.py``
  mirrors what was checked.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable


from ..bundle import atomic_write_bytes, read_manifest, verify_file, write_manifest
from ..contract import InputContract
from ..errors import ArtifactError, InputError, MissingDependencyError

SUPPORTED_MAJORS = (10, 11)
# One timing cache per TensorRT version and GPU (see timing_cache_name): a cache of another version
# cannot be read (createTimingCache gives nullptr) and one of another GPU is refused, so sharing
# one file would make every build on a second GPU throw away the first GPU's timings.
TIMING_CACHE_SUFFIX = ".timing.cache"
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's own default; 5 searches longer for a few % more speed
# tensorrt-cuXX wheels per CUDA major; plain `tensorrt` follows the newest CUDA (13 since 11.x).
TENSORRT_EXTRAS = {12: "tensorrt-cu12", 13: "tensorrt-cu13"}


# --------------------------------------------------------------------------------------------
# Environment


def _torch_cuda_version() -> str | None:
    try:
        import torch
    except ImportError:  # a line PC without PyTorch
        return None
    return torch.version.cuda


def install_hint() -> str:
    """The pip command installing the TensorRT build for torch's CUDA (``torch.version.cuda``)."""
    cuda = _torch_cuda_version()
    try:
        major = int(str(cuda).split(".")[0])
    except ValueError:
        major = None
    extra = TENSORRT_EXTRAS.get(major)
    if extra is None:
        return "pip install 'protoad-export[tensorrt-cu13]' or '[tensorrt-cu12]', matching your CUDA"
    return f"pip install 'protoad-export[{extra}]' for torch's CUDA {cuda}"


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(
            f"TensorRT is not installed ({install_hint()}); the ONNX files are ready to compile on the target machine"
        ) from None
    return trt


def trt_major(trt) -> int:
    """Major version from ``trt.__version__`` ("10.9.0.34" -> 10)."""
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise MissingDependencyError(f"cannot read the TensorRT version {trt.__version__!r}") from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_info() -> dict[str, str]:
    """Name and compute capability of the current CUDA device."""
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def gpu_slug(name: str) -> str:
    """A file-name-safe GPU tag: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def missing_requirements() -> str | None:
    """``None`` when engines can be compiled here, otherwise what is missing (one short phrase)."""
    try:
        trt = _import_tensorrt()
    except MissingDependencyError:
        return f"TensorRT is not installed ({install_hint()})"
    major = trt_major(trt)
    if major not in SUPPORTED_MAJORS:
        return f"TensorRT {trt.__version__} is not supported (10.x or 11.x needed)"
    if not _cuda_available():
        return "no CUDA GPU is visible"
    return None


# --------------------------------------------------------------------------------------------
# Compile


def network_flags(trt) -> int:
    """Network creation flags giving a strongly typed network on this TensorRT.

    10.x: EXPLICIT_BATCH (= 0) is deprecated and ignored (networks are always explicit batch since
    10.0); STRONGLY_TYPED (= 1) must be asked for (``NvInfer.h``, NetworkDefinitionCreationFlag).
    11.x: strong typing is always on; STRONGLY_TYPED is still there (= 0, deprecated, ignored:
    ``NvInfer.h`` release/11.0 and 11.1), so no flag is needed.
    """
    if trt_major(trt) == 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _parser_error_text(error) -> str:
    # node_name / node_operator exist since TensorRT 10.0 (IParserError::nodeName, nodeOperator).
    desc = " ".join(str(error.desc()).split())  # the CLI prints one line
    node = error.node()
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = f"node {node}" if node >= 0 else "the graph"
    if name or op:
        where += f" {name!r}" + (f" ({op})" if op else "")
    return f"{where}: {desc}"


def parse_onnx(trt, network, logger, path: Path) -> None:
    """Parse ``path`` into ``network``; raise ArtifactError naming the failing node."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(path)):
        return
    count = parser.num_errors
    if count == 0:
        raise ArtifactError(f"TensorRT could not parse {path.name} (no parser error was reported)")
    first = _parser_error_text(parser.get_error(0))
    more = f" (+{count - 1} more parser errors)" if count > 1 else ""
    raise ArtifactError(f"TensorRT cannot parse {path.name} at {first}{more}")


def _engine_entries(manifest: dict) -> dict[str, dict]:
    return dict(manifest.get("tensorrt", {}).get("engines", {}))


def timing_cache_name(version: str, slug: str) -> str:
    """``tensorrt-10.9.0.34.nvidia-h100-80gb-hbm3.timing.cache``: one per TensorRT version and GPU."""
    return f"tensorrt-{gpu_slug(version)}.{slug}{TIMING_CACHE_SUFFIX}"


def attach_timing_cache(trt, config, path: Path, log: Callable[[str], None]) -> bool:
    """Start the build from the timing cache at ``path``; return whether the build may save over it.

    ``create_timing_cache`` gives None for a blob this TensorRT cannot read (trtexec's
    cacheUtils.cpp checks for nullptr) and ``set_timing_cache(cache, False)`` refuses a cache of
    another device; either way the build starts from an empty cache with one warning. A refused
    cache of another device is kept as it is (False), an unreadable one may be replaced (True).
    ignore_mismatch stays False: another GPU's timings must not steer tactic choice here.
    """
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None:
        log(f"warning: TensorRT {trt.__version__} cannot read the timing cache {path.name}; building without it")
        config.set_timing_cache(config.create_timing_cache(b""), False)
        return True
    if not config.set_timing_cache(cache, False):
        log(f"warning: the timing cache {path.name} is of another GPU; building without it and leaving it as it is")
        config.set_timing_cache(config.create_timing_cache(b""), False)
        return False
    return True


def compile_engine(
    bundle_dir: str | Path,
    batch_profile: tuple[int, int, int] | None = None,
    workspace_gib: float | None = None,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Build ``model.fp16.<gpu>.engine`` from ``model.fp16.onnx`` and record it in the manifest.

    ``batch_profile`` (MIN, OPT, MAX) defaults to the one recorded at build time; ``workspace_gib``
    caps TensorRT's scratch memory (default: TensorRT's, the whole GPU). Returns the manifest entry.
    """
    log = log or (lambda _msg: None)
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, verify=True)
    missing = missing_requirements()
    if missing:
        raise MissingDependencyError(f"cannot compile here: {missing}; the ONNX files in {bundle_dir} are ready to compile on the target machine")
    lo, opt, hi = _batch_profile(manifest, batch_profile)
    if not 0 <= optimization_level <= 5:
        raise InputError(f"builder optimization level must be 0..5, got {optimization_level}")
    entry = manifest["onnx"].get("fp16")
    if entry is None:
        raise ArtifactError(f"{bundle_dir} has no FP16 ONNX file to compile")
    onnx_path = verify_file(bundle_dir, manifest, entry["file"])
    contract = InputContract.from_manifest(manifest)

    trt = _import_tensorrt()
    info = gpu_info()
    slug = gpu_slug(info["gpu"])
    filename = f"model.fp16.{slug}.engine"
    log(f"compiling {onnx_path.name} with TensorRT {trt.__version__} for {info['gpu']} (sm {info['compute_capability']}), "
        f"batch {lo}:{opt}:{hi}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parse_onnx(trt, network, logger, onnx_path)

    config = _builder_config(trt, builder, contract, batch_profile=(lo, opt, hi), workspace_gib=workspace_gib,
                             optimization_level=optimization_level)

    # The timing cache lives beside the engines and is not listed in the manifest's files: it
    # changes with every build and only speeds builds up.
    cache_name = timing_cache_name(str(trt.__version__), slug)
    cache_path = bundle_dir / cache_name
    save_cache = attach_timing_cache(trt, config, cache_path, log)

    seconds = _build_plan(builder, network, config, onnx_name=onnx_path.name, engine_path=bundle_dir / filename,
                          cache_path=cache_path if save_cache else None)

    record = {
        "file": filename, "precision": "fp16", "strongly_typed": True,
        "tensorrt": str(trt.__version__), "gpu": info["gpu"], "compute_capability": info["compute_capability"],
        "batch_profile": {"min": lo, "opt": opt, "max": hi},
        "workspace_bytes": None if workspace_gib is None else int(workspace_gib * (1 << 30)),
        "optimization_level": optimization_level, "build_seconds": round(seconds, 3),
        "timing_cache": cache_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _record_engine(bundle_dir, manifest, slug, record)
    log(f"engine: {bundle_dir / filename} ({seconds:.1f} s)")
    return record


def _build_plan(builder, network, config, *, onnx_name: str, engine_path: Path, cache_path: Path | None) -> float:
    """Build the plan, write it to ``engine_path`` (and the timing cache to ``cache_path`` if
    given); return the build's seconds."""
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_name} (see the TensorRT messages above)")
    atomic_write_bytes(engine_path, bytes(memoryview(plan)))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return seconds


def _batch_profile(manifest: dict, batch_profile: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """``batch_profile`` (MIN, OPT, MAX), or the one recorded at build time, checked."""
    if batch_profile is None:
        bp = manifest["batch_profile"]
        batch_profile = (int(bp["min"]), int(bp["opt"]), int(bp["max"]))
    lo, opt, hi = batch_profile
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
    return lo, opt, hi


def _builder_config(trt, builder, contract: InputContract, *, batch_profile: tuple[int, int, int],
                    workspace_gib: float | None, optimization_level: int):
    """A builder config with the workspace cap, optimization level and one batch profile."""
    lo, opt, hi = batch_profile
    config = builder.create_builder_config()
    if workspace_gib is not None:
        if workspace_gib <= 0:
            raise InputError(f"workspace must be positive, got {workspace_gib} GiB")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    profile = builder.create_optimization_profile()
    profile.set_shape(contract.name, contract.shape(lo), contract.shape(opt), contract.shape(hi))
    config.add_optimization_profile(profile)
    return config


def _record_engine(bundle_dir: Path, manifest: dict, slug: str, record: dict) -> None:
    """Write the manifest with ``record`` as this GPU's engine entry."""
    # The manifest was verified on entry; a recompile replaces this GPU's engine and its checksum.
    engines = _engine_entries(manifest)
    engines[slug] = record
    manifest["tensorrt"] = {"engines": engines}
    manifest["files"] = {**manifest.get("files", {}), record["file"]: None}
    write_manifest(bundle_dir, manifest)
