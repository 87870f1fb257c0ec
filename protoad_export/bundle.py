"""Engine directories: atomic file writes, sha256 checksums and the manifest.

Every file is written under a temporary name in the destination folder and renamed into place, so
an interrupted build never leaves a partial file under a final name. A build writes into a fresh
staging directory and swaps it in as a whole at the end (see :func:`commit_directory`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, InputError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
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


def remove_stale_work(final_dir: str | os.PathLike) -> list[Path]:
    """Remove staging and scratch folders that killed builds of ``final_dir`` left behind.

    Their names carry the builder's pid, so the folders of a build still running are kept.
    """
    final_dir = Path(final_dir)
    removed = []
    if not final_dir.parent.is_dir():
        return removed
    for path in final_dir.parent.glob(f".{final_dir.name}.*"):
        parts = path.name[len(final_dir.name) + 2 :].split(".")
        if path.is_dir() and parts and parts[0].isdigit() and parts[-1] in ("staging", "scratch"):
            if not _pid_alive(int(parts[0])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` as a folder to write into, checked before any work: an existing file there, or
    a file where a folder above it should be, is an InputError now rather than after the run."""
    path = Path(path)
    for at in (path, *path.parents):
        if at.exists():
            if not at.is_dir():
                raise InputError(f"{option} {path}: {at} is a file, not a folder")
            break
    return path


def staging_directory(final_dir: str | os.PathLike, kind: str = "staging") -> Path:
    """A fresh hidden directory beside ``final_dir`` (``kind``: staging for the new engine
    directory, scratch for temporary features). Stale ones from killed builds are removed first."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work(final_dir)
    return Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.{os.getpid()}.", suffix=f".{kind}", dir=final_dir.parent))


def commit_directory(staging: Path, final_dir: str | os.PathLike) -> None:
    """Replace ``final_dir`` by ``staging`` with renames only.

    The old directory is first renamed aside and removed after the new one is in place, so a kill
    at any moment leaves either the old or the new complete directory under the final name (or,
    between the two renames, the old one beside it under a ``.old`` name, which a loader reports).
    """
    final_dir = Path(final_dir)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.{os.getpid()}.old")
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(engine_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Record the sha256 of every file in ``manifest['files']`` and write the manifest atomically."""
    engine_dir = Path(engine_dir)
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = {name: file_entry(engine_dir / name) for name in sorted(manifest.get("files", {}))}
    atomic_write_json(engine_dir / MANIFEST_NAME, manifest)


def read_manifest(engine_dir: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """Load and validate a manifest; with ``verify``, check every listed file's size and sha256."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        aside = sorted(engine_dir.parent.glob(f".{engine_dir.name}.*.old")) if engine_dir.parent.is_dir() else []
        hint = f" (a build killed while swapping directories left {aside[0]}: rename it back)" if aside else ""
        raise ArtifactError(f"engine directory not found: {engine_dir}{hint}")
    if not path.is_file():
        raise ArtifactError(f"{engine_dir} has no {MANIFEST_NAME}: not an engine directory")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise ArtifactError(f"{path} has no schema_version: not a protoad-export manifest")
    version = manifest["schema_version"]
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version!r}; this protoad-export reads version {SCHEMA_VERSION}: rebuild the engine"
        )
    if verify:
        for name in manifest.get("files", {}):
            verify_file(engine_dir, manifest, name)
    return manifest


def verify_file(engine_dir: str | os.PathLike, manifest: dict[str, Any], name: str) -> Path:
    """Check one listed file against the manifest and return its path."""
    entry = manifest.get("files", {}).get(name)
    path = Path(engine_dir) / name
    if entry is None:
        raise ArtifactError(f"{name} is not listed in {Path(engine_dir) / MANIFEST_NAME}")
    if not path.is_file():
        raise ArtifactError(f"{path} is listed in the manifest but missing")
    if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise ArtifactError(f"{path} does not match its sha256 in the manifest: the file is corrupt or was modified")
    return path


def add_files_to_manifest(engine_dir: str | os.PathLike, names: list[str], updates: dict[str, Any]) -> dict[str, Any]:
    """Add files (already written atomically) and top-level entries to an existing manifest."""
    manifest = read_manifest(engine_dir, verify=True)
    for key, value in updates.items():
        manifest[key] = value
    files = dict(manifest.get("files", {}))
    for name in names:
        files[name] = None
    manifest["files"] = files
    write_manifest(engine_dir, manifest)
    return manifest


def load_array(engine_dir: str | os.PathLike, manifest: dict[str, Any], name: str):
    """Verify a listed ``.npy`` file and load it without ever unpickling (object arrays are refused)."""
    import numpy as np

    path = verify_file(engine_dir, manifest, name)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"{path}: refused ({exc}); engine files never hold pickles") from None
