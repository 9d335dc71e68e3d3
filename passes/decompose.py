"""decompose: lower the imported model blocks (mamba2_mixer, attention, mlp, moe) to core ops by
the decompositions in graph/decompositions.py.
Each block's last core op keeps the block's result name, so the rest of the graph is untouched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nemocompile.graph.builder import rebuild_header
from nemocompile.graph.decompositions import DECOMPOSITIONS
from nemocompile.graph.ir import Graph

from .base import Pass, PassOutput

RULES = DECOMPOSITIONS  # the block bodies live in the IR, where the runtime's composite runner finds them


@dataclass(frozen=True)
class Decompose(Pass):
    name: ClassVar[str] = "decompose"

    def apply(self, graph: Graph) -> PassOutput:
        builder = rebuild_header(graph, self.name)
        counts: dict[str, int] = {}
        for op in graph.ops:
            rule = RULES.get(op.opname)
            if rule is None:
                builder.append(op)
                continue
            rule(builder, op)
            counts[op.opname] = counts.get(op.opname, 0) + 1
        for name in graph.outputs:
            builder.output(name)
        return PassOutput(builder.build(), counts)
