"""The public Python API: `build` and `load`."""

from __future__ import annotations

from pathlib import Path

from nemocompile.runtime.engine import Engine
from nemocompile.runtime.engine import load as _load

from .driver import BuildResult
from .driver import build as _build


def build(model: str | Path | None, out: str | Path, target: str = "h100", precision: str = "bf16",
          force: bool = False) -> BuildResult:
    """Compile the checkpoint directory `model` (None: the embedded demo model) into the engine
    directory `out` for `target`."""
    return _build(Path(model) if model is not None else None, Path(out), target, precision, force)


def load(path: str | Path, device: str | None = None) -> Engine:
    """Load an engine directory; verifies every file's hash and the GPU arch first."""
    return _load(path, device)
