"""Per-sequence state between calls, bound to the graph's state slots: the key and value caches of
attention layers (preallocated along `ctx`, grown by doubling up to the graph's bound) and the conv
windows and SSM states of Mamba layers, plus how many tokens each sequence holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nemocompile.base.errors import UsageError
from nemocompile.graph.ir import Graph, StateSlot

from .dtypes import torch_dtype

CTX = "ctx"  # the symbolic dim a cache grows along
SMALLEST_GROWTH = 16  # positions; the first allocation of a KV cache is at least this


def _shape(slot: StateSlot, batch_size: int, capacity: int) -> list[int]:
    dims: list[int] = []
    for dim in slot.type.shape:
        if dim == "batch":
            dims.append(batch_size)
        elif dim == CTX:
            dims.append(capacity)
        elif isinstance(dim, int):
            dims.append(dim)
        else:
            raise UsageError(f"state {slot.name} has an unknown symbolic dim '{dim}'")
    return dims


@dataclass
class Cache:
    """State of `batch_size` sequences. `lengths[b]` tokens of sequence b are cached; attention writes
    the next ones at that position. `capacity` positions are allocated along ctx."""

    batch_size: int
    slots: tuple[StateSlot, ...]
    tensors: dict[str, torch.Tensor]
    lengths: torch.Tensor  # int64 [batch], on the cache's device (a graph input)
    host_lengths: list[int]  # the same, on the host: no device sync to plan growth
    capacity: int
    max_context: int

    @staticmethod
    def for_graph(graph: Graph, batch_size: int, device: torch.device) -> Cache:
        bound = graph.dim_bound("batch")
        if batch_size < 1 or (bound is not None and batch_size > bound.high):
            limit = f" and at most {bound.high}" if bound is not None else ""
            raise UsageError(f"batch size must be at least 1{limit}, got {batch_size}")
        ctx = graph.dim_bound(CTX)
        max_context = ctx.high if ctx is not None else 1 << 62
        tensors = {slot.name: torch.zeros(_shape(slot, batch_size, 0), dtype=torch_dtype(slot.type.dtype),
                                          device=device) for slot in graph.states}
        return Cache(batch_size, graph.states, tensors, torch.zeros(batch_size, dtype=torch.int64, device=device),
                     [0] * batch_size, 0, max_context)

    @property
    def length(self) -> int:
        """The longest sequence's cached tokens."""
        return max(self.host_lengths)

    def reserve(self, new_tokens: int) -> None:
        """Make room for `new_tokens` more positions in every sequence (grows the KV caches)."""
        needed = self.length + new_tokens
        if needed > self.max_context:
            raise UsageError(f"{needed} tokens exceed the engine's context bound of {self.max_context}")
        if needed <= self.capacity:
            return
        self.grow_to(min(max(needed, 2 * self.capacity, SMALLEST_GROWTH), self.max_context))

    def grow_to(self, capacity: int) -> None:
        """Allocate `capacity` positions along ctx, keeping what is cached."""
        if capacity <= self.capacity:
            return
        for slot in self.slots:
            if CTX not in slot.type.shape:
                continue
            axis = slot.type.shape.index(CTX)
            old = self.tensors[slot.name]
            grown = old.new_zeros(_shape(slot, self.batch_size, capacity))
            grown.narrow(axis, 0, old.shape[axis]).copy_(old)
            self.tensors[slot.name] = grown
        self.capacity = capacity

    def advance(self, new_tokens: int | Sequence[int]) -> None:
        """Every sequence took `new_tokens` more tokens (or sequence b took new_tokens[b])."""
        if isinstance(new_tokens, int):
            self.host_lengths = [n + new_tokens for n in self.host_lengths]
            self.lengths += new_tokens
            return
        self.host_lengths = [n + extra for n, extra in zip(self.host_lengths, new_tokens, strict=True)]
        self.lengths.copy_(torch.tensor(self.host_lengths, dtype=torch.int64))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def stack_caches(caches: list[Cache]) -> Cache:
    """One cache holding the sequences of `caches` in order (they may hold different lengths: each
    keeps its own). The caches must come from the same graph."""
    if not caches:
        raise UsageError("stack_caches needs at least one cache")
    first = caches[0]
    if any(c.slots != first.slots for c in caches):
        raise UsageError("stack_caches: the caches belong to different graphs")
    capacity = max(c.capacity for c in caches)
    for cache in caches:
        cache.grow_to(capacity)  # every KV cache to the same capacity
    tensors = {slot.name: torch.cat([c.tensors[slot.name] for c in caches], dim=0) for slot in first.slots}
    host_lengths = [n for c in caches for n in c.host_lengths]
    lengths = torch.tensor(host_lengths, dtype=torch.int64, device=first.lengths.device)
    return Cache(len(host_lengths), first.slots, tensors, lengths, host_lengths, capacity, first.max_context)
