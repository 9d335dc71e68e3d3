"""What a pass is: a small frozen class with a name and typed options whose `apply` returns the
new graph and counts of what it rewrote (tests assert the counts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from nemocompile.graph.ir import Graph


@dataclass(frozen=True)
class PassOutput:
    graph: Graph
    counts: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # decisions worth telling the user (shown in the report)


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"

    def apply(self, graph: Graph) -> PassOutput:
        raise NotImplementedError(f"pass {self.name} does not implement apply")
