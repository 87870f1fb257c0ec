"""Bundles: atomic file writes, sha256 checksums and the manifest.

Every file is written under a temporary name in the destination folder and renamed into place, so
an interrupted build never leaves a partial file under a final name. A build writes into a fresh
staging directory and swaps it in as a whole at the end (see :func:`commit_directory`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ArtifactError, InputError, ResourceError
from .options import ALIGN_MODES, CHANNEL_ORDERS, INPUT_KINDS, RESIZE_MODES

MANIFEST_NAME = "manifest.json"
# 1: preprocessed float input only; 2: the input's kind and channel order, the frame geometry,
# golden outputs. Older manifests are read through upgrade_manifest, never rewritten by a read.
SCHEMA_VERSION = 2
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the final file the mode a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(final_dir: str | os.PathLike) -> Path:
    """The hidden lock file beside ``final_dir`` that a build of that name holds (``.NAME.lock``)."""
    final_dir = Path(final_dir)
    return final_dir.with_name(f".{final_dir.name}.lock")


def _try_lock(path: Path) -> int | None:
    """Open and ``flock`` ``path`` without waiting: the descriptor, or None when another process holds it.

    A lock file is only ever unlinked by a holder of its lock, so after locking, the path must
    still name the file locked; if a holder removed it meanwhile, the lock is on a dead file and
    the attempt starts over on the new one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def build_lock(final_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on the name ``final_dir`` for a build, or raise InputError at once when another
    process holds it (two builds of one name would otherwise both succeed and the last would win).

    The lock file is removed on the way out (a build killed with SIGKILL leaves it; the next build
    of the name takes it over and removes it).
    """
    path = lock_path(final_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _try_lock(path)
    if fd is None:
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise InputError(f"another build of {final_dir} is running{by}: wait for it to finish or choose another --name")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def remove_stale_work(final_dir: str | os.PathLike) -> list[Path]:
    """Remove staging and scratch folders that killed builds of ``final_dir`` left behind, and a
    lock file that nobody holds.

    Their names carry the builder's pid, so the folders of a build still running are kept.
    """
    final_dir = Path(final_dir)
    removed = []
    if not final_dir.parent.is_dir():
        return removed
    lock = lock_path(final_dir)
    if lock.is_file():
        fd = _try_lock(lock)  # refused while a build (this one included) holds it
        if fd is not None:
            lock.unlink()
            os.close(fd)
            removed.append(lock)
    for path in final_dir.parent.glob(f".{final_dir.name}.*"):
        parts = path.name[len(final_dir.name) + 2 :].split(".")
        if path.is_dir() and parts and parts[0].isdigit() and parts[-1] in ("staging", "scratch"):
            if not _pid_alive(int(parts[0])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _read_only_file_system(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # statvfs is POSIX only
        return False


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` as a folder to write into, checked before any work: an existing file there, or
    a file where a folder above it should be, is an InputError now rather than after the run, and
    a folder that cannot be written (a read-only file system or no write permission) a ResourceError
    (rather than a disk check's "0.0 GiB is free")."""
    path = Path(path)
    for at in (path, *path.parents):
        if at.exists():
            if not at.is_dir():
                raise InputError(f"{option} {path}: {at} is a file, not a folder")
            if _read_only_file_system(at):
                raise ResourceError(f"{option} {path}: {at} is on a read-only file system")
            if not os.access(at, os.W_OK | os.X_OK):
                raise ResourceError(f"{option} {path}: {at} is read-only for this user (no write permission)")
            break
    return path


def _bundle_entries(manifest: dict[str, Any]) -> set[str]:
    """The names a bundle may hold at its top level: its manifest, the files it lists (and the
    folders they are in, such as golden/) and the TensorRT timing caches beside the engines."""
    names = {MANIFEST_NAME, *(str(name).split("/")[0] for name in manifest.get("files", {}))}
    tensorrt = manifest.get("tensorrt")
    if isinstance(tensorrt, dict):
        caches = [tensorrt.get("timing_cache")]  # one shared cache, in bundles compiled before 2026-12-05
        engines = tensorrt.get("engines")
        caches += [e.get("timing_cache") for e in engines.values() if isinstance(e, dict)] if isinstance(engines, dict) else []
        names.update(c for c in caches if isinstance(c, str))
    return names


def replaceable_bundle(final_dir: str | os.PathLike, data: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Check that a build may write ``final_dir``: None when nothing is there, the old manifest when
    it is a bundle of this tool holding only its own files; otherwise InputError, nothing touched.

    A build replaces the folder as a whole, so anything else there (a data folder, a file, a
    symbolic link, a bundle with files added by hand) would be lost: it is refused instead. ``data``
    (the build's images) may be neither the folder nor inside it.
    """
    final_dir = Path(final_dir)
    if data is not None:
        target, source = final_dir.resolve(), Path(data).resolve()
        if source == target or target in source.parents:
            raise InputError(f"{final_dir} is the data folder {data} (or holds it): a build would replace it; "
                             "choose another --out or --name")
    if not final_dir.exists() and not final_dir.is_symlink():
        return None
    refuse = f"{final_dir} exists and is not a protoad-export bundle"
    if final_dir.is_symlink():
        raise InputError(f"{final_dir} is a symbolic link: a build will not replace it; choose another --name")
    if not final_dir.is_dir():
        raise InputError(f"{refuse} (it is a file): a build will not replace it; choose another --name")
    try:
        manifest = json.loads((final_dir / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("tool") != "protoad-export":
        raise InputError(f"{refuse} (no protoad-export {MANIFEST_NAME}): a build will not replace it; "
                         "choose another --out or --name")
    # Leftover temporary files of an interrupted atomic write are the tool's own, hidden and *.tmp.
    foreign = sorted(p.name for p in final_dir.iterdir()
                     if p.name not in _bundle_entries(manifest) and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"{final_dir} holds files its manifest does not list ({listed}): a build would delete "
                         "them; move them out or choose another --name")
    return manifest


def staging_directory(final_dir: str | os.PathLike, kind: str = "staging") -> Path:
    """A fresh hidden directory beside ``final_dir`` (``kind``: staging for the new engine
    directory, scratch for temporary features). Stale ones from killed builds are removed first.

    The staging directory becomes the bundle, so it gets the mode ``mkdir`` would give under the
    umask (``mkdtemp`` makes 0700, which other accounts, such as an inference service, cannot read);
    scratch stays private.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work(final_dir)
    path = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.{os.getpid()}.", suffix=f".{kind}", dir=final_dir.parent))
    if kind == "staging":
        os.chmod(path, 0o777 & ~_umask())
    return path


def commit_directory(staging: Path, final_dir: str | os.PathLike, *,
                     check: Callable[[Path], object] | None = None) -> None:
    """Replace ``final_dir`` by ``staging`` with renames only; ``check`` (default
    :func:`replaceable_bundle`) refuses what may not be replaced, once more just before the swap.

    The old directory is first renamed aside and removed after the new one is in place, so a kill
    at any moment leaves either the old or the new complete directory under the final name (or,
    between the two renames, the old one beside it under a ``.old`` name, which a loader reports).
    """
    final_dir = Path(final_dir)
    (check or replaceable_bundle)(final_dir)  # again at the swap: something may have been put there meanwhile
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.{os.getpid()}.old")
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Record the sha256 of every file in ``manifest['files']`` and write the manifest atomically."""
    bundle_dir = Path(bundle_dir)
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = {name: file_entry(bundle_dir / name) for name in sorted(manifest.get("files", {}))}
    atomic_write_json(bundle_dir / MANIFEST_NAME, manifest)


def upgrade_manifest(manifest: dict[str, Any], path: str | os.PathLike = MANIFEST_NAME) -> dict[str, Any]:
    """The manifest in the current schema: each older version's defaults filled in, one step per
    version, so that no reader needs to know what older bundles lacked."""
    version = manifest.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version!r}; this protoad-export reads versions 1 to {SCHEMA_VERSION}: rebuild the bundle"
        )
    manifest = json.loads(json.dumps(manifest))  # a copy: the caller's dict is not changed
    if version == 1:
        entry = manifest.get("input")
        if isinstance(entry, dict):
            entry.setdefault("kind", "tensor")
            entry.setdefault("channel_order", "rgb")
        protos = manifest.get("prototypes")
        if isinstance(protos, dict) and "chunk" not in protos and "count" in protos:
            protos["chunk"] = protos["count"]  # bundles from before the chunked conv: one conv
        backbone = manifest.get("backbone")
        if isinstance(backbone, dict) and backbone.get("name") == "efficientnet_lite0":
            # Bundles from before 2026-11-27 hosted the weights in timm's plain efficientnet_lite0.
            backbone.setdefault("architecture", "efficientnet_lite0")
        version = 2
    manifest["schema_version"] = version
    return manifest


def read_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Load and validate a manifest; with ``verify``, check every listed file's size and sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        aside = sorted(bundle_dir.parent.glob(f".{bundle_dir.name}.*.old")) if bundle_dir.parent.is_dir() else []
        hint = f" (a build killed while swapping directories left {aside[0]}: rename it back)" if aside else ""
        raise ArtifactError(f"bundle not found: {bundle_dir}{hint}")
    if not path.is_file():
        raise ArtifactError(f"{bundle_dir} has no {MANIFEST_NAME}: not a bundle")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise ArtifactError(f"{path} has no schema_version: not a protoad-export manifest")
    manifest = upgrade_manifest(manifest, path)
    check_manifest(manifest, path)
    if verify:
        for name in manifest.get("files", {}):
            verify_file(bundle_dir, manifest, name)
    return manifest


# The manifest's schema (what builder.build writes), checked by check_manifest. Bundles
# from older builds lack some optional fields (prototypes.chunk, backbone.architecture, holdout);
# every field a loader reads is required, so an edited or damaged manifest fails here, in one line
# naming the file and the field, instead of as a KeyError or an ONNX Runtime error mid-run.
STAGE1_STRIDE = 4  # every backbone's (backbones.BACKBONES): the patch grid is ceil(crop / 4)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _plain_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "/" not in value and "\\" not in value and value not in (".", "..")


def _bundle_file(value: Any) -> bool:
    """A file name, or one folder deep (``golden/score.npy``): never absolute, never leaving the bundle."""
    return isinstance(value, str) and 0 < value.count("/") + 1 <= 2 and all(_plain_name(p) for p in value.split("/"))


def _finite_triple(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_is_number(v) and math.isfinite(v) for v in value)


_FIELDS: tuple[tuple[str, bool, str, Any], ...] = (
    # (dotted field, required, what it must be, check)
    ("backbone", True, "an object", lambda v: isinstance(v, dict)),
    ("backbone.name", True, "a string", lambda v: isinstance(v, str)),
    ("backbone.weights", True, "a string", lambda v: isinstance(v, str)),
    ("backbone.weights_sha256", True, "a string or null", lambda v: v is None or isinstance(v, str)),
    ("backbone.architecture", False, "a string", lambda v: isinstance(v, str)),
    ("preprocessing", True, "an object", lambda v: isinstance(v, dict)),
    ("preprocessing.resize", True, "an integer", _is_int),
    ("preprocessing.crop", True, "an integer", _is_int),
    ("preprocessing.width", False, "an integer", _is_int),
    ("preprocessing.mode", True, "one of crop, squash, letterbox", lambda v: v in RESIZE_MODES),
    ("preprocessing.mean", True, "3 finite numbers", _finite_triple),
    ("preprocessing.std", True, "3 finite positive numbers", lambda v: _finite_triple(v) and min(v) > 0),
    ("align", True, f"one of {', '.join(ALIGN_MODES)}", lambda v: v in ALIGN_MODES),
    ("input", True, "an object", lambda v: isinstance(v, dict)),
    ("input.kind", False, "frames or tensor", lambda v: v in INPUT_KINDS),
    ("input.channel_order", False, f"one of {', '.join(CHANNEL_ORDERS)}", lambda v: v in CHANNEL_ORDERS),
    ("input.shape", True, "[batch, 3, crop, width] or [batch, height, width, channels]",
     lambda v: isinstance(v, list) and len(v) == 4 and all(_positive_int(x) for x in v[1:])),
    ("prototypes", True, "an object", lambda v: isinstance(v, dict)),
    ("prototypes.file", True, "a file name", _plain_name),
    ("prototypes.count", True, "a positive integer", _positive_int),
    ("prototypes.dim", True, "a positive integer", _positive_int),
    ("prototypes.chunk", False, "a positive integer", _positive_int),
    ("onnx", True, "an object", lambda v: isinstance(v, dict)),
    ("onnx.fp32", False, "an object with a file", lambda v: isinstance(v, dict) and _plain_name(v.get("file"))),
    ("onnx.fp16", False, "an object with a file", lambda v: isinstance(v, dict) and _plain_name(v.get("file"))),
    ("train", True, "an object", lambda v: isinstance(v, dict)),
    ("train.data", True, "a string", lambda v: isinstance(v, str)),
    ("train.grid", True, "2 positive integers", lambda v: isinstance(v, list) and len(v) == 2 and all(_positive_int(x) for x in v)),
    ("train.skipped", False, "a list of file names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ("batch_profile", False, "an object min, opt, max",
     lambda v: isinstance(v, dict) and all(_positive_int(v.get(k)) for k in ("min", "opt", "max"))),
    ("holdout", False, "an object", lambda v: isinstance(v, dict)),
    ("holdout.scores", False, "a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v)),
    ("holdout.images", False, "a list of file names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ("threshold", False, "an object with a value", lambda v: isinstance(v, dict) and "value" in v),
    ("test_data", False, "a string or null", lambda v: v is None or isinstance(v, str)),
    ("files", True, "an object", lambda v: isinstance(v, dict)),
)


def _field(manifest: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    value: Any = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def check_manifest(manifest: dict[str, Any], path: str | os.PathLike = MANIFEST_NAME) -> None:
    """Raise ArtifactError naming ``path`` and the field when ``manifest`` does not follow the
    schema builder.build writes (types, ranges, required keys) or its geometry disagrees with
    itself: the crop against the network's input shape and the patch grid."""
    from .contract import manifest_threshold
    from .data.images import Preprocessing

    def bad(field: str, problem: str) -> ArtifactError:
        return ArtifactError(f"{path}: {field} {problem}: the manifest was edited or is damaged; rebuild the bundle")

    for dotted, required, what, check in _FIELDS:
        present, value = _field(manifest, dotted)
        if not present:
            parent_present = "." not in dotted or _field(manifest, dotted.rsplit(".", 1)[0])[0]
            if required and parent_present:
                raise bad(dotted, "is missing")
            continue
        if not check(value):
            raise bad(dotted, f"must be {what}, not {json.dumps(value)[:60]}")
    if not manifest["onnx"]:
        raise bad("onnx", "lists no model")
    for name, entry in manifest["files"].items():
        if not _bundle_file(name) or not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                                         and _is_int(entry.get("bytes"))):
            raise bad(f"files.{name}", "must be a file name with its sha256 and bytes")
    # The threshold has its own message (the remedy is calibrate, not a rebuild).
    manifest_threshold(manifest, Path(path).parent)
    try:
        prep = Preprocessing.from_dict(manifest["preprocessing"])
    except (InputError, ValueError) as exc:
        raise bad("preprocessing", f"is out of range ({exc})") from None
    shape = manifest["input"]["shape"]
    width, height = prep.input_size
    if manifest["input"].get("kind", "tensor") == "tensor" and shape[1:] != [3, height, width]:
        if prep.width is None:
            raise bad("preprocessing.crop", f"{prep.crop} does not match the network's input {shape[2]}x{shape[3]} (input.shape)")
        raise bad("preprocessing.crop", f"{height} and width {width} do not match the network's input "
                                        f"{shape[2]}x{shape[3]} (input.shape)")
    if manifest["input"].get("kind") == "frames":
        channels = 1 if manifest["input"].get("channel_order") == "gray" else 3
        if shape[3] != channels:
            raise bad("input.shape", f"has {shape[3]} channels, but channel_order {manifest['input'].get('channel_order')!r} "
                                     f"means {channels}")
    grid = [math.ceil(height / STAGE1_STRIDE), math.ceil(width / STAGE1_STRIDE)]
    if manifest["train"]["grid"] != grid:
        what = f"the crop {prep.crop}" if prep.width is None else f"the input {width}x{height}"
        raise bad("train.grid", f"{manifest['train']['grid']} does not match {what} "
                                f"(the network's patch grid is {grid[0]}x{grid[1]})")


def verify_file(bundle_dir: str | os.PathLike, manifest: dict[str, Any], name: str) -> Path:
    """Check one listed file against the manifest and return its path."""
    entry = manifest.get("files", {}).get(name)
    path = Path(bundle_dir) / name
    if entry is None:
        raise ArtifactError(f"{name} is not listed in {Path(bundle_dir) / MANIFEST_NAME}")
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ArtifactError(f"{path} does not match its sha256 in the manifest: the file is corrupt or was modified")
    return path


def add_files_to_manifest(bundle_dir: str | os.PathLike, names: list[str], updates: dict[str, Any]) -> dict[str, Any]:
    """Add files (already written atomically) and top-level entries to an existing manifest."""
    manifest = read_manifest(bundle_dir, verify=True)
    for key, value in updates.items():
        manifest[key] = value
    files = dict(manifest.get("files", {}))
    for name in names:
        files[name] = None
    manifest["files"] = files
    write_manifest(bundle_dir, manifest)
    return manifest


def load_array(bundle_dir: str | os.PathLike, manifest: dict[str, Any], name: str):
    """Verify a listed ``.npy`` file and load it without ever unpickling (object arrays are refused)."""
    import numpy as np

    path = verify_file(bundle_dir, manifest, name)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"{path}: refused ({exc}); engine files never hold pickles") from None
