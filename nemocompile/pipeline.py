"""The build pipeline of a target: one ordered list of named steps, which the driver only runs.

A step is either a graph pass (`PassStep`: a pass from passes/ applied to one of the build's
graphs) or a driver step that needs weights or the runtime and so cannot live in passes/
(`PlanMemory`, `Calibrate`, `QuantizeWeights`). Both have a name and options, and every step is timed and
recorded the same way (`PassRecord`: seconds, counts, ops before/after, notes).

The build holds named graphs: `prefill` (the engine graph), `float` (prefill as it was before
precision assignment: calibration and the agreement check run it) and `decode` (the one-token
graph that specialize_decode forks from prefill). This module imports no torch: `plan` takes the
graph passes from the same list.

A build also moves through named phases a user can follow (`PHASES`: import, passes, calibration,
quantize-and-write, kernel selection, agreement check, write engine). Each step belongs to one
phase; `Phases` times each phase, counts its progress (steps, batches, bytes, prompts) and tells a
`PhaseListener` (the CLI's display or its log lines)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from nemocompile.base.errors import UsageError
from nemocompile.base.settings import settings
from nemocompile.graph.ir import Graph
from nemocompile.graph.text import print_graph
from nemocompile.graph.verifier import verify
from nemocompile.passes.assign_kv_cache import AssignKvCache
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.base import Pass
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.fuse_dequant_gemm import FuseDequantGemm
from nemocompile.passes.fuse_mamba import FuseMambaChain
from nemocompile.passes.fuse_moe import FuseExperts, FuseRouter
from nemocompile.passes.fuse_norms import FuseAddRmsNorm
from nemocompile.passes.manager import PassManager, PassRecord
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.passes.select_kernels import SelectKernels
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.passes.shard import Shard
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.targets import Target

if TYPE_CHECKING:
    from .driver import BuildContext

PREFILL, FLOAT, DECODE = "prefill", "float", "decode"
UNSHARDED = "unsharded"  # prefill before the shard pass: the agreement check runs it in one process
Printer = Callable[[str, str], None]  # (step name, IR text)

IMPORT, PASSES, CALIBRATION, QUANTIZE, KERNELS, AGREEMENT, WRITE = (
    "import", "passes", "calibration", "quantize-and-write", "kernel selection", "agreement check", "write engine")
PHASES = (IMPORT, PASSES, CALIBRATION, QUANTIZE, KERNELS, AGREEMENT, WRITE)  # in the order a build runs them


@dataclass(frozen=True)
class PhaseRecord:
    """One finished phase: its time, how far it counted (`done` of `total` `unit`s) and a summary."""

    name: str
    seconds: float
    done: int
    total: int | None
    unit: str  # "steps", "batches", "bytes", "prompts", "files" or "" (nothing to count)
    summary: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": round(self.seconds, 4), "done": self.done, "total": self.total,
                "unit": self.unit, "summary": self.summary}


@runtime_checkable
class PhaseListener(Protocol):
    """What follows a build's phases (the CLI's Rich display or its one log line per phase)."""

    def phase_started(self, name: str, total: int | None, unit: str) -> None: ...

    def phase_advanced(self, done: int, total: int | None, unit: str, detail: str) -> None: ...

    def phase_ended(self, record: PhaseRecord) -> None: ...


class Phases:
    """Times the phases of one build, in order, and tells the listener (if any) what happens."""

    def __init__(self, listener: PhaseListener | None = None) -> None:
        self.listener = listener
        self.records: list[PhaseRecord] = []
        self._current: str | None = None
        self._start = 0.0
        self._done = 0
        self._total: int | None = None
        self._unit = ""
        self._summary = ""

    @contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "") -> Iterator[Phases]:
        if name not in PHASES:
            raise ValueError(f"unknown build phase {name!r}")
        assert self._current is None, f"phase {name} started inside phase {self._current}"
        self._current, self._start, self._done, self._total, self._unit, self._summary = (
            name, time.perf_counter(), 0, total, unit, "")
        if self.listener:
            self.listener.phase_started(name, total, unit)
        try:
            yield self
        finally:
            self._current = None
        # a phase that failed ends nothing: the error says what happened
        record = PhaseRecord(name, time.perf_counter() - self._start, self._done, self._total, self._unit,
                             self._summary)
        self.records.append(record)
        if self.listener:
            self.listener.phase_ended(record)

    def set_total(self, total: int | None, unit: str | None = None) -> None:
        self._total = total
        if unit is not None:
            self._unit = unit
        if self.listener:
            self.listener.phase_advanced(self._done, self._total, self._unit, "")

    def advance(self, amount: int = 1, detail: str = "") -> None:
        self._done += amount
        if self.listener:
            self.listener.phase_advanced(self._done, self._total, self._unit, detail)

    def summarize(self, summary: str) -> None:
        """The phase's one-line summary (what it did), shown when it ends and kept in its record."""
        self._summary = summary


@dataclass(frozen=True)
class Step:
    """One named step of the pipeline."""

    name: ClassVar[str] = "step"
    graph: ClassVar[str] = PREFILL  # the graph the step reads (and, for --print-after, shows)
    changes_graph: ClassVar[bool] = False  # --print-after covers the steps that do
    phase: ClassVar[str] = PASSES  # the build phase it belongs to (consecutive steps of one phase share it)
    counted: ClassVar[bool] = False  # its phase counts steps (driver steps with their own units count those)

    def describe(self) -> str:
        return self.name

    def run(self, context: BuildContext) -> PassRecord:
        raise NotImplementedError(f"step {self.name} does not implement run")


@dataclass(frozen=True)
class PassStep(Step):
    """A graph pass on `reads`, its result stored as `writes` (the same graph unless it forks
    one, as specialize_decode forks decode), and optionally the graph before it kept as `keep`."""

    pipeline_pass: Pass = field(default_factory=Decompose)
    reads: str = PREFILL
    writes: str = PREFILL
    keep: str | None = None
    in_phase: str = PASSES
    changes_graph: ClassVar[bool] = True
    counted: ClassVar[bool] = True

    @property
    def phase(self) -> str:  # type: ignore[override]
        return self.in_phase

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.pipeline_pass.name

    @property
    def graph(self) -> str:  # type: ignore[override]
        return self.writes

    def describe(self) -> str:
        return self.name if self.reads == self.writes else f"{self.name} ({self.reads} -> {self.writes})"

    def run(self, context: BuildContext) -> PassRecord:
        return run_pass_step(self, context.graphs)


def run_pass_step(step: PassStep, graphs: dict[str, Graph]) -> PassRecord:
    source = graphs[step.reads]
    if step.keep:
        graphs[step.keep] = source
    manager = PassManager([step.pipeline_pass], verify_input=False, verify_each=settings().verify_each_pass)
    graphs[step.writes], (record,) = manager.run(source)
    return record


@dataclass(frozen=True)
class Calibrate(Step):
    """Static activation scales of the `quantize` ops whose scale the checkpoint lacks, from token
    batches run through the float graph on the reference runtime."""

    name: ClassVar[str] = "calibrate"
    phase: ClassVar[str] = CALIBRATION
    batches: int = 8
    data: Path | None = None  # a file of token ids, one sequence per line

    def run(self, context: BuildContext) -> PassRecord:
        scales = context.calibrate(self.batches, self.data)
        ops = len(context.graphs[PREFILL].ops)
        return PassRecord(self.name, 0.0, {"scales": len(scales)}, ops, ops)


@dataclass(frozen=True)
class PlanMemory(Step):
    """The memory plan per GPU (memory_plan.py) at the build's world size and run-time bounds, from
    the graph's formats; a plan that does not fit the target refuses the build here, before
    calibration and quantization run."""

    name: ClassVar[str] = "plan_memory"
    counted: ClassVar[bool] = True

    def run(self, context: BuildContext) -> PassRecord:
        plan = context.plan_memory()
        ops = len(context.graphs[PREFILL].ops)
        return PassRecord(self.name, 0.0, {"bytes_per_gpu": plan.bytes_per_gpu,
                                           "kv_bytes_per_token": plan.kv_bytes_per_token,
                                           "ssm_state_bytes_per_sequence": plan.ssm_state_bytes_per_sequence},
                          ops, ops)


@dataclass(frozen=True)
class QuantizeWeights(Step):
    """Stream every weight into the engine's weight file in its assigned format (NVFP4, FP8 or a
    float), one tensor at a time."""

    name: ClassVar[str] = "quantize_weights"
    phase: ClassVar[str] = QUANTIZE
    four_over_six: bool = False

    def run(self, context: BuildContext) -> PassRecord:
        counts = context.quantize_weights(self.four_over_six)
        ops = len(context.graphs[PREFILL].ops)
        return PassRecord(self.name, 0.0, counts, ops, ops)


def kernel_backends() -> tuple[str, ...]:
    """The backends kernel selection may choose from: Triton kernels only where triton is installed
    (the `[triton]` extra), so an engine built without it runs on the reference backend."""
    return ("reference", "triton") if importlib.util.find_spec("triton") is not None else ("reference",)


def build_steps(target: Target, policy: PrecisionPolicy, calibrate: int = 8,
                calibration_data: Path | None = None, shard: Shard | None = None) -> list[Step]:
    """The pipeline of a target, in order; `shard` splits the engine over ranks (after calibration,
    which runs the whole float model; the weights are written whole and then split per rank)."""
    sharding = [PassStep(shard, keep=UNSHARDED)] if shard is not None and shard.world_size > 1 else []
    return [
        PassStep(SetPrecision(policy.base, policy.components.get("ssm_state", "fp32"))),
        PassStep(Decompose()),
        PassStep(AssignPrecision(policy), keep=FLOAT),
        PassStep(AssignKvCache(policy.components.get("kv_cache", policy.base))),
        *fusion_steps(),
        PlanMemory(),
        Calibrate(calibrate, calibration_data),
        *sharding,
        QuantizeWeights(policy.nvfp4_four_over_six),
        # kernel selection: for the engine graph, then for the decode graph forked from it
        PassStep(SelectKernels(target.arch, kernel_backends()), in_phase=KERNELS),
        PassStep(SpecializeDecode(), writes=DECODE, in_phase=KERNELS),
        PassStep(SelectKernels(target.arch, kernel_backends()), reads=DECODE, writes=DECODE, in_phase=KERNELS),
    ]


def fusion_steps() -> list[PassStep]:
    """The fusions, in order: the routed experts first (they absorb their activation quantization and
    the dispatch's gather), then the router (whose rows nothing reads once the experts gather them),
    the norms (which absorb the quantize after them), the remaining quantize -> GEMM pairs, the Mamba
    chain. They run before calibration: scales_needed and the float graph calibration runs on do not
    depend on them."""
    return [PassStep(FuseExperts()), PassStep(FuseRouter()), PassStep(FuseAddRmsNorm()), PassStep(FuseDequantGemm()),
            PassStep(FuseMambaChain())]


FUSION_PASSES = ("fuse_experts", "fuse_router", "fuse_add_rms_norm", "fuse_dequant_gemm", "fuse_mamba_chain")


def fusion_counts(records: Sequence[PassRecord]) -> dict[str, int]:
    """Rewrites per fusion rule, from the fusion passes' records (report.md, build --json)."""
    counts: dict[str, int] = {}
    for record in records:
        if record.name in FUSION_PASSES:
            counts.update(record.counts)
    return counts


def graph_passes(steps: Sequence[Step]) -> list[Pass]:
    """The passes that make the prefill graph (what `plan` runs: no weights, no runtime)."""
    return [s.pipeline_pass for s in steps if isinstance(s, PassStep) and s.reads == s.writes == PREFILL]


def step_names(steps: Sequence[Step], changing_graph: bool = False) -> list[str]:
    """The steps' names in order, each once (optionally only the steps that change a graph)."""
    names: list[str] = []
    for step in steps:
        if step.name not in names and (step.changes_graph or not changing_graph):
            names.append(step.name)
    return names


def check_print_after(steps: Sequence[Step], print_after: frozenset[str]) -> None:
    known = {*step_names(steps, changing_graph=True), "all"}
    unknown = sorted(set(print_after) - known)
    if unknown:
        kind = "a step that does not change the graph" if unknown[0] in step_names(steps) else "an unknown step"
        raise UsageError(f"--print-after names {kind}, '{unknown[0]}'; steps that change the graph: "
                         f"{', '.join(sorted(known))}")


def phase_groups(steps: Sequence[Step]) -> list[tuple[str, list[Step]]]:
    """The steps grouped into their build phases: each run of consecutive steps of one phase."""
    groups: list[tuple[str, list[Step]]] = []
    for step in steps:
        if groups and groups[-1][0] == step.phase:
            groups[-1][1].append(step)
        else:
            groups.append((step.phase, [step]))
    return groups


def run_steps(steps: Sequence[Step], context: BuildContext, print_after: frozenset[str] = frozenset(),
              printer: Printer | None = None, phases: Phases | None = None) -> list[PassRecord]:
    """Run the steps in order, each timed and each within its build phase; print the graph a step
    wrote when asked."""
    if settings().verify_each_pass:
        verify(context.graphs[PREFILL], after="import")
    phases = phases or Phases()
    records: list[PassRecord] = []
    for name, group in phase_groups(steps):
        # graph-pass phases count steps; the driver steps count their own units (batches, bytes)
        counted = all(step.counted for step in group)
        with phases.phase(name, len(group) if counted else None, "steps" if counted else ""):
            for step in group:
                start = time.perf_counter()
                record = step.run(context)
                seconds = time.perf_counter() - start
                records.append(PassRecord(record.name, seconds, record.counts, record.ops_before, record.ops_after,
                                          record.notes, step.graph))
                if counted:
                    phases.advance(1, step.describe())
                    phases.summarize(", ".join(s.describe() for s in group))
                if printer and step.changes_graph and ({"all", step.name} & print_after):
                    printer(step.name, print_graph(context.graphs[step.graph]))
    return records


def timing_table(records: Sequence[PassRecord]) -> str:
    """Each step's time, ops before/after and counts, as a plain text table (`build --time-passes`)."""
    rows = [("step", "graph", "seconds", "ops", "counts")]
    for r in records:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items()) if v) or "-"
        ops = str(r.ops_after) if r.ops_before == r.ops_after else f"{r.ops_before} -> {r.ops_after}"
        rows.append((r.name, r.graph, f"{r.seconds:.4f}", ops, counts))
    total = sum(r.seconds for r in records)
    rows.append(("total", "", f"{total:.4f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]), row[3].rjust(widths[3])]
        lines.append("  ".join(cells) + "  " + row[4])
    return "\n".join(line.rstrip() for line in lines)


def record_json(record: PassRecord) -> dict[str, Any]:
    return {"name": record.name, "graph": record.graph, "seconds": round(record.seconds, 4),
            "counts": record.counts, "ops_before": record.ops_before, "ops_after": record.ops_after}
