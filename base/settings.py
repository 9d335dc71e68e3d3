"""The one typed settings module. Every knob that changes behaviour lives here, read from the
environment once (NEMOCOMPILE_<NAME>) and patchable in tests through `override`."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Settings:
    # Verify the graph after every pass (cheap; on by default, as in tests).
    verify_each_pass: bool = True
    # Print tracebacks instead of one-sentence errors.
    debug: bool = False
    # Bytes read or written per step when hashing and copying engine files.
    io_chunk_bytes: int = 16 << 20
    # Device the reference runtime runs on: "auto" picks CUDA when present, else CPU.
    device: str = "auto"
    # Show rich progress bars on the terminal.
    progress: bool = True
    # Largest model (parameters) the build runs on the CPU reference runtime for calibration
    # and the quantized-vs-float agreement report.
    reference_check_max_params: int = 300_000_000
    # Threads that quantize weights (one expert at a time each) while the build reads and writes;
    # 0: one per CPU this process may use.
    quantize_threads: int = 0
    # The CPU reference runtime multiplies float32 weights through oneDNN, packed once at load
    # (runtime/cpu_gemm.py: MKL's GEMV reads weights at half the speed on AMD CPUs); off: F.linear.
    cpu_onednn_gemm: bool = True
    # The CPU reference runtime compiles the decode step with torch.compile (runtime/compiled_step.py):
    # the first decode step of each batch size compiles (tens of seconds cold), the rest run 2-3x faster in float32
    # (bf16 about 1.25x; quantized GEMMs stay eager).
    cpu_compile_decode: bool = False
    # The ahead-of-time kernel compile cache shared by builds (content-addressed entries).
    kernel_cache_dir: str = "~/.cache/nemocompile/kernels"
    # The tokens per call the build chooses kernel configs for: decode graph, prefill graph (a
    # tuning database's entry of the nearest shape bucket is taken; docs/tuning.md).
    tune_decode_tokens: int = 32
    tune_prefill_tokens: int = 512
    # Kernel compiles a tuning sweep runs at once; 0: one per CPU this process may use, at most one
    # per 2 GiB of available memory.
    tune_compile_jobs: int = 0
    # The memory plan (docs/memory-plan.md). Tokens one forward step processes at most: longer
    # prompts are prefilled in chunks of this many (vLLM's and TensorRT-LLM's default budget).
    plan_step_tokens: int = 8192
    # Per GPU, beside weights, state and workspace: the CUDA context (about 0.5 GB on Hopper and
    # Blackwell), cuBLAS/cuBLASLt workspaces and the caching allocator's rounding.
    plan_runtime_reserve_bytes: int = 1 << 30
    # Per GPU and NCCL communicator: 32 channels x send + receive x NCCL_BUFFSIZE (4 MiB).
    plan_nccl_bytes: int = 32 * 2 * (4 << 20)
    # Seconds a rank of a sharded engine waits for the others in a collective (or to join the
    # process group) before it gives up with an error: a rank that dies cannot hang the rest.
    distributed_timeout_s: int = 60


def _parse(kind: type[Any] | str, text: str) -> Any:
    kind_name = kind if isinstance(kind, str) else kind.__name__
    if kind_name == "bool":
        return text.strip().lower() in {"1", "true", "yes", "on"}
    if kind_name == "int":
        return int(text)
    return text


def _from_environment() -> Settings:
    values: dict[str, Any] = {}
    for field in fields(Settings):
        raw = os.environ.get(f"NEMOCOMPILE_{field.name.upper()}")
        if raw is not None:
            values[field.name] = _parse(field.type, raw)
    return Settings(**values)


_current: Settings = _from_environment()


def settings() -> Settings:
    """The settings in force."""
    return _current


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Temporarily change settings (tests, the CLI's --debug)."""
    global _current
    previous = _current
    _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous


def set_settings(**changes: Any) -> None:
    """Change settings for the rest of the process (the CLI's global flags)."""
    global _current
    _current = dataclasses.replace(_current, **changes)
