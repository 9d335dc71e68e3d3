"""Reading an engine directory safely: the manifest through its type, every file it lists checked
for size and sha256, every path kept inside the engine, no symbolic link followed, and the GPU arch
checked before anything runs. The writing side (staging, hashing into the manifest) lives with the
build driver.

Files the runtime parses (manifest, graphs, config, tokenizer) are read once, through a descriptor
opened without following links, and hashed from the same bytes it then parses; nothing is read
that the manifest does not hash."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch

from nemocompile.base.errors import EngineError
from nemocompile.base.settings import settings

from .engine_format import MANIFEST_NAME, Manifest

# A manifest lists a handful of files; anything this large is not one.
MAX_MANIFEST_BYTES = 16 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in `settings().io_chunk_bytes` chunks so memory stays bounded."""
    with Path(path).open("rb") as handle:
        return _sha256_stream(handle)


def _sha256_stream(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    chunk_bytes = settings().io_chunk_bytes
    while chunk := handle.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def _why_not_plain(directory: Path, relative: str) -> str:
    """Why `relative` could not be opened as a plain file inside `directory` (for the message)."""
    path = directory
    for part in PurePosixPath(relative).parts:
        path = path / part
        if path.is_symlink():
            shown = path.relative_to(directory).as_posix()
            return f"{shown} is a symbolic link; engines hold plain files"
    return "it is not a plain file"


@contextmanager
def open_engine_file(directory: Path, relative: str) -> Iterator[BinaryIO]:
    """`directory / relative` opened for reading without following a symbolic link at any component,
    refusing anything but a regular file (a FIFO, a device, a directory). The engine directory itself
    is the user's path and may be a link."""
    parts = PurePosixPath(relative).parts
    if not parts or ".." in parts or PurePosixPath(relative).is_absolute():
        raise EngineError(f"{directory / MANIFEST_NAME} names a path outside the engine directory: {relative}")
    descriptors: list[int] = []
    try:
        try:
            descriptors.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
            for part in parts[:-1]:
                descriptors.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                           dir_fd=descriptors[-1]))
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=descriptors[-1])
        except FileNotFoundError:
            raise EngineError(f"engine file {relative} is missing.") from None
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
                raise EngineError(f"engine file {relative} cannot be read: "
                                  f"{_why_not_plain(directory, relative)}.") from None
            raise EngineError(f"cannot read engine file {relative}: {error.strerror or error}.") from None
        handle = os.fdopen(fd, "rb")
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
    with handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise EngineError(f"engine file {relative} cannot be read: it is not a plain file.")
        yield handle


def read_manifest(directory: Path) -> Manifest:
    """The engine's manifest, parsed and validated (no file is hashed here)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        with open_engine_file(directory, MANIFEST_NAME) as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except EngineError as error:
        if "is missing" in str(error):
            raise EngineError(f"{directory} is not an engine directory: {path} is missing.") from None
        raise
    if len(data) > MAX_MANIFEST_BYTES:
        raise EngineError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; it is not an engine manifest.")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise EngineError(f"{path} is not valid JSON (it is not UTF-8 text).") from None
    except json.JSONDecodeError as error:
        raise EngineError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from None
    except RecursionError:
        raise EngineError(f"{path} is not an engine manifest: it is nested too deeply.") from None
    return Manifest.from_json(parsed, path)


def resolve_inside(directory: Path, relative: str) -> Path:
    """The file a manifest entry names, refusing any path that leaves the engine directory
    (the manifest type refuses `..` and absolute paths; this also catches symbolic links)."""
    outside = EngineError(f"{directory / MANIFEST_NAME} names a path outside the engine directory: {relative}")
    root = directory.resolve()
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise outside from error
    if not resolved.is_relative_to(root):
        raise outside
    return resolved


def verify_engine_files(directory: Path) -> Manifest:
    """Check every file the manifest lists is inside the engine, a plain file (no link), present, and
    unchanged; return the manifest. Sizes are checked for every file before any hash is computed, so
    a missing or truncated file is reported without first hashing gigabytes of weights. Files not
    listed are ignored; every file another field names is among the listed ones (the type checks that)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for relative in manifest.files:
        resolve_inside(directory, relative)
    for relative, entry in manifest.files.items():
        with open_engine_file(directory, relative) as handle:
            if os.fstat(handle.fileno()).st_size != entry.size:
                raise EngineError(f"engine file {relative} was changed after build (size mismatch).")
    for relative, entry in manifest.files.items():
        with open_engine_file(directory, relative) as handle:
            if _sha256_stream(handle) != entry.sha256:
                raise EngineError(f"engine file {relative} was changed after build (sha256 mismatch).")
    return manifest


def read_engine_bytes(directory: Path, manifest: Manifest, relative: str, verify: bool = True) -> bytes:
    """The bytes of the engine file `relative`, which the manifest must hash. Read once and, with
    `verify`, checked against its recorded size and sha256 from the very bytes returned."""
    entry = manifest.files.get(relative)
    if entry is None:
        raise EngineError(f"{directory / MANIFEST_NAME} does not hash {relative}; the runtime reads only "
                          f"hashed files.")
    with open_engine_file(directory, relative) as handle:
        data = handle.read(entry.size + 1)
    if verify and (len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256):
        raise EngineError(f"engine file {relative} was changed after build (sha256 mismatch).")
    return data


def read_engine_text(directory: Path, manifest: Manifest, relative: str, verify: bool = True) -> str:
    """The text of the engine file `relative`, which the manifest must hash. Read once and, with
    `verify`, checked against its recorded size and sha256 from the very bytes returned."""
    data = read_engine_bytes(directory, manifest, relative, verify)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise EngineError(f"engine file {relative} is not UTF-8 text.") from None


def check_arch(manifest: Manifest, device: torch.device) -> None:
    """Refuse a GPU of another architecture generation than the engine's target."""
    if device.type != "cuda":
        return  # the reference runtime runs any engine on the CPU
    wanted = manifest.target.compute_capability
    found = torch.cuda.get_device_capability(device)
    if found[0] != wanted[0]:
        raise EngineError(f"engine was built for {manifest.target.name} ({manifest.target.arch}) "
                          f"but this GPU is sm_{found[0]}{found[1]}; rebuild with the matching --target")
