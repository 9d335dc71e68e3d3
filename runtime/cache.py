"""Per-sequence state between calls, bound to the graph's state slots: the key and value caches of
attention layers (preallocated along `ctx`, grown by doubling up to the graph's bound) and the conv
windows and SSM states of Mamba layers, plus how many tokens each sequence holds.

A sequence's state can be taken out of a cache (`sequence_state`: its own copy, KV trimmed to its
length) and put into a new one (`Cache.from_states`), which is how sequences fork, snapshot and are
kept for prefix reuse. The cache also remembers, per sequence, the token ids its state holds (when
every call that advanced it recorded them) and the tokens chosen for it that are not in its state
yet (a generation's last token), so a conversation continues exactly where it stopped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    # history[b]: the token ids sequence b's state holds, valid while len(history[b]) == host_lengths[b]
    # (a call that advanced the state without recording its ids leaves them unknown)
    history: list[list[int]] = field(default_factory=list)
    # pending[b]: tokens chosen for sequence b (the last one a generation picked) not yet in its state;
    # a continuation processes them before its new tokens
    pending: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.history:
            self.history = [[] for _ in range(self.batch_size)]
        if not self.pending:
            self.pending = [[] for _ in range(self.batch_size)]

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

    def record(self, seq: int, tokens: Sequence[int]) -> None:
        """Note that sequence `seq`'s state now also holds `tokens` (call after the step that took them)."""
        self.history[seq].extend(int(t) for t in tokens)

    def take_pending(self) -> list[list[int]]:
        """The pending tokens of every sequence, which the cache then forgets (the caller processes them)."""
        taken, self.pending = self.pending, [[] for _ in range(self.batch_size)]
        return taken

    def tokens(self, seq: int) -> tuple[int, ...] | None:
        """The token ids sequence `seq`'s state holds, or None where some call did not record them."""
        history = self.history[seq]
        return tuple(history) if len(history) == self.host_lengths[seq] else None

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.batch_size:
            raise UsageError(f"sequence {seq} is not in this cache of {self.batch_size} sequences")

    def sequence_state(self, seq: int) -> SequenceState:
        """A copy of sequence `seq`'s state: each slot with a batch of one, KV caches trimmed to its
        length (the positions past it hold nothing of the sequence)."""
        self._check_seq(seq)
        length = self.host_lengths[seq]
        tensors: dict[str, torch.Tensor] = {}
        for slot in self.slots:
            tensor = self.tensors[slot.name].narrow(0, seq, 1)
            if CTX in slot.type.shape:
                tensor = tensor.narrow(slot.type.shape.index(CTX), 0, length)
            tensors[slot.name] = tensor.clone()
        return SequenceState(tensors, length, self.tokens(seq), tuple(self.pending[seq]))

    def fork(self, seq: int, copies: int = 1) -> Cache:
        """A new cache of `copies` sequences, each starting from sequence `seq`'s state (tokens and
        pending tokens included); they and this cache then diverge independently. Costs a copy of
        the fixed-size Mamba state and of the sequence's KV positions, nothing else."""
        if copies < 1:
            raise UsageError(f"fork needs at least one copy, got {copies}")
        state = self.sequence_state(seq)
        return Cache.from_states(self.slots, [state] * copies, self.max_context, self.lengths.device)

    @staticmethod
    def from_states(slots: tuple[StateSlot, ...], states: Sequence[SequenceState | None], max_context: int,
                    device: torch.device) -> Cache:
        """A cache whose sequence b starts from states[b] (None: a fresh sequence), each copied in."""
        if not states:
            raise UsageError("a cache needs at least one sequence")
        lengths = [0 if state is None else state.length for state in states]
        longest = max(lengths)
        if longest > max_context:
            raise UsageError(f"a state of {longest} tokens exceeds the engine's context bound of {max_context}")
        capacity = 0 if longest == 0 else min(max(longest, SMALLEST_GROWTH), max_context)
        batch = len(states)
        tensors: dict[str, torch.Tensor] = {}
        for slot in slots:
            tensor = torch.zeros(_shape(slot, batch, capacity), dtype=torch_dtype(slot.type.dtype), device=device)
            for row, state in enumerate(states):
                if state is None:
                    continue
                given = state.tensors.get(slot.name)
                if given is None:
                    raise UsageError(f"the state to restore has no tensor for slot {slot.name}")
                target = tensor.narrow(0, row, 1)
                if CTX in slot.type.shape:
                    target = target.narrow(slot.type.shape.index(CTX), 0, state.length)
                if tuple(given.shape) != tuple(target.shape) or given.dtype != target.dtype:
                    raise UsageError(f"the state to restore has {given.dtype} {list(given.shape)} for slot "
                                     f"{slot.name}, which needs {target.dtype} {list(target.shape)}")
                target.copy_(given)
            tensors[slot.name] = tensor
        history = [list(state.tokens) if state is not None and state.tokens is not None else [] for state in states]
        pending = [list(state.pending) if state is not None else [] for state in states]
        return Cache(batch, slots, tensors, torch.tensor(lengths, dtype=torch.int64, device=device), lengths,
                     capacity, max_context, history, pending)


@dataclass(frozen=True)
class SequenceState:
    """One sequence's state, out of any cache: each slot's tensor (batch of one; KV trimmed to
    `length` positions), the token ids it holds when known, and tokens chosen but not yet in it."""

    tensors: dict[str, torch.Tensor]
    length: int
    tokens: tuple[int, ...] | None
    pending: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.tokens is not None and len(self.tokens) != self.length:
            raise UsageError(f"a state of {self.length} tokens cannot hold the {len(self.tokens)} token ids given")

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
    history = [list(h) for c in caches for h in c.history]
    pending = [list(p) for c in caches for p in c.pending]
    return Cache(len(host_lengths), first.slots, tensors, lengths, host_lengths, capacity, first.max_context,
                 history, pending)
