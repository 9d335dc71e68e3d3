"""The build pipeline of a target: one ordered list of named steps, which the driver only runs.

A step is either a graph pass (`PassStep`: a pass from passes/ applied to one of the build's
graphs) or a driver step that needs weights or the runtime and so cannot live in passes/
(`Calibrate`, `QuantizeWeights`). Both have a name and options, and every step is timed and
recorded the same way (`PassRecord`: seconds, counts, ops before/after, notes).

The build holds named graphs: `prefill` (the engine graph), `float` (prefill as it was before
precision assignment: calibration and the agreement check run it) and `decode` (the one-token
graph that specialize_decode forks from prefill). This module imports no torch: `plan` takes the
graph passes from the same list."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nemocompile.base.errors import UsageError
from nemocompile.base.settings import settings
from nemocompile.graph.ir import Graph
from nemocompile.graph.text import print_graph
from nemocompile.graph.verifier import verify
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.base import Pass
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.manager import PassManager, PassRecord
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.passes.select_kernels import SelectKernels
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.targets import Target

if TYPE_CHECKING:
    from .driver import BuildContext

PREFILL, FLOAT, DECODE = "prefill", "float", "decode"
Printer = Callable[[str, str], None]  # (step name, IR text)


@dataclass(frozen=True)
class Step:
    """One named step of the pipeline."""

    name: ClassVar[str] = "step"
    graph: ClassVar[str] = PREFILL  # the graph the step reads (and, for --print-after, shows)
    changes_graph: ClassVar[bool] = False  # --print-after covers the steps that do

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
    changes_graph: ClassVar[bool] = True

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
    batches: int = 8
    data: Path | None = None  # a file of token ids, one sequence per line

    def run(self, context: BuildContext) -> PassRecord:
        scales = context.calibrate(self.batches, self.data)
        ops = len(context.graphs[PREFILL].ops)
        return PassRecord(self.name, 0.0, {"scales": len(scales)}, ops, ops)


@dataclass(frozen=True)
class QuantizeWeights(Step):
    """Stream every weight into the engine's weight file in its assigned format (NVFP4, FP8 or a
    float), one tensor at a time."""

    name: ClassVar[str] = "quantize_weights"
    four_over_six: bool = False

    def run(self, context: BuildContext) -> PassRecord:
        counts = context.quantize_weights(self.four_over_six)
        ops = len(context.graphs[PREFILL].ops)
        return PassRecord(self.name, 0.0, counts, ops, ops)


def build_steps(target: Target, policy: PrecisionPolicy, calibrate: int = 8,
                calibration_data: Path | None = None) -> list[Step]:
    """The pipeline of a target, in order."""
    return [
        PassStep(SetPrecision(policy.base, policy.components.get("ssm_state", "fp32"))),
        PassStep(Decompose()),
        PassStep(AssignPrecision(policy), keep=FLOAT),
        Calibrate(calibrate, calibration_data),
        QuantizeWeights(policy.nvfp4_four_over_six),
        PassStep(SelectKernels(target.arch)),
        PassStep(SpecializeDecode(), writes=DECODE),
        PassStep(SelectKernels(target.arch), reads=DECODE, writes=DECODE),
    ]


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


def run_steps(steps: Sequence[Step], context: BuildContext, print_after: frozenset[str] = frozenset(),
              printer: Printer | None = None) -> list[PassRecord]:
    """Run the steps in order, each timed; print the graph a step wrote when asked."""
    if settings().verify_each_pass:
        verify(context.graphs[PREFILL], after="import")
    records: list[PassRecord] = []
    for step in steps:
        start = time.perf_counter()
        record = step.run(context)
        seconds = time.perf_counter() - start
        records.append(PassRecord(record.name, seconds, record.counts, record.ops_before, record.ops_after,
                                  record.notes, step.graph))
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
