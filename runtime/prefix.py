"""Prefix reuse across requests: sequence states kept at chosen boundaries, found again by the
token ids they hold.

A Mamba layer's state is the whole past folded into a fixed-size tensor: it cannot be rewound to
an earlier position. So, unlike a transformer's KV cache, whose first n positions are the state of
any prefix of length n, a hybrid model's state can only be reused at a boundary where it was
kept. The runtime keeps a sequence's state at the end of each request it serves (its prompt and
every generated token but the last, which is not in the state yet) and, with `keep_every=N`, every
N tokens of its prompts (the prefill then runs in pieces ending at those positions). A new request
resumes from the longest kept state whose tokens start its prompt and processes only the rest;
the kept state is the one a recomputation would reach, so the result is the same (up to float
rounding of the different blocking, the same as splitting any prefill in two).

Memory is bounded by `max_bytes` (the states' tensor bytes); when a new state does not fit, the
least recently used ones are dropped. A state larger than the bound is not kept."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from nemocompile.base.errors import UsageError

from .cache import SequenceState


@dataclass
class PrefixStats:
    """What the store did: lookups that found a kept state, lookups that did not, the prompt tokens
    those hits did not have to recompute, states kept and states evicted."""

    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    kept: int = 0
    evicted: int = 0


class PrefixStore:
    """Sequence states keyed by the exact token ids they hold, least recently used dropped first."""

    def __init__(self, max_bytes: int, keep_every: int | None = None) -> None:
        if max_bytes < 0:
            raise UsageError(f"the prefix store's max_bytes must be >= 0, got {max_bytes}")
        if keep_every is not None and keep_every < 1:
            raise UsageError(f"keep_every must be at least 1 token, got {keep_every}")
        self.max_bytes = max_bytes
        self.keep_every = keep_every
        self.stats = PrefixStats()
        self._states: OrderedDict[tuple[int, ...], SequenceState] = OrderedDict()
        self._bytes = 0
        self._lengths: dict[int, int] = {}  # kept length -> how many states of that length

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lengths(self) -> list[int]:
        """The token counts of the kept states, shortest first."""
        return sorted(len(tokens) for tokens in self._states)

    def longest(self, prompt: Sequence[int]) -> SequenceState | None:
        """The kept state of the longest proper prefix of `prompt` (at least one token must remain
        to compute the next token's logits), marked as recently used; None when there is none."""
        tokens = tuple(prompt)
        for length in sorted(self._lengths, reverse=True):
            if length >= len(tokens):
                continue
            state = self._states.get(tokens[:length])
            if state is not None:
                self._states.move_to_end(tokens[:length])
                self.stats.hits += 1
                self.stats.reused_tokens += length
                return state
        self.stats.misses += 1
        return None

    def keep(self, state: SequenceState) -> bool:
        """Keep `state` (its tokens must be known); returns whether it was kept. Evicts least
        recently used states until it fits."""
        if state.tokens is None or state.length == 0:
            return False
        size = state.nbytes()
        if size > self.max_bytes:
            return False
        if state.tokens in self._states:
            self._states.move_to_end(state.tokens)
            return True
        while self._bytes + size > self.max_bytes:
            self._drop(next(iter(self._states)))
            self.stats.evicted += 1
        self._states[state.tokens] = dataclasses.replace(state, pending=())
        self._bytes += size
        self._lengths[state.length] = self._lengths.get(state.length, 0) + 1
        self.stats.kept += 1
        return True

    def _drop(self, tokens: tuple[int, ...]) -> None:
        state = self._states.pop(tokens)
        self._bytes -= state.nbytes()
        left = self._lengths[state.length] - 1
        if left:
            self._lengths[state.length] = left
        else:
            del self._lengths[state.length]

    def clear(self) -> None:
        for tokens in list(self._states):
            self._drop(tokens)
