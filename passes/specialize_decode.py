"""specialize_decode: the graph for one-token decode steps. Mamba layers switch from the chunked
SSD scan to the single-step recurrence (constant cost per token, whatever the context length);
every downstream type is re-inferred (the step keeps the activation dtype, the scan is fp32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import rebuild_header, reemit
from nemocompile.graph.ir import Graph

from .base import Pass, PassOutput


@dataclass(frozen=True)
class SpecializeDecode(Pass):
    name: ClassVar[str] = "specialize_decode"

    def apply(self, graph: Graph) -> PassOutput:
        builder = rebuild_header(graph, self.name)
        replaced = 0
        for op in graph.ops:
            if op.opname == "ssd_chunk_scan":
                attrs = {k: v for k, v in op.attrs.items if k != "chunk_size"}
                reemit(builder, op, "ssd_state_update", attrs)
                replaced += 1
            else:
                reemit(builder, op)
        for name in graph.outputs:
            builder.output(name)
        return PassOutput(builder.build(), {"ssd_state_update": replaced})
