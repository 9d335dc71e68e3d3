"""Build options: what `nemocompile build` and `plan` are asked to do. Torch-free, so `plan`
(which takes the same options) loads without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nemocompile.base.errors import UsageError

# The run-time bounds a build starts from when --max-batch-size or --max-context is not given; such
# a bound then shrinks to what the memory plan fits (memory_plan_bounds.py).
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_CONTEXT = 131072


@dataclass(frozen=True)
class BuildOptions:
    target: str = "h100"
    precision: str = "auto"  # auto: the target's policy; bf16 / fp32: one float format throughout
    overrides: tuple[str, ...] = ()  # component=precision
    policy_file: Path | None = None
    exclude: tuple[str, ...] = ()  # weight-name patterns kept in the float base
    act_scales: str | None = None  # static or dynamic activation scales; None: the policy file's, else static
    calibrate: int = 8  # token batches for activation scales (W4A4, W8A8)
    calibration_data: Path | None = None  # a file of token ids, one sequence per line
    calibration_device: str = "cpu"  # where the float graph runs, one block at a time: cpu or cuda
    calibration_format: str = "auto"  # of calibration_data: auto, tokens, text or jsonl
    calibration_length: int | None = None  # tokens per sample; None: 64, within max_context
    # Ranks (GPUs) the engine is split over (docs/distributed.md): tensor-parallel ranks `tp` and
    # expert-parallel ranks `ep`, each 1 or the world size (None: the world size).
    world_size: int = 1
    tp: int | None = None
    ep: int | None = None
    # The run-time bounds of the engine: the largest batch and the longest context (prompt plus
    # generated tokens) it accepts. They bound the graph's symbolic dims; caches grow up to them.
    # None: not given; the build chooses it, from the defaults above down to what fits the target.
    max_batch_size: int | None = None
    max_context: int | None = None
    force: bool = False
    # Also export the engine's graphs to ONNX for TensorRT (and build the TensorRT engine where
    # TensorRT is installed): tensorrt/ in the engine directory.
    tensorrt: bool = False
    resume: bool = False  # continue the staging directory a killed build of the same input left
    tuning_db: Path | None = None  # a tuning database (`nemocompile tune`) the kernel configs come from
    print_after: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for option, value in (("--world-size", self.world_size), ("--calibrate", self.calibrate),
                              ("--max-batch-size", self.bounds[0]), ("--max-context", self.bounds[1])):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{option} must be an integer of at least 1, got {value!r}")
        for option, ranks in (("--tp", self.tp), ("--ep", self.ep)):
            if ranks is not None and ranks not in (1, self.world_size):
                raise UsageError(f"{option} must be 1 or the world size {self.world_size}, got {ranks!r}")
        if self.calibration_length is not None:
            if isinstance(self.calibration_length, bool) or not isinstance(self.calibration_length, int) \
                    or self.calibration_length < 1:
                raise UsageError(f"--calibration-length must be an integer of at least 1, got "
                                 f"{self.calibration_length!r}")
            if self.calibration_length > self.bounds[1]:
                raise UsageError(f"--calibration-length {self.calibration_length} exceeds --max-context "
                                 f"{self.bounds[1]}")
        if self.calibration_format not in ("auto", "tokens", "text", "jsonl"):
            raise UsageError(f"--calibration-format must be auto, tokens, text or jsonl, got "
                             f"{self.calibration_format!r}")
        if self.act_scales not in (None, "static", "dynamic"):
            raise UsageError(f"--act-scales must be static or dynamic, got {self.act_scales!r}")
        if self.calibration_device not in ("cpu", "cuda"):
            raise UsageError(f"--calibration-device must be cpu or cuda, got {self.calibration_device!r}")

    @property
    def tensor_parallel(self) -> int:
        return self.world_size if self.tp is None else self.tp

    @property
    def expert_parallel(self) -> int:
        return self.world_size if self.ep is None else self.ep

    @property
    def sample_length(self) -> int:
        """Tokens per calibration sample."""
        return self.calibration_length if self.calibration_length is not None else min(64, self.bounds[1])

    @property
    def bounds(self) -> tuple[int, int]:
        """(largest batch, longest context), as the graph builder takes them: the defaults for those not given."""
        return (DEFAULT_MAX_BATCH_SIZE if self.max_batch_size is None else self.max_batch_size,
                DEFAULT_MAX_CONTEXT if self.max_context is None else self.max_context)
