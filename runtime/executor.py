"""Executes a core-op graph: each op by the implementation its resolver picks (the kernel registry:
a registered kernel or the reference implementation; an engine's Triton backend: its kernels),
values kept by name, state in a Cache."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from nemocompile.base.errors import IRError, UsageError
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.nemotron_h import CACHE_LENS

from .cache import Cache
from .dtypes import value_dtype
from .kernels import Resolution, device_of, resolve
from .reference_dispatch import OpImpl
from .weights import WeightValue

# Called with each op and its operand values before it runs (calibration collects amax here).
Observer = Callable[[Op, Sequence["WeightValue | None"]], None]
Resolver = Callable[[Op, "torch.device | str"], Resolution]


class Executor:
    def __init__(self, graph: Graph, weights: Mapping[str, WeightValue], observer: Observer | None = None,
                 resolver: Resolver = resolve) -> None:
        """resolver: how each op finds its implementation (the kernel registry's `resolve` by
        default; an engine's backend passes its own)."""
        missing = [w.name for w in graph.weights if w.name not in weights]
        if missing:
            raise IRError(f"graph {graph.name} needs weights that were not loaded: {', '.join(missing[:5])}")
        unknown = [v.name for v in graph.inputs[1:] if v.name != CACHE_LENS]
        if unknown:
            raise IRError(f"graph {graph.name} has input %{unknown[0]}, which the runtime does not bind")
        self.graph = graph
        self.weights = weights
        self.observer = observer
        # Everything per op that does not depend on the call is resolved once, here.
        self.plan: list[tuple[OpImpl, tuple[str | None, ...], tuple[torch.dtype, ...]]] = [
            (resolver(op, device_of(weights)), op.operands, tuple(value_dtype(r.type.dtype) for r in op.results))
            for op in graph.ops
        ]
        # Values no later op reads are dropped as soon as possible (bounded activation memory).
        last_use: dict[str, int] = {}
        for index, op in enumerate(graph.ops):
            for name in op.operands:
                if name is not None:
                    last_use[name] = index
        self.release_after: list[list[str]] = [[] for _ in graph.ops]
        keep = set(graph.outputs) | set(weights) | {slot.update for slot in graph.states}
        for name, index in last_use.items():
            if name not in keep:
                self.release_after[index].append(name)

    def run(self, input_ids: torch.Tensor, cache: Cache) -> dict[str, torch.Tensor]:
        if input_ids.dim() != 2:
            raise UsageError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        if input_ids.shape[0] != cache.batch_size:
            raise UsageError(f"input_ids has batch {input_ids.shape[0]} but the cache holds {cache.batch_size}")
        weights = self.weights
        cache.reserve(input_ids.shape[1])
        # The first input takes the token ids (or a test graph's activations); the rest are by name.
        values: dict[str, torch.Tensor] = {self.graph.inputs[0].name: input_ids}
        values.update({v.name: cache.lengths for v in self.graph.inputs[1:]})
        values.update(cache.tensors)
        for index, (op, (impl, operands, dtypes)) in enumerate(zip(self.graph.ops, self.plan, strict=True)):
            args = [None if name is None else values[name] if name in values else weights[name]
                    for name in operands]
            if self.observer is not None:
                self.observer(op, args)
            results = impl(op, args)
            for value, tensor, dtype in zip(op.results, results, dtypes, strict=True):
                if tensor.dtype != dtype:
                    raise IRError(f"{op.opname} at {op.scope} produced {tensor.dtype} for %{value.name}, "
                                  f"the IR says {value.type.dtype}")
                values[value.name] = tensor
            for name in self.release_after[index]:
                values.pop(name, None)
        for slot in self.graph.states:
            cache.tensors[slot.name] = values[slot.update]
        cache.advance(input_ids.shape[1])
        return {name: values[name] for name in self.graph.outputs}
