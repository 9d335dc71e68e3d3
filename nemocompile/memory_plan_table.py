"""The memory-plan table of docs/memory-plan.md: the published Nemotron 3 configs on the GPUs they
are deployed on, planned from config.json alone (bench/bench_memory_plan.py prints it; a test
keeps the docs equal to it)."""

from __future__ import annotations

from pathlib import Path

from .options import BuildOptions
from .planner import plan_model

# (config, target, world size): each model on the smallest node of each GPU it fits on
DEPLOYMENTS = (
    ("nano", "h100", 1), ("nano", "b200", 1),
    ("super", "h100", 2), ("super", "b200", 1),
    ("ultra", "h100", 8), ("ultra", "b200", 8),
)
MILLION = 1 << 20


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def memory_plan_table(models_dir: Path) -> str:
    """Markdown: per GPU, at batch 1 x 1M tokens, and the largest context and batches that fit."""
    lines = ["| model | GPUs | weights GB | KV bytes / token | Mamba state MB / sequence | GB at 1 x 1M tokens "
             "| fits | largest context at batch 1 | largest batch at 128k | largest batch at 8k |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for model, target, world in DEPLOYMENTS:
        result = plan_model(models_dir / f"{model}.json",
                            BuildOptions(target=target, world_size=world, max_batch_size=1, max_context=MILLION))
        memory = result.memory
        longest = memory.largest_context(1)
        lines.append(f"| {model} | {world} x {target} | {_gb(memory.weights_bytes)} | {memory.kv_bytes_per_token:,} "
                     f"| {_mb(memory.ssm_state_bytes_per_sequence)} | {_gb(memory.bytes_per_gpu)} "
                     f"| {'yes' if memory.fits else 'no'} | {'unbounded' if longest is None else f'{longest:,}'} "
                     f"| {memory.largest_batch(131072):,} | {memory.largest_batch(8192):,} |")
    return "\n".join(lines) + "\n"
