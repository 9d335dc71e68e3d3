"""Build options: what `nemocompile build` and `plan` are asked to do. Torch-free, so `plan`
(which takes the same options) loads without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nemocompile.base.errors import UsageError


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
    # The run-time bounds of the engine: the largest batch and the longest context (prompt plus
    # generated tokens) it accepts. They bound the graph's symbolic dims; caches grow up to them.
    max_batch_size: int = 256
    max_context: int = 131072
    force: bool = False
    # Also export the engine's graphs to ONNX for TensorRT (and build the TensorRT engine where
    # TensorRT is installed): tensorrt/ in the engine directory.
    tensorrt: bool = False
    print_after: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for option, value in (("--world-size", self.world_size), ("--calibrate", self.calibrate),
                              ("--max-batch-size", self.max_batch_size), ("--max-context", self.max_context)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{option} must be an integer of at least 1, got {value!r}")

    @property
    def bounds(self) -> tuple[int, int]:
        """(largest batch, longest context), as the graph builder takes them."""
        return self.max_batch_size, self.max_context
