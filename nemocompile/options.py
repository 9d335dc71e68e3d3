"""Build options: what `nemocompile build` and `plan` are asked to do. Torch-free, so `plan`
(which takes the same options) loads without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BuildOptions:
    target: str = "h100"
    precision: str = "auto"  # auto: the target's policy; bf16 / fp32: one float format throughout
    overrides: tuple[str, ...] = ()  # component=precision
    policy_file: Path | None = None
    exclude: tuple[str, ...] = ()  # weight-name patterns kept in the float base
    calibrate: int = 8  # token batches for activation scales (W4A4, W8A8)
    calibration_data: Path | None = None  # a file of token ids, one sequence per line
    # GPUs to plan for: sizes the report's "bytes per GPU at planned world size" line (and `plan`).
    # The engine itself holds one rank until sharding lands; its manifest says so.
    world_size: int = 1
    force: bool = False
    print_after: frozenset[str] = field(default_factory=frozenset)
