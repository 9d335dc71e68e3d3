"""Engine directory mechanics, independent of what an engine holds.

A build writes into a hidden staging directory next to the output and renames it into place
only when it finished, so a build killed at any moment never leaves a half-written engine at
the output path. `--force` replaces only an engine (a directory whose manifest.json parses as
one), never the build's input or a directory holding it, and the swap survives a kill at any
instant (see below). `manifest.json` (the type in nemocompile.runtime.engine_format) records every
file's size and sha256; loading verifies them (nemocompile.runtime.engine_files) before anything
runs. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from nemocompile.base.errors import EngineError, UsageError
from nemocompile.base.inputs import read_regular_bytes
from nemocompile.runtime.engine_files import read_manifest, sha256_file
from nemocompile.runtime.engine_format import FORMAT_VERSION, MANIFEST_NAME, FileEntry, Manifest

from . import resume

# ---------------------------------------------------------------------------------------------
# Staged (atomic) engine directories
#
# Names next to OUT, all hidden and tagged with the pid of the build that made them:
#   .OUT.partial-PID-*  the engine being built (removed when its build failed or died)
#   .OUT.old-PID-*      the engine OUT held, set aside for the moment of the swap
# The swap is two renames: OUT -> aside, then staging -> OUT. A build killed between them leaves
# no OUT but the old engine aside; the next build or load renames it back. An aside copy is
# deleted only once OUT holds a good engine: right after the swap by the build that made it,
# otherwise after a later build succeeded or a load verified OUT.

log = logging.getLogger(__name__)

# An older engine's manifest is a few hundred kilobytes; reading more is pointless.
_MANIFEST_MAX_BYTES = 64 << 20


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


def _dead_siblings(out: Path, prefix: str) -> list[Path]:
    """Hidden siblings of `out` with this prefix whose build is no longer running."""
    if not out.parent.is_dir():
        return []
    return sorted(sibling for sibling in out.parent.glob(glob.escape(prefix) + "*")
                  if not _owner_is_alive(sibling, prefix))


def _remove_path(path: Path) -> None:
    """Delete a directory tree, or just the link/file when `path` is not a real directory."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_partials(out: Path) -> None:
    """Remove staging directories left by earlier builds of `out` that died: never the only copy of
    an engine (the engine they held was not yet in place, and an old one is at OUT or aside)."""
    for sibling in _dead_siblings(out, _partial_prefix(out)):
        _remove_path(sibling)


def restore_set_aside(out: Path) -> list[str]:
    """When `out` is missing because a build died between the two renames of its swap, rename the
    engine it set aside back to `out`. Returns what was done, also logged as a warning."""
    if out.exists() or out.is_symlink():
        return []
    asides = _dead_siblings(out, _aside_prefix(out))
    if not asides:
        return []
    latest = max(asides, key=lambda aside: aside.lstat().st_ctime_ns)  # the last one moved aside
    try:
        os.rename(latest, out)
    except OSError as error:
        raise EngineError(f"{out} is missing: a build was interrupted while replacing it, and the previous "
                          f"engine it set aside at {latest} could not be renamed back "
                          f"({error.strerror or error}); rename it yourself.") from error
    note = (f"a build of {out} was interrupted while replacing it; restored the previous engine "
            f"from {latest.name}")
    log.warning(note)
    return [note]


def remove_set_aside(out: Path) -> list[str]:
    """Delete the engines that interrupted builds of `out` set aside. Call it only once `out` holds
    a good engine (a build just put it there, or a load verified it). Returns what was done."""
    notes = []
    for aside in _dead_siblings(out, _aside_prefix(out)):
        _remove_path(aside)
        note = (f"removed {aside.name}, the previous engine an interrupted build of {out} had set aside; "
                f"{out} holds the engine that replaced it")
        log.warning(note)
        notes.append(note)
    return notes


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


# ---------------------------------------------------------------------------------------------
# What --force may replace


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names after following links, or None when nothing is there.
    Comparing these, not path strings, also sees through symlinks, bind mounts and `..`."""
    try:
        info = path.stat()
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        return None
    return info.st_dev, info.st_ino


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the path as given is all there is
        return Path(os.path.abspath(path))


def _ancestors(path: Path) -> list[tuple[int, int]]:
    """The identities of `path`'s existing parent directories, nearest first (not `path` itself)."""
    found = []
    # both the path as given and with links resolved: a link may lead into, or out of, an input
    for parent in [*Path(os.path.abspath(path)).parents, *_resolved(path).parents]:
        identity = _identity(parent)
        if identity is not None and identity not in found:
            found.append(identity)
    return found


def check_output_path(out: Path, inputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse an output path that is one of the build's inputs (what, path), holds one, or lies
    inside an input directory: --force or not, a build never replaces or writes into its input."""
    out_identity = _identity(out)
    out_ancestors = _ancestors(out)
    for what, source in inputs:
        source_identity = _identity(source)
        if source_identity is None:
            continue  # a missing input is reported by whatever reads it
        if out_identity == source_identity:
            raise UsageError(f"the output directory {out} is the {what} {source}; choose another output path.")
        if out_identity is not None and out_identity in _ancestors(source):
            raise UsageError(f"the output directory {out} contains the {what} {source}; it is never replaced, "
                             "choose another output path.")
        if source.is_dir() and source_identity in out_ancestors:
            raise UsageError(f"the output directory {out} lies inside the {what} {source}; choose a path "
                             "outside it.")


def _older_engine(manifest_path: Path) -> bool:
    """Whether the manifest is that of an engine of an earlier format, which this nemocompile no
    longer runs but may replace (loading one says to rebuild it)."""
    try:
        data = json.loads(read_regular_bytes(manifest_path, "engine manifest", EngineError, _MANIFEST_MAX_BYTES))
    except (EngineError, ValueError):
        return False
    version = data.get("format_version") if isinstance(data, dict) else None
    return (isinstance(version, int) and not isinstance(version, bool) and 1 <= version < FORMAT_VERSION
            and isinstance(data.get("nemocompile_version"), str) and isinstance(data.get("files"), dict))


def _why_not_an_engine(out: Path) -> str | None:
    """None when --force may replace the directory `out`: an nemocompile engine (its manifest.json
    parses as one, this format or an earlier one) or an empty directory; else the reason why not."""
    if not any(out.iterdir()):
        return None
    manifest_path = out / MANIFEST_NAME
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return f"it holds no {MANIFEST_NAME}"
    try:
        read_manifest(out)
    except EngineError:
        if not _older_engine(manifest_path):
            return f"its {MANIFEST_NAME} is not an engine manifest"
    return None


def _refuse_existing(out: Path, force: bool) -> None:
    """Refuse to replace `out` unless it is an engine (or an empty directory) and `force` is given."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is an existing file; choose another output path.")
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it.")
    if not force:
        return
    if out.is_symlink():
        raise UsageError(f"{out} is a symbolic link; --force replaces only an engine directory itself, so "
                         "choose another output path.")
    if out.is_dir():
        reason = _why_not_an_engine(out)
        if reason is not None:
            raise UsageError(f"{out} is not a nemocompile engine ({reason}); --force replaces only an engine, "
                             "so choose another output path or remove it yourself.")


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


def _resumable(out: Path, key: Mapping[str, Any]) -> Path | None:
    """The staging directory a killed build of `out` left with its resume record (the latest one),
    taken over by this build (renamed to our own name); refused, and left in place, when it was made
    from different input or options."""
    candidates = [sibling for sibling in _dead_siblings(out, _partial_prefix(out))
                  if (sibling / resume.RESUME_FILE).is_file() and not sibling.is_symlink()]
    if not candidates:
        return None
    latest = max(candidates, key=lambda sibling: sibling.lstat().st_mtime_ns)
    reason = resume.why_not_resumable(latest, key)
    if reason is not None:
        raise resume.refuse(latest, out, reason)
    adopted = _hidden_sibling(out, _partial_prefix(out))
    os.rename(latest, adopted)
    return adopted


@contextlib.contextmanager
def staged_directory(out: Path, force: bool, inputs: Sequence[tuple[str, Path]] = (),
                     key: Callable[[], Mapping[str, Any]] | None = None,
                     resume_build: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden directory next to `out`; on success rename it to `out`.

    First puts back an engine an interrupted build left aside (`restore_set_aside`). Refuses an
    `out` that is one of `inputs` ((what, path) pairs: the checkpoint, a policy file), holds one, or
    lies inside one; an existing file at `out`; and an existing directory unless `force` is given
    and it is an engine (or empty). On an exception the staging directory is removed and the
    exception re-raised; if the process is killed, only hidden siblings remain, which the next
    build or load restores or removes. With `key` (what the build is made from), the staging
    directory records it; with `resume_build` too, the directory a killed build of the same key left
    is continued instead of a fresh one (nemocompile/resume.py).
    """
    out = Path(out)
    restore_set_aside(out)
    check_output_path(out, inputs)
    _refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    made_of = key() if key is not None else None
    adopted = _resumable(out, made_of) if resume_build and made_of is not None else None
    _remove_stale_partials(out)  # a build that does not resume starts over
    staging = adopted or _make_staging_directory(out)
    try:
        if made_of is not None:  # so that a killed build can be resumed (--resume)
            resume.write_key(staging, made_of)
        yield staging
        _commit(staging, out, force)
    except BaseException:
        _remove_path(staging)
        raise
    remove_set_aside(out)  # OUT now holds the engine this build made


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


def write_manifest(directory: Path, manifest: Manifest, known: Mapping[str, str] | None = None) -> Manifest:
    """Write `manifest.json` with `files` (size and sha256 of every other file) computed here, except
    the sha256 of the files in `known` (relative path -> sha256 hashed as the file was written, e.g.
    the weights: not read a second time), and return the manifest as written. It is read back
    through the type first, so the build can never write an engine its own runtime refuses. The
    output is deterministic (sorted keys, indent 2, trailing newline) so identical builds produce
    identical manifests."""
    directory = Path(directory)
    known = known or {}
    files = {
        relative: FileEntry(known.get(relative) or sha256_file(directory / relative),
                            (directory / relative).stat().st_size)
        for relative in _engine_files(directory)
    }
    written = manifest.with_files(files)
    data = written.to_json()
    Manifest.from_json(data, directory / MANIFEST_NAME)
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True) + "\n"
    (directory / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return written
