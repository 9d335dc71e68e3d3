"""The op reference (docs/ops.md), generated from the op declarations so it cannot drift:
`python -m nemocompile.graph.opdoc > docs/ops.md`; a test checks the file is current."""

from __future__ import annotations

from .opdef import LEVELS, REGISTRY, OpDef
from .ops import ACTIVATIONS


def _row(definition: OpDef) -> str:
    attrs = ", ".join(f"{name}: {kind}" for name, kind in definition.attrs) or "-"
    results = "variadic" if definition.results == ("*",) else ", ".join(definition.results)
    return (f"| `{definition.name}` | {', '.join(str(o) for o in definition.operands)} | {results} | {attrs} | "
            f"{definition.doc} |")


def op_reference_markdown() -> str:
    lines = [
        "# Op reference",
        "",
        "Generated from `graph/ops.py` by `python -m nemocompile.graph.opdoc > docs/ops.md`; do not edit.",
        "An operand ending in `?` is optional (printed `_` when absent); `:role` names what the operand is",
        "(weight, scale, bias, state, index; unmarked operands are activations). A `state` operand is a state",
        "slot of the graph and the op returns its new content as a result. An attribute kind ending in `?`",
        "may be left out. The meaning of each core op is its reference implementation in",
        "`runtime/reference/` (quantized GEMMs: `runtime/quantized_ops.py`).",
        f"Activation kinds: {', '.join(ACTIVATIONS)}.",
    ]
    for level in LEVELS:
        definitions = [d for d in REGISTRY.values() if d.level == level]
        if not definitions:
            continue
        lines += ["", f"## {level} ops", "", "| op | operands | results | attributes | meaning |",
                  "|---|---|---|---|---|"]
        lines += [_row(d) for d in definitions]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(op_reference_markdown(), end="")
