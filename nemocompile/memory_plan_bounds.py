"""The run-time bounds a build takes when the user does not give them, as vLLM and TensorRT-LLM size
their KV cache from the memory they have rather than refuse to serve.

A bound given explicitly (--max-batch-size, --max-context) is kept, and a plan that does not fit it
is refused. A bound not given starts at its default (256 sequences, 131072 tokens; the context never
above the model's own limit, config.json's max_position_embeddings where present) and shrinks to
what the memory plan fits: the context is kept and the batch shrinks, down to one sequence; only
then does the context shrink. A model whose weights (and one sequence of one token) do not fit is
refused as before. docs/memory-plan.md states the rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .memory_plan import MemoryPlan, largest_true
from .options import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_CONTEXT

BATCH_OPTION, CONTEXT_OPTION = "--max-batch-size", "--max-context"


@dataclass(frozen=True)
class Bounds:
    """The engine's bounds, which of them the build chose (options not given) and why they differ
    from the defaults ("" when they do not)."""

    max_batch_size: int
    max_context: int
    automatic: tuple[str, ...] = ()  # BATCH_OPTION and/or CONTEXT_OPTION
    why: str = ""
    fits: bool = True  # False: not even the smallest bounds fit (the build is refused)

    @property
    def shrunk(self) -> bool:
        return bool(self.why)

    def describe(self) -> str:
        """One line: the bounds and, when chosen, that they were and why."""
        text = f"--max-batch-size {self.max_batch_size} --max-context {self.max_context}"
        if not self.automatic:
            return f"{text} (given)"
        chosen = " and ".join(self.automatic)
        if not self.fits:
            return f"{text} ({chosen} not given, but no smaller value fits either)"
        if not self.why:
            return f"{text} ({chosen} not given: the defaults, which fit)"
        return f"{text} ({chosen} not given: chosen automatically, {self.why})"

    def as_json(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "max_context": self.max_context,
                "chosen_automatically": list(self.automatic), "why": self.why, "fits": self.fits}


def context_limit(raw_config: Mapping[str, Any]) -> int | None:
    """The model's own context limit: config.json's max_position_embeddings when it is a positive integer."""
    value = raw_config.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def starting_bounds(batch: int | None, context: int | None, limit: int | None) -> tuple[int, int]:
    """The bounds before the plan: those given, else the defaults (the context within the model's limit)."""
    start_context = DEFAULT_MAX_CONTEXT if limit is None else min(DEFAULT_MAX_CONTEXT, limit)
    return (DEFAULT_MAX_BATCH_SIZE if batch is None else batch, start_context if context is None else context)


def _longest(fits: Callable[[int], bool], at_most: int) -> int:
    """The largest n in [0, at_most] with fits(n), for a `fits` that holds up to some n and not past it."""
    return at_most if fits(at_most) else largest_true(fits, at_most)


def choose_bounds(plan: MemoryPlan, batch: int | None, context: int | None,
                  limit: int | None = None) -> tuple[MemoryPlan, Bounds]:
    """`plan` (made at any bounds) at the engine's bounds: `batch` and `context` where given (None:
    not given), the others chosen by the rule above. When nothing fits, the plan is returned at the
    starting bounds, where it does not fit (check_fits refuses it, naming what would)."""
    start_batch, start_context = starting_bounds(batch, context, limit)
    automatic = tuple(option for option, given in ((BATCH_OPTION, batch), (CONTEXT_OPTION, context)) if given is None)
    chosen_batch, chosen_context = start_batch, start_context
    fits = plan.fits_at(start_batch, start_context)
    if automatic and not fits:
        if batch is None:  # keep the context, shrink the batch; at one sequence, shrink the context too
            chosen_batch = _longest(lambda n: plan.fits_at(n, start_context), start_batch)
            if chosen_batch == 0 and context is None:
                chosen_batch = 1
                chosen_context = _longest(lambda n: plan.fits_at(1, n), start_context)
        else:
            chosen_context = _longest(lambda n: plan.fits_at(batch, n), start_context)
        fits = min(chosen_batch, chosen_context) > 0
        if not fits:  # refused at the starting bounds
            chosen_batch, chosen_context = start_batch, start_context
    why = []
    if context is None and start_context < DEFAULT_MAX_CONTEXT:
        why.append(f"the model's max_position_embeddings is {limit}")
    if fits and (chosen_batch, chosen_context) != (start_batch, start_context):
        why.append(f"{start_batch} x {start_context} tokens do not fit {plan.target.name} at world size "
                   f"{plan.parallelism.world_size}")
    bounds = Bounds(chosen_batch, chosen_context, automatic, "; ".join(why) if fits else "", fits)
    return dataclasses.replace(plan, max_batch=chosen_batch, max_context=chosen_context), bounds
