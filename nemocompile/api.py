"""The public Python API: `build`, `load`, and the number formats."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nemocompile.runtime.engine import Engine
from nemocompile.runtime.engine import load as _load

from .driver import BuildResult
from .driver import build as _build
from .engine_files import remove_set_aside, restore_set_aside
from .options import BuildOptions


def build(model: str | Path | None, out: str | Path, target: str = "h100", precision: str = "auto",
          force: bool = False, overrides: Sequence[str] = (), policy_file: str | Path | None = None,
          exclude: Sequence[str] = (), calibrate: int = 8, calibration_data: str | Path | None = None) -> BuildResult:
    """Compile the checkpoint directory `model` (None: the embedded demo model) into the engine
    directory `out` for `target`. precision: auto (the target's policy), bf16 or fp32;
    overrides: "component=precision" strings, e.g. "routed_experts=fp8"."""
    options = BuildOptions(target=target, precision=precision, overrides=tuple(overrides),
                           policy_file=Path(policy_file) if policy_file else None, exclude=tuple(exclude),
                           calibrate=calibrate, calibration_data=Path(calibration_data) if calibration_data else None,
                           force=force)
    return _build(Path(model) if model is not None else None, Path(out), options)


def load(path: str | Path, device: str | None = None) -> Engine:
    """Load an engine directory; verifies every file's sha256 and the GPU arch first. When `path`
    is missing because a build died mid-swap, the engine it set aside is put back first; engines set
    aside by interrupted builds are deleted once `path` verified (a warning says which)."""
    restore_set_aside(Path(path))
    engine = _load(path, device)
    remove_set_aside(Path(path))
    return engine
