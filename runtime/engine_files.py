"""Reading an engine directory safely: the manifest through its type, every file it lists checked
for size and sha256, every path kept inside the engine, and the GPU arch checked before anything
runs. The writing side (staging, hashing into the manifest) lives with the build driver."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nemocompile.base.errors import EngineError
from nemocompile.base.settings import settings

from .engine_format import MANIFEST_NAME, Manifest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in `settings().io_chunk_bytes` chunks so memory stays bounded."""
    digest = hashlib.sha256()
    chunk_bytes = settings().io_chunk_bytes
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """The engine's manifest, parsed and validated (no file is hashed here)."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise EngineError(f"{directory} is not an engine directory: {path} is missing.") from error
    except OSError as error:
        raise EngineError(f"cannot read {path}: {error.strerror or error}.") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise EngineError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from error
    return Manifest.from_json(data, path)


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
    """Check every file the manifest lists is inside the engine, present, and unchanged; return the
    manifest. Sizes are checked for every file before any hash is computed, so a missing or
    truncated file is reported without first hashing gigabytes of weights. Files not listed are
    ignored; every file another field names is among the listed ones (the type checks that)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    paths = {relative: resolve_inside(directory, relative) for relative in manifest.files}
    for relative, path in paths.items():
        if not path.is_file():
            raise EngineError(f"engine file {relative} is missing.")
        if path.stat().st_size != manifest.files[relative].size:
            raise EngineError(f"engine file {relative} was changed after build (size mismatch).")
    for relative, path in paths.items():
        if sha256_file(path) != manifest.files[relative].sha256:
            raise EngineError(f"engine file {relative} was changed after build (sha256 mismatch).")
    return manifest


def check_arch(manifest: Manifest, device: torch.device) -> None:
    """Refuse a GPU of another architecture generation than the engine's target."""
    if device.type != "cuda":
        return  # the reference runtime runs any engine on the CPU
    wanted = manifest.target.compute_capability
    found = torch.cuda.get_device_capability(device)
    if found[0] != wanted[0]:
        raise EngineError(f"engine was built for {manifest.target.name} ({manifest.target.arch}) "
                          f"but this GPU is sm_{found[0]}{found[1]}; rebuild with the matching --target")
