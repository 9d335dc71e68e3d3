"""Runs a pipeline of passes: verifies after each (unless told not to: the driver passes its
`verify_each_pass` setting in), times each, keeps what each counted, and hands the IR after
chosen passes to a printer (--print-after)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nemocompile.graph.ir import Graph
from nemocompile.graph.text import print_graph
from nemocompile.graph.verifier import verify

from .base import Pass


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    counts: dict[str, int]
    ops_before: int
    ops_after: int
    notes: tuple[str, ...] = ()
    graph: str = "prefill"  # which of the build's graphs the step made (prefill, decode)


@dataclass
class PassManager:
    passes: Sequence[Pass]
    print_after: frozenset[str] = frozenset()  # pass names, or {"all"}
    printer: Callable[[str, str], None] | None = None  # (pass name, IR text)
    verify_input: bool = True  # off when the input is the verified output of an earlier run
    verify_each: bool = True  # verify the graph after every pass

    def run(self, graph: Graph) -> tuple[Graph, list[PassRecord]]:
        records: list[PassRecord] = []
        if self.verify_input and self.verify_each:
            verify(graph, after="import")
        for pipeline_pass in self.passes:
            start = time.perf_counter()
            output = pipeline_pass.apply(graph)
            if self.verify_each:
                verify(output.graph, after=pipeline_pass.name)
            seconds = time.perf_counter() - start
            records.append(PassRecord(pipeline_pass.name, seconds, dict(output.counts),
                                      len(graph.ops), len(output.graph.ops), output.notes))
            graph = output.graph
            if self.printer and ({"all", pipeline_pass.name} & self.print_after):
                self.printer(pipeline_pass.name, print_graph(graph))
        return graph, records
