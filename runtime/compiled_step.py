"""The decode step compiled by torch.compile (Inductor) on the CPU: `Engine(compile=True)`.

The eager executor pays Python and dispatcher time for every torch call of every op: about 400
calls per decode step of an 8-layer model, as much time as reading the weights. Here the steps of
a graph are cut into runs of ops that Inductor can trace (COMPILABLE, with the implementations of
runtime/compiled_ops.py where the reference one would not trace well) and the ops between them
(attention, whose work depends on each sequence's length; communication; quantized weights;
Triton kernels), which run eagerly. Each run becomes a generated Python function of its inputs
(straight-line code, one line per op; `CompiledSteps.source` shows it), compiled with static
shapes: once per batch size, on the first step of that size. Inductor fuses each run into a few
vectorised C++ loops.

Results agree with the eager executor to float32 rounding (the GEMMs' and the expert combine's
sums run in another order); tests/test_compiled_step.py states the tolerance and checks greedy
tokens against the eager engine."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nemocompile.base.errors import IRError
from nemocompile.graph.kernels import REFERENCE

from .compiled_ops import TRACEABLE
from .cpu_gemm import GEMM_WEIGHT_OPERAND, PackedLinear
from .kernels import Resolution
from .step_results import store_results

if TYPE_CHECKING:
    from .executor import Step

# Ops whose implementation Inductor traces as one graph, when their weights are plain tensors and
# they quantize no activation.
COMPILABLE = frozenset({"embedding", "rms_norm", "add_rms_norm", "add", "cast", "activation", "split",
                        "gated_rms_norm", "causal_conv1d", "ssd_state_update", "linear", "moe_route",
                        "moe_expert_up", "moe_expert_down"})
EXPERT_OPS = frozenset({"moe_expert_up", "moe_expert_down"})


def compilable(step: Step, base: Sequence[object]) -> bool:
    """Whether `step` can be part of a compiled run: a listed op, run by its reference
    implementation, whose weights (operands held in `base`) are plain float tensors (oneDNN weights
    held dense count as theirs), routed experts' float32."""
    op = step.op
    if op.opname not in COMPILABLE or op.attrs.get("act_format") is not None:
        return False
    if isinstance(step.impl, Resolution) and step.impl.kernel != REFERENCE:
        return False
    for position, index in enumerate(step.operands):
        held = base[index] if index >= 0 else None
        if held is None:  # absent, or not a weight
            continue
        value = _plain(held)  # None for a weight oneDNN holds packed
        if not (isinstance(value, torch.Tensor) and (value.is_floating_point() or op.opname == "embedding")):
            return False
        if op.opname in EXPERT_OPS and position == GEMM_WEIGHT_OPERAND[op.opname] and value.dtype != torch.float32:
            return False  # per-pair experts: float32 weights only
    return True


STATIC_DIMS = frozenset({"batch", "seq"})  # sizes fixed for every step of a batch: one compile
MIN_RUN_OPS = 3


def _compiled_flags(steps: Sequence[Step], base: Sequence[object]) -> list[bool]:
    """Which steps run compiled: those `compilable` that read no value whose size varies from step
    to step (a value with a dim other than batch and seq, made by an eager op: the rank's share of
    the token-expert pairs that `local_experts` keeps, for one); such a value would compile the
    run again for every size. What an op left eager for that reason makes varies too."""
    varying: set[int] = set()
    flags = []
    for step in steps:
        flag = compilable(step, base) and not varying.intersection(step.operands)
        if not flag:
            varying.update(index for index, result in zip(step.results, step.op.results, strict=True)
                           if any(isinstance(dim, str) and dim not in STATIC_DIMS for dim in result.type.shape))
        flags.append(flag)
    # A compiled call costs tens of microseconds (guards, wrappers), an eager pointwise op a few: a
    # run of fewer than MIN_RUN_OPS ops without a GEMM runs eagerly.
    for start, end, flag in _runs(steps, flags):
        if flag and end - start < MIN_RUN_OPS and not any(steps[i].op.opname in GEMM_WEIGHT_OPERAND for i in range(start, end)):
            flags[start:end] = [False] * (end - start)
    return flags


@dataclass(frozen=True)
class Run:
    """Steps start:end of the graph; compiled: a function of the registers `reads` returning the
    registers `writes` (with their dtypes), else None (the steps run one by one)."""

    start: int
    end: int
    reads: tuple[int, ...]
    writes: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    compiled: Callable[..., tuple[torch.Tensor, ...]] | None
    source: str
    fixed: tuple[object, ...] = ()  # per read: the weight as the compiled code reads it, None: a register


def _runs(steps: Sequence[Step], flags: Sequence[bool]) -> list[tuple[int, int, bool]]:
    """(start, end, flag) of each run of equal flags."""
    runs, start = [], 0
    for flag, group in itertools.groupby(range(len(steps)), key=lambda i: flags[i]):
        size = len(list(group))
        runs.append((start, start + size, flag))
        start += size
    return runs


def _generate(name: str, steps: Sequence[Step], reads: Sequence[int], writes: Sequence[int]) -> str:
    lines = [f"def {name}({', '.join(f'r{i}' for i in reads)}):"]
    for position, step in enumerate(steps):
        args = ", ".join("None" if i < 0 else f"r{i}" for i in step.operands)
        results = "".join(f"r{i}, " for i in step.results)
        lines.append(f"    {results}= impl{position}(op{position}, ({args}{',' if len(step.operands) == 1 else ''}))"
                     f"  # {step.op.opname} {step.op.scope}")
    lines.append(f"    return ({''.join(f'r{i}, ' for i in writes)})")
    return "\n".join(lines) + "\n"


class CompiledSteps:
    """A graph's steps as compiled runs and eager ops. `keep`: registers read after the steps
    (outputs, state updates) besides those later steps read."""

    def __init__(self, graph_name: str, steps: Sequence[Step], base: Sequence[object], keep: set[int],
                 states: frozenset[int] = frozenset()) -> None:
        """states: the registers of the graph's state inputs (see `run`)."""
        self.steps = list(steps)
        self.states = states
        flags = _compiled_flags(self.steps, base)
        later_reads: list[set[int]] = [set() for _ in range(len(self.steps) + 1)]
        later_reads[-1] = set(keep)
        for position in range(len(self.steps) - 1, -1, -1):
            later_reads[position] = later_reads[position + 1] | {i for i in self.steps[position].operands if i >= 0}
        self.runs: list[Run] = []
        for number, (start, end, flag) in enumerate(_runs(self.steps, flags)):
            if not flag:
                self.runs.append(Run(start, end, (), (), (), None, ""))
                continue
            chunk = self.steps[start:end]
            defined: dict[int, torch.dtype] = {}
            reads: list[int] = []
            for step in chunk:
                for index in step.operands:
                    if index >= 0 and index not in defined and index not in reads:
                        reads.append(index)
                defined.update(zip(step.results, step.dtypes, strict=True))
            writes = tuple(i for i in defined if i in later_reads[end])
            name = f"{graph_name.replace('-', '_')}_run{number}"
            source = _generate(name, chunk, reads, writes)
            namespace: dict[str, Any] = {}
            for position, step in enumerate(chunk):
                namespace[f"impl{position}"] = TRACEABLE.get(step.op.opname, step.impl)
                namespace[f"op{position}"] = step.op
            exec(compile(source, f"<nemocompile {name}>", "exec"), namespace)  # one code object per run
            # bf16 values rounded where the eager ops round them, not kept in float32 across fused ops
            function = torch.compile(namespace[name], dynamic=False, options={"emulate_precision_casts": True})
            fixed = tuple(None if base[i] is None else _plain(base[i]) for i in reads)
            self.runs.append(Run(start, end, tuple(reads), writes, tuple(defined[i] for i in writes),
                                 function, source, fixed))

    @property
    def source(self) -> str:
        """The generated code of every compiled run."""
        return "\n".join(run.source for run in self.runs if run.compiled is not None)

    @property
    def compiled_ops(self) -> int:
        return sum(run.end - run.start for run in self.runs if run.compiled is not None)

    def run(self, regs: list[Any]) -> None:
        """Run every step on the register list `regs` (in place)."""
        for run in self.runs:
            if run.compiled is None:
                for step in self.steps[run.start:run.end]:
                    args = [None if index < 0 else regs[index] for index in step.operands]
                    results = step.impl(step.op, args)
                    store_results(step, results, regs)
                continue
            values = run.compiled(*(self._input(index, regs[index]) if weight is None else weight
                                    for index, weight in zip(run.reads, run.fixed, strict=True)))
            for index, tensor, dtype in zip(run.writes, values, run.dtypes, strict=True):
                if tensor.dtype != dtype:
                    raise IRError(f"compiled steps {run.start}..{run.end} produced {tensor.dtype} for a value the IR "
                                  f"types {dtype}")
                regs[index] = tensor

    def _input(self, index: int, value: Any) -> Any:
        """A register's value as the compiled code reads it. A state made outside inference mode (a new cache, a
        restored snapshot) is copied into an inference tensor, as the states a step writes are:
        the compiled code is specialised to the kind of tensor it was first given."""
        value = _plain(value)
        if (index in self.states and isinstance(value, torch.Tensor) and not value.is_inference()
                and torch.is_inference_mode_enabled()):
            return value.clone()
        return value


def _plain(value: Any) -> Any:
    """A value as the compiled code reads it: a oneDNN weight's dense tensor; a tensor contiguous
    (a state written by prefill may have other strides than one written by decode, which would
    compile the run again)."""
    if isinstance(value, PackedLinear):
        return value.source
    return value.contiguous() if isinstance(value, torch.Tensor) else value
