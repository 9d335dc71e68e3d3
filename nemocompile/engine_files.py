"""Engine directory mechanics, independent of what an engine holds.

A build writes into a hidden staging directory next to the output and renames it into place
only when it finished, so a build killed at any moment never leaves a half-written engine at
the output path. `manifest.json` (the type in nemocompile.runtime.engine_format) records every
file's size and sha256; loading verifies them (nemocompile.runtime.engine_files) before anything
runs. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from nemocompile.base.errors import EngineError, UsageError
from nemocompile.runtime.engine_files import sha256_file
from nemocompile.runtime.engine_format import MANIFEST_NAME, FileEntry, Manifest

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


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Write `manifest.json` with `files` (size and sha256 of every other file) computed here, and
    return the manifest as written. It is read back through the type first, so the build can never
    write an engine its own runtime refuses. The output is deterministic (sorted keys, indent 2,
    trailing newline) so identical builds produce identical manifests."""
    directory = Path(directory)
    files = {
        relative: FileEntry(sha256_file(directory / relative), (directory / relative).stat().st_size)
        for relative in _engine_files(directory)
    }
    written = manifest.with_files(files)
    data = written.to_json()
    Manifest.from_json(data, directory / MANIFEST_NAME)
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True) + "\n"
    (directory / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return written
