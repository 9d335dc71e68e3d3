"""The ranks of a sharded engine: joining the process group, and which rank this process is.

An engine built for N ranks runs as N processes, one per rank (`nemocompile run --world-size N`
starts them; torchrun works as well). Each joins one torch.distributed process group (NCCL on
CUDA, gloo on CPU) with a timeout on every collective, so a rank that dies makes the others fail
with an error instead of waiting for ever. The sharded graph's communication ops
(runtime/reference/comm.py) run on that group."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemocompile.base.errors import EngineError, UsageError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def current() -> RankInfo:
    """This process's rank in the process group it has joined (rank 0 of 1 when it has joined none)."""
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return RankInfo(0, 1, 0)


def launched_world_size() -> int:
    """The world size torchrun (or `nemocompile run --world-size`) started this process in: WORLD_SIZE
    of the environment, 1 when it was started on its own."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 1
    try:
        size = int(raw)
    except ValueError:
        raise UsageError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from None
    if size < 1:
        raise UsageError(f"environment variable WORLD_SIZE must be at least 1, got {size}")
    return size


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def join(engine_world_size: int, device: torch.device, timeout_s: int) -> RankInfo:
    """Join the process group of an engine built for `engine_world_size` ranks, from the environment
    torchrun sets (env:// rendezvous), unless this process joined one already. An engine started with
    another number of ranks is refused, before anything is allocated."""
    launched = current().world_size if dist.is_initialized() else launched_world_size()
    if launched != engine_world_size:
        raise UsageError(f"the engine was built for {engine_world_size} rank{'s' if engine_world_size > 1 else ''} "
                         f"but was started with {launched}; start it with --world-size {engine_world_size} (or "
                         f"torchrun --nproc-per-node {engine_world_size})")
    if engine_world_size == 1 or dist.is_initialized():
        return current()
    missing = [key for key in ENV_KEYS if key not in os.environ]
    if missing:
        raise UsageError(f"a rank of a {engine_world_size}-rank engine needs {', '.join(missing)} in its environment "
                         f"(start it with torchrun or nemocompile run --world-size)")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend_for(device), init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as error:
        raise EngineError(f"rank {os.environ.get('RANK')} could not join the process group: {error}") from None
    atexit.register(leave)  # a process group left open aborts the interpreter at exit
    return current()


def rank_on(axis: str, parts: int) -> int:
    """This process's index among the `parts` ranks of mesh axis `axis` (every axis spans all the
    ranks: tensor- and expert-parallel ranks are the same processes)."""
    if parts == 1:
        return 0
    info = current()
    if info.world_size != parts:
        raise EngineError(f"an op sharded over {parts} {axis} ranks runs in a process group of {info.world_size}; "
                          f"start the engine with --world-size {parts}")
    return info.rank


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
