"""Engine directory mechanics, independent of what an engine holds.

A build writes into a hidden staging directory next to the output and renames it into place
only when it finished, so a build killed at any moment never leaves a half-written engine at
the output path. `manifest.json` records every file's size and sha256; loading verifies them
before anything runs. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from nemocompile.base.errors import EngineError, UsageError
from nemocompile.base.settings import settings

MANIFEST_NAME = "manifest.json"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in `settings().io_chunk_bytes` chunks so memory stays bounded."""
    digest = hashlib.sha256()
    chunk_bytes = settings().io_chunk_bytes
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Staged (atomic) engine directories


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _aside_prefix(out: Path) -> str:
    return f".{out.name}.old-"


def _owner_is_alive(sibling: Path, prefix: str) -> bool:
    """Whether the build that made this hidden sibling (pid in its name) is still running here."""
    pid_text = sibling.name[len(prefix) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_path(path: Path) -> None:
    """Delete a directory tree, or just the link/file when `path` is not a real directory."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_siblings(out: Path) -> None:
    """Remove staging and set-aside directories left by earlier builds of `out` that were killed."""
    for prefix in (_partial_prefix(out), _aside_prefix(out)):
        for sibling in out.parent.glob(glob.escape(prefix) + "*"):
            if not _owner_is_alive(sibling, prefix):
                _remove_path(sibling)


def _hidden_sibling(out: Path, prefix: str) -> Path:
    """A fresh name next to `out` (same filesystem, so renames are atomic) tagged with our pid."""
    return out.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}"


def _make_staging_directory(out: Path) -> Path:
    while True:
        candidate = _hidden_sibling(out, _partial_prefix(out))
        try:
            candidate.mkdir(mode=0o777)  # the umask applies, as for any directory the user makes
        except FileExistsError:
            continue
        return candidate


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is an existing file; choose another output path.")
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it.")


def _commit(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished staging directory into place, replacing an old engine only with force."""
    _refuse_existing(out, force)
    if not (out.exists() or out.is_symlink()):
        os.rename(staging, out)
        return
    aside = _hidden_sibling(out, _aside_prefix(out))
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(aside, out)  # put the old engine back before reporting the failure
        raise
    _remove_path(aside)


@contextlib.contextmanager
def staged_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh hidden directory next to `out`; on success rename it to `out`.

    Refuses an existing file at `out`, and an existing directory unless `force`. On an
    exception the staging directory is removed and the exception re-raised; if the process is
    killed, only a hidden `.{name}.partial-*` sibling remains, which the next build removes.
    """
    out = Path(out)
    _refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    staging = _make_staging_directory(out)
    try:
        yield staging
        _commit(staging, out, force)
    except BaseException:
        _remove_path(staging)
        raise


# ---------------------------------------------------------------------------------------------
# Manifest


def _engine_files(directory: Path) -> list[str]:
    """Every regular file under `directory` except the manifest, as sorted relative POSIX paths."""
    found: list[str] = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise EngineError(
                f"engine directory {directory} contains a symbolic link {relative}; engines hold plain files."
            )
        if path.is_file() and relative != MANIFEST_NAME:
            found.append(relative)
    return sorted(found)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` with a `files` entry (size and sha256 of every other file) computed here.

    The output is deterministic (sorted keys, indent 2, trailing newline) so identical builds
    produce identical manifests. The caller's dict is not modified.
    """
    directory = Path(directory)
    files = {
        relative: {"sha256": sha256_file(directory / relative), "size": (directory / relative).stat().st_size}
        for relative in _engine_files(directory)
    }
    text = json.dumps({**manifest, "files": files}, sort_keys=True, indent=2, ensure_ascii=True) + "\n"
    (directory / MANIFEST_NAME).write_text(text, encoding="utf-8")


def _load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise EngineError(f"{directory} is not an engine directory: {path} is missing.") from error
    except OSError as error:
        raise EngineError(f"cannot read {path}: {error.strerror or error}.") from error
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise EngineError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise EngineError(f"{path} is not an engine manifest: it has no `files` object.")
    for relative, entry in manifest["files"].items():
        if not _is_file_entry(entry):
            raise EngineError(f"{path} has a malformed entry for {relative}; expected sha256 and size.")
    return manifest


def _is_file_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    digest, size = entry.get("sha256"), entry.get("size")
    return isinstance(digest, str) and bool(_SHA256_HEX.fullmatch(digest)) and type(size) is int and size >= 0


def _resolve_inside(directory: Path, relative: str) -> Path:
    """The file a manifest entry names, refusing any path that leaves the engine directory."""
    outside = EngineError(f"{MANIFEST_NAME} names a path outside the engine directory: {relative}")
    pure = PurePosixPath(relative)
    if (
        not relative
        or pure.is_absolute()
        or Path(relative).is_absolute()
        or ".." in pure.parts
        or "\\" in relative
    ):
        raise outside
    root = directory.resolve()
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise outside from error
    if not resolved.is_relative_to(root):
        raise outside
    return resolved


# Manifest fields that name engine files; each must be one of the hashed `files`.
_REFERENCE_FIELDS = ("graphs", "weights", "tokenizer")


def _referenced_paths(manifest: dict[str, Any]) -> list[str]:
    paths: list[Any] = []
    for field in _REFERENCE_FIELDS:
        value = manifest.get(field)
        if isinstance(value, dict):
            paths += list(value.values())
        elif isinstance(value, list):
            paths += value
        elif value is not None:
            paths.append(value)
    for path in paths:
        if not isinstance(path, str):
            raise EngineError(f"{MANIFEST_NAME} names a file with a non-string path: {path!r}")
    return paths


def verify_engine_files(directory: Path) -> dict[str, Any]:
    """Check every file the manifest lists is inside the engine, present, and unchanged; return the manifest.

    Every file that another manifest field names (graphs, weights, tokenizer) must be among
    the hashed files, so nothing unverified is ever read.

    Sizes are checked for every file before any hash is computed, so a missing or truncated
    file is reported without first hashing gigabytes of weights. Files not listed are ignored.
    """
    directory = Path(directory)
    manifest = _load_manifest(directory)
    entries: dict[str, dict[str, Any]] = manifest["files"]
    paths = {relative: _resolve_inside(directory, relative) for relative in entries}
    for relative in _referenced_paths(manifest):
        _resolve_inside(directory, relative)
        if relative not in entries:
            raise EngineError(f"{MANIFEST_NAME} names {relative}, which is not among its hashed files")
    for relative, path in paths.items():
        if not path.is_file():
            raise EngineError(f"engine file {relative} is missing.")
        if path.stat().st_size != entries[relative]["size"]:
            raise EngineError(f"engine file {relative} was changed after build (size mismatch).")
    for relative, path in paths.items():
        if sha256_file(path) != entries[relative]["sha256"]:
            raise EngineError(f"engine file {relative} was changed after build (sha256 mismatch).")
    return manifest
