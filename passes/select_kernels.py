"""select_kernels: choose each op's implementation for the target and record it in the IR.

For every op the candidates of the kernel catalog (graph/kernels.py) are narrowed to those whose
backend is allowed, that run on the target arch and accept the op's operand formats and attributes; a tuning
table's measured choice wins when it names one of them, else the highest priority does. The
choice is written as the op's `kernel` attribute (`{kernel = "reference"}` in the text form), which
the runtime's kernel registry reads. Counts are ops per chosen kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from nemocompile.graph.ir import Attrs, Graph
from nemocompile.graph.kernels import BACKENDS, Tuning, choose, operand_formats
from nemocompile.graph.opdef import KERNEL_ATTR

from .base import Pass, PassOutput


@dataclass(frozen=True)
class SelectKernels(Pass):
    name: ClassVar[str] = "select_kernels"
    arch: str = "sm_90"
    backends: tuple[str, ...] = BACKENDS
    tuning: Tuning | None = None

    def apply(self, graph: Graph) -> PassOutput:
        types = graph.value_types()
        counts: dict[str, int] = {}
        ops = []
        for op in graph.ops:
            op_attrs = {key: op.attrs.get(key) for key in op.attrs.keys()}
            chosen = choose(op.opname, operand_formats(op, types), self.arch, self.backends, self.tuning, op_attrs)
            counts[chosen.name] = counts.get(chosen.name, 0) + 1
            if op.attrs.get(KERNEL_ATTR) == chosen.name:
                ops.append(op)
                continue
            attrs = {key: value for key, value in op.attrs.items if key != KERNEL_ATTR}
            ops.append(replace(op, attrs=Attrs.of({**attrs, KERNEL_ATTR: chosen.name})))
        return PassOutput(replace(graph, ops=tuple(ops)), dict(sorted(counts.items())))
