"""Executes a core-op graph: each op by the implementation its resolver picks (the kernel
registry: a registered kernel or the reference implementation; an engine's Triton backend: its kernels), state in a Cache.

Everything that does not depend on the call is resolved once, when the executor is made: each
op's implementation, where each operand lives and when each value can be dropped. Values live in
a flat register list indexed by slot (weights pre-placed), so a call copies one list and runs a
loop of plain indexing: no dict is rebuilt per op or per call."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from nemocompile.base.errors import IRError, UsageError
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.nemotron_h import CACHE_LENS, SEQ_LENS

from .cache import Cache
from .compiled_step import CompiledSteps
from .cpu_gemm import PackedLinear, pack, packable_weights
from .dtypes import value_dtype
from .kernels import Resolution, device_of, resolve
from .quantized_ops import prepare
from .reference_dispatch import OpImpl
from .step_results import store_results
from .weights import WeightValue

# Called with each op and its operand values before it runs (calibration collects amax here).
Observer = Callable[[Op, Sequence["WeightValue | None"]], None]
Resolver = Callable[[Op, "torch.device | str"], Resolution]
BOUND_INPUTS = (CACHE_LENS, SEQ_LENS)  # graph inputs after the first that the runtime binds


@dataclass(frozen=True)
class Step:
    """One op, resolved: its implementation, the register of each operand (-1: absent), the
    registers its results go to with the dtypes the IR gives them, and the registers no later
    op reads (freed after it runs: bounded activation memory)."""

    op: Op
    impl: OpImpl
    operands: tuple[int, ...]
    results: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    release: tuple[int, ...]


class Executor:
    def __init__(self, graph: Graph, weights: Mapping[str, WeightValue], observer: Observer | None = None,
                 resolver: Resolver = resolve, prepared: dict[str, WeightValue] | None = None,
                 compile: bool = False, dense_weights: bool = False) -> None:
        """resolver: how each op finds its implementation (the kernel registry's `resolve` by
        default; an engine's backend passes its own). prepared: weights already put in the layout
        the GEMMs read fastest, by name, shared with the other executors of an engine (its prefill
        and decode graphs) so that each weight is prepared, and held, once; this executor adds
        the ones it prepares. compile: run the ops that Inductor can trace as compiled runs
        (runtime/compiled_step.py; on the CPU, without an observer). dense_weights: float32 GEMM
        weights go to oneDNN in their dense layout, not packed (runtime/cpu_gemm.py), as compiled
        runs read them."""
        missing = [w.name for w in graph.weights if w.name not in weights]
        if missing:
            raise IRError(f"graph {graph.name} needs weights that were not loaded: {', '.join(missing[:5])}")
        unknown = [v.name for v in graph.inputs[1:] if v.name not in BOUND_INPUTS]
        if unknown:
            raise IRError(f"graph {graph.name} has input %{unknown[0]}, which the runtime does not bind")
        self.graph = graph
        self.weights = weights
        self.observer = observer
        slot: dict[str, int] = {}

        def register(name: str) -> int:
            return slot.setdefault(name, len(slot))

        self.input_slot = register(graph.inputs[0].name)
        self.bound_slots = {v.name: register(v.name) for v in graph.inputs[1:]}
        self.state_slots = [(s.name, register(s.name)) for s in graph.states]
        weight_slots = {w.name: register(w.name) for w in graph.weights}
        for op in graph.ops:
            for name in op.operands:
                if name is not None and name not in slot:
                    raise IRError(f"{op.opname} at {op.scope} reads %{name}, which nothing defines before it")
            for result in op.results:
                register(result.name)
        self.update_slots = [(s.name, slot[s.update]) for s in graph.states]
        self.output_slots = [(name, slot[name]) for name in graph.outputs]
        keep = {slot[name] for name in graph.outputs} | set(weight_slots.values()) | \
            {index for _, index in self.update_slots}
        last_use: dict[int, int] = {}
        for position, op in enumerate(graph.ops):
            for name in op.operands:
                if name is not None:
                    last_use[slot[name]] = position
        release: list[list[int]] = [[] for _ in graph.ops]
        for index, position in last_use.items():
            if index not in keep:
                release[position].append(index)
        device = device_of(weights)
        self.steps = [
            Step(op, resolver(op, device), tuple(-1 if name is None else slot[name] for name in op.operands),
                 tuple(slot[r.name] for r in op.results), tuple(value_dtype(r.type.dtype) for r in op.results),
                 tuple(release[position]))
            for position, op in enumerate(graph.ops)
        ]
        # The layout the GEMMs read fastest; float32 GEMM weights packed for oneDNN on the CPU,
        # unless an observer (calibration) reads the operands.
        if compile and (observer is not None or device.type != "cpu"):
            raise UsageError("compiled decode runs on the CPU reference runtime, without an observer")
        packed = set() if observer is not None else packable_weights(
            [(step.op, step.impl.kernel if isinstance(step.impl, Resolution) else "") for step in self.steps],
            weights, device)
        shared = {} if prepared is None else prepared
        self.base: list[WeightValue | None] = [None] * len(slot)
        for name, index in weight_slots.items():
            value = shared.get(name)
            if value is None or isinstance(value, PackedLinear) != (name in packed):
                value = (pack(weights[name], dense_weights) if name in packed  # type: ignore[arg-type]
                         else prepare(weights[name]))
                shared[name] = value
            self.base[index] = value
        wanted = {index for _, index in self.output_slots} | {index for _, index in self.update_slots}
        self.compiled = (CompiledSteps(graph.name, self.steps, self.base, wanted,
                                       frozenset(index for _, index in self.state_slots)) if compile else None)

    @property
    def plan(self) -> list[tuple[OpImpl, tuple[int, ...], tuple[torch.dtype, ...]]]:
        """Each op's implementation (a kernels.Resolution), operand registers and result dtypes."""
        return [(step.impl, step.operands, step.dtypes) for step in self.steps]

    @property
    def takes_seq_lens(self) -> bool:
        """Whether the graph reads `seq_lens`, i.e. whether right-padded batches run exactly."""
        return SEQ_LENS in self.bound_slots

    def run(self, input_ids: torch.Tensor, cache: Cache, seq_lens: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Run the graph on input_ids [batch, seq], continuing the sequences `cache` holds. With
        `seq_lens`, sequence b's first seq_lens[b] tokens are real and the rest right padding: its
        state and length advance by seq_lens[b] only (0 leaves it as it was)."""
        if input_ids.dim() != 2:
            raise UsageError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        batch, length = input_ids.shape
        if batch != cache.batch_size:
            raise UsageError(f"input_ids has batch {batch} but the cache holds {cache.batch_size}")
        if seq_lens is not None:
            if len(seq_lens) != batch or any(n < 0 or n > length for n in seq_lens):
                raise UsageError(f"seq_lens must give each of the {batch} sequences 0..{length} tokens, got "
                                 f"{list(seq_lens)}")
            if not self.takes_seq_lens and any(n != length for n in seq_lens):
                raise UsageError(f"graph {self.graph.name} has no seq_lens input, so it cannot run sequences of "
                                 f"different lengths together; rebuild the engine")
        cache.reserve(length)
        regs = list(self.base)
        regs[self.input_slot] = input_ids
        for name, index in self.bound_slots.items():
            if name == CACHE_LENS:
                regs[index] = cache.lengths
            else:
                regs[index] = (torch.full((batch,), length, dtype=torch.int64, device=cache.lengths.device)
                               if seq_lens is None else
                               torch.tensor(list(seq_lens), dtype=torch.int64, device=cache.lengths.device))
        tensors = cache.tensors
        for name, index in self.state_slots:
            regs[index] = tensors[name]
        observer = self.observer
        if self.compiled is not None:
            self.compiled.run(regs)
        else:
            for step in self.steps:
                args = [None if index < 0 else regs[index] for index in step.operands]
                if observer is not None:
                    observer(step.op, args)
                store_results(step, step.impl(step.op, args), regs)
                for index in step.release:
                    regs[index] = None
        for name, index in self.update_slots:
            value = regs[index]
            assert isinstance(value, torch.Tensor)
            tensors[name] = value
        cache.advance(length if seq_lens is None else list(seq_lens))
        out: dict[str, torch.Tensor] = {}
        for name, index in self.output_slots:
            value = regs[index]
            assert isinstance(value, torch.Tensor)
            out[name] = value
        return out
