"""Generation for a batch of requests: prompts of different lengths (right-padded into one prefill,
each sequence's state advanced by its own tokens only), a stop set and a token budget per sequence,
and greedy or seeded top-p sampling with one generator per sequence, so a sequence's tokens do not
depend on the others in its batch. `stream` yields each step's tokens as they are chosen.

Generation can continue a cache (each request's prompt is appended to its sequence, so a turn of a
conversation costs only its own tokens) or, given a PrefixStore, start each request from the
longest kept state of a prefix of its prompt and keep states for later requests (docs/agent-loops.md).
A sequence's last generated token is not in its state when generation ends (nothing has processed
it yet): the cache holds it as pending, and a continuation processes it first."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from nemocompile.base.errors import UsageError

from .cache import Cache, SequenceState
from .prefix import PrefixStore
from .sampling import check_sampling, next_tokens


@dataclass(frozen=True)
class Request:
    """One sequence to continue: its prompt, at most `max_new_tokens` new tokens, stopping after
    the first token in `stop_token_ids` (which is kept), sampled from a generator seeded with `seed`."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise UsageError("every prompt needs at least one token")
        if self.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass(frozen=True)
class StepTokens:
    """One generation step: the token each sequence took (None: it had finished before this step),
    and whether each has finished after it (stop token or budget reached)."""

    tokens: tuple[int | None, ...]
    finished: tuple[bool, ...]


def _per_sequence(value: int | Sequence[int], count: int, what: str) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise UsageError(f"{what} gives {len(values)} values for {count} prompts")
    return values


def make_requests(prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int | Sequence[int],
                  stop_token_ids: Iterable[int] | Sequence[Iterable[int]] | None = None,
                  seed: int | Sequence[int] | None = None) -> list[Request]:
    """Requests for `prompts` (lists of ids; lengths may differ). `max_new_tokens` and `seed` are one
    value for all or one per prompt; `stop_token_ids` is one set of ids for all (e.g. [2]) or one
    per prompt (e.g. [[2], [2, 7]]). Each sequence samples from its own generator: one seed s gives
    sequence b the seed s + b (so sequence 0 samples as it would alone, and the others draw
    independently); a list gives each its own; without a seed, one random s is drawn."""
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
    if not rows:
        raise UsageError("generation needs at least one prompt")
    budgets = _per_sequence(max_new_tokens, len(rows), "max_new_tokens")
    if seed is None:
        seed = int(torch.seed() % (1 << 63))
    seeds = [seed + row for row in range(len(rows))] if isinstance(seed, int) else \
        _per_sequence(seed, len(rows), "seed")
    stops: list[frozenset[int]]
    if stop_token_ids is None:
        stops = [frozenset()] * len(rows)
    else:
        given: list[int | Iterable[int]] = list(stop_token_ids)
        shared = [item for item in given if isinstance(item, int)]
        per_row = [frozenset(item) for item in given if not isinstance(item, int)]
        if len(shared) == len(given):
            stops = [frozenset(shared)] * len(rows)
        elif len(per_row) == len(given) == len(rows):
            stops = per_row
        else:
            raise UsageError(f"stop_token_ids must be one list of ids for all prompts or one list per prompt "
                             f"({len(rows)}), got {given!r}")
    return [Request(tuple(int(t) for t in row), budget, stop, s)
            for row, budget, stop, s in zip(rows, budgets, stops, seeds, strict=True)]


class Model(Protocol):
    """What generation needs of an engine."""

    device: torch.device
    vocab_size: int

    def new_cache(self, batch_size: int) -> Cache: ...

    def cache_from_states(self, states: Sequence[SequenceState | None]) -> Cache: ...

    def check_requests(self, requests: Sequence[Request], context: Sequence[int] | None = None) -> None: ...

    def step(self, ids: torch.Tensor, cache: Cache, seq_lens: Sequence[int] | None) -> torch.Tensor: ...


def stream(model: Model, requests: Sequence[Request], temperature: float = 0.0, top_p: float = 1.0,
           cache: Cache | None = None, store: PrefixStore | None = None) -> Iterator[StepTokens]:
    """Yield each generation step of `requests` as it is computed. Everything is checked (sampling
    options, ids, the engine's batch and context bounds) before anything runs.

    cache: continue the sequences it holds (request b's prompt is appended to sequence b, whose
    pending tokens the caller has put in front of it); the cache is updated in place and, once a
    sequence has generated, holds its last token as pending. Without a cache, each request starts
    from the longest state `store` keeps for a prefix of its prompt (or from nothing). With a store,
    each sequence's state is kept at the end (and every `store.keep_every` prompt tokens)."""
    check_sampling(temperature, top_p)
    if not requests:
        raise UsageError("generation needs at least one prompt")
    if cache is not None and len(requests) != cache.batch_size:
        raise UsageError(f"{len(requests)} prompts were given to continue a cache of {cache.batch_size} sequences")
    model.check_requests(requests, None if cache is None else cache.host_lengths)
    return _steps(model, list(requests), temperature, top_p, cache, store)


def _prefill(model: Model, cache: Cache, prompts: list[list[int]], store: PrefixStore | None) -> torch.Tensor:
    """Run `prompts` (one per sequence, possibly empty, right-padded together) into `cache`; returns
    the logits [batch, vocab] of each sequence's last prompt token. With a store that keeps every N
    tokens, the prompts run in pieces ending at multiples of N, and the state at each is kept."""
    batch = len(prompts)
    every = store.keep_every if store is not None else None
    done = [0] * batch
    last: list[torch.Tensor | None] = [None] * batch
    while any(done[row] < len(prompts[row]) for row in range(batch)):
        sizes = []
        for row in range(batch):
            remaining = len(prompts[row]) - done[row]
            room = remaining if every is None else every - cache.host_lengths[row] % every
            sizes.append(min(remaining, room))
        width = max(sizes)
        # Right padding: a sequence's padding comes after its real tokens, which never see it (causal
        # attention and convolution), and seq_lens keeps it out of the state.
        padded = torch.zeros(batch, width, dtype=torch.int64)
        for row, size in enumerate(sizes):
            padded[row, :size] = torch.tensor(prompts[row][done[row]:done[row] + size], dtype=torch.int64)
        logits = model.step(padded.to(model.device), cache, None if len(set(sizes)) == 1 else sizes)
        for row, size in enumerate(sizes):
            if size == 0:
                continue
            last[row] = logits[row, size - 1]
            cache.record(row, prompts[row][done[row]:done[row] + size])
            done[row] += size
            if store is not None and every is not None and done[row] < len(prompts[row]) \
                    and cache.host_lengths[row] % every == 0:
                _keep(store, cache, row)
    if any(row is None for row in last):
        raise UsageError("every sequence needs at least one token to process")
    return torch.stack([row for row in last if row is not None])


def _keep(store: PrefixStore, cache: Cache, row: int) -> None:
    if cache.tokens(row) is not None:
        store.keep(cache.sequence_state(row))


def _steps(model: Model, requests: list[Request], temperature: float, top_p: float, cache: Cache | None,
           store: PrefixStore | None) -> Iterator[StepTokens]:
    batch = len(requests)
    device = model.device
    generators = []
    for request in requests:
        generator = torch.Generator(device=device)
        generator.manual_seed(request.seed if request.seed is not None else 0)
        generators.append(generator)
    produced = [0] * batch
    finished = [request.max_new_tokens == 0 for request in requests]
    if all(finished) and cache is None and store is None:
        return
    prompts = [list(request.prompt) for request in requests]
    if cache is None:
        found = [store.longest(prompt) if store is not None else None for prompt in prompts]
        cache = model.cache_from_states(found) if any(state is not None for state in found) else \
            model.new_cache(batch)
        prompts = [prompt if state is None else prompt[state.length:] for prompt, state in zip(prompts, found, strict=True)]
    for row in range(batch):
        cache.pending[row] = []  # the caller put them in front of the prompt
    last = _prefill(model, cache, prompts, store)
    while not all(finished):
        tokens: list[int | None] = [None] * batch
        for row in range(batch):
            if finished[row]:
                continue
            choice = int(next_tokens(last[row:row + 1], temperature, top_p, generators[row])[0])
            tokens[row] = choice
            cache.pending[row] = [choice]  # chosen, not yet in the state
            produced[row] += 1
            request = requests[row]
            finished[row] = choice in request.stop_token_ids or produced[row] >= request.max_new_tokens
        if all(finished) and store is not None:
            for row in range(batch):
                _keep(store, cache, row)
        yield StepTokens(tuple(tokens), tuple(finished))
        if all(finished):
            return
        active = [0 if done else 1 for done in finished]
        step_ids = torch.tensor([[token if token is not None and not done else 0]
                                 for token, done in zip(tokens, finished, strict=True)], dtype=torch.int64)
        logits = model.step(step_ids.to(device), cache, None if all(active) else active)
        for row, token in enumerate(tokens):
            if token is not None and not finished[row]:
                cache.record(row, [token])
                cache.pending[row] = []
        last = logits[:, -1]
    if store is not None:  # nothing was generated: the prompts alone
        for row in range(batch):
            _keep(store, cache, row)


def collect(steps: Iterable[StepTokens], batch: int) -> list[list[int]]:
    """The new tokens of each sequence, from its steps."""
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in steps:
        for row, token in enumerate(step.tokens):
            if token is not None:
                out[row].append(token)
    return out
