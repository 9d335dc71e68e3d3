"""Reference implementations of the communication ops and the rank-local ops of a sharded graph
(graph/comm_ops.py), on torch.distributed's default process group. With one rank each is the
identity (the rank holds everything); the reductions accumulate in fp32 on every backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemocompile.base.errors import EngineError
from nemocompile.runtime.distributed import current, rank_on


@contextmanager
def _collective(name: str) -> Iterator[None]:
    """A collective that fails (a rank died, or did not arrive within the process group's timeout)
    is one sentence naming this rank, not a traceback from the backend."""
    try:
        yield
    except (RuntimeError, ValueError) as error:
        info = current()
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EngineError(f"rank {info.rank} of {info.world_size}: {name} failed, another rank has died or did "
                          f"not arrive in time ({detail})") from None


def _world(axis: str, parts: int) -> bool:
    """Whether the op has other ranks to talk to (checked against the group this process joined)."""
    rank_on(axis, parts)
    return parts > 1


def all_reduce(x: torch.Tensor, axis: str, parts: int) -> torch.Tensor:
    if not _world(axis, parts):
        return x
    total = x.to(torch.float32, copy=True).contiguous()
    with _collective("all_reduce"):
        dist.all_reduce(total)
    return total.to(x.dtype)


def all_gather(x: torch.Tensor, axis: str, parts: int, dim: int) -> torch.Tensor:
    if not _world(axis, parts):
        return x
    piece = x.contiguous()
    pieces = [torch.empty_like(piece) for _ in range(parts)]
    with _collective("all_gather"):
        dist.all_gather(pieces, piece)
    return torch.cat(pieces, dim=dim)


def reduce_scatter(x: torch.Tensor, axis: str, parts: int, dim: int) -> torch.Tensor:
    # gloo has no reduce-scatter: the sum on every rank, then this rank's piece (the same numbers)
    rank = rank_on(axis, parts)
    total = all_reduce(x, axis, parts)
    return total.chunk(parts, dim=dim)[rank].contiguous()


def all_to_all(x: torch.Tensor, axis: str, parts: int, dim: int) -> torch.Tensor:
    if not _world(axis, parts):
        return x
    outgoing = x.movedim(dim, 0).contiguous()
    incoming = torch.empty_like(outgoing)
    with _collective("all_to_all"):
        dist.all_to_all_single(incoming, outgoing)
    return incoming.movedim(0, dim).contiguous()


def vocab_embedding(ids: torch.Tensor, table: torch.Tensor, axis: str, parts: int) -> torch.Tensor:
    rows = table.shape[0]
    local = ids - rank_on(axis, parts) * rows
    held = (local >= 0) & (local < rows)
    found = F.embedding(local.clamp(0, max(rows - 1, 0)), table)
    return torch.where(held.unsqueeze(-1), found, torch.zeros((), dtype=table.dtype, device=table.device))


def local_experts(offsets: torch.Tensor, order: torch.Tensor, axis: str, parts: int,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    per_rank = num_experts // parts
    first = rank_on(axis, parts) * per_rank
    mine = offsets[first:first + per_rank + 1]
    start, stop = int(mine[0]), int(mine[-1])
    return mine - mine[0], order[start:stop]
