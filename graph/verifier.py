"""The verifier: every value defined once before use, every op known with the right operands,
attributes and state slots, and every declared result type equal to what the op infers.
A rejection quotes the IR around the op at fault."""

from __future__ import annotations

from collections.abc import Mapping

from nemocompile.base.errors import IRError

from . import ops  # noqa: F401  (the declarations register themselves)
from .ir import Graph, Op, StateSlot, unique
from .opdef import REGISTRY
from .text import format_op, format_weight
from .types import TensorType


def _context(graph: Graph, index: int, radius: int = 2) -> str:
    lines = []
    for i in range(max(0, index - radius), min(len(graph.ops), index + radius + 1)):
        marker = ">>" if i == index else "  "
        lines.append(f"{marker} {format_op(graph.ops[i])}")
    return "\n".join(lines)


def _check_op(op: Op, types: dict[str, TensorType], slots: Mapping[str, StateSlot]) -> str | None:
    if op.opname not in REGISTRY:
        return f"unknown op '{op.opname}'"
    definition = REGISTRY[op.opname]
    if len(op.operands) != len(definition.operands):
        return (f"{op.opname} takes {len(definition.operands)} operands "
                f"({', '.join(str(o) for o in definition.operands)}), got {len(op.operands)}")
    operand_types: list[TensorType | None] = []
    for index, name in enumerate(op.operands):
        if name is None:
            if not definition.is_optional(index):
                return f"operand '{definition.operand_names[index]}' of {op.opname} is required"
            operand_types.append(None)
            continue
        if name not in types:
            return f"%{name} is used before it is defined"
        operand_types.append(types[name].local())  # a sharded weight or state: the rank's piece
    problems = definition.check_attrs(op.attrs)
    if problems:
        return "; ".join(problems)
    for index in definition.indices_with_role("state"):
        name = op.operands[index]
        if name is not None and name not in slots:
            return (f"operand '{definition.operand_names[index]}' of {op.opname} must be a state slot of the graph, "
                    f"not %{name}")
    try:
        inferred = definition.infer(operand_types, op.attrs)
        message = definition.verify(operand_types, op.attrs) if definition.verify else None
    except IRError as error:
        return str(error)
    except (IndexError, ValueError, TypeError, AssertionError) as error:
        # malformed operands (e.g. a table of the wrong rank) must still be reported at the op
        return f"{op.opname} cannot infer its result types: {error}"
    if message:
        return message
    if len(op.results) != len(inferred):
        return f"{op.opname} declares {len(op.results)} results, its operands give {len(inferred)}"
    declared = tuple(r.type for r in op.results)
    if declared != inferred:
        return (f"{op.opname} declares result types {', '.join(map(str, declared))} "
                f"but its operands give {', '.join(map(str, inferred))}")
    return None


def verify(graph: Graph, after: str | None = None) -> Graph:
    """Return the graph if it is well formed; raise IRError quoting the op at fault otherwise."""
    where = f" after pass '{after}'" if after else ""
    repeated = unique([v.name for v in graph.inputs] + [w.name for w in graph.weights])
    if repeated:
        raise IRError(f"graph {graph.name}{where}: %{repeated[0]} is defined twice")
    for weight in graph.weights:
        if not weight.type.is_static:
            raise IRError(f"graph {graph.name}{where}: weight has a symbolic shape: {format_weight(weight)}")
    repeated_states = unique(s.name for s in graph.states)
    if repeated_states:
        raise IRError(f"graph {graph.name}{where}: state {repeated_states[0]} is declared twice")
    types: dict[str, TensorType] = {v.name: v.type for v in graph.inputs}
    types.update({w.name: w.type for w in graph.weights})
    for slot in graph.states:
        if slot.name in types:
            raise IRError(f"graph {graph.name}{where}: state %{slot.name} has the name of another value")
        types[slot.name] = slot.type
    slots = graph.state_map()  # once: a lookup per op would make verifying quadratic in the layers
    for index, op in enumerate(graph.ops):
        problem = _check_op(op, types, slots)
        if problem is None:
            for result in op.results:
                if result.name in types:
                    problem = f"%{result.name} is defined twice"
                    break
                types[result.name] = result.type
        if problem:
            raise IRError(f"graph {graph.name}{where}: {problem}\n{_context(graph, index)}")
    for name in graph.outputs:
        if name not in types:
            raise IRError(f"graph {graph.name}{where}: output %{name} is not defined")
    if not graph.outputs:
        raise IRError(f"graph {graph.name}{where}: has no outputs")
    _check_states(graph, types, where)
    _check_dims(graph, types, where)
    return graph


def _check_states(graph: Graph, types: dict[str, TensorType], where: str) -> None:
    """Every state slot is bound to the value holding its new content, of the slot's own type."""
    for slot in graph.states:
        if not slot.update:
            raise IRError(f"graph {graph.name}{where}: state %{slot.name} has no update (-> %value)")
        if slot.update not in types:
            raise IRError(f"graph {graph.name}{where}: state %{slot.name} is updated by %{slot.update}, "
                          "which is not defined")
        if types[slot.update] != slot.type.local():
            raise IRError(f"graph {graph.name}{where}: state %{slot.name} is {slot.type} but its update "
                          f"%{slot.update} is {types[slot.update]}")


def _check_dims(graph: Graph, types: dict[str, TensorType], where: str) -> None:
    """A graph that bounds its symbolic dims bounds every one it uses."""
    if not graph.dims:
        return
    bounded = {d.name for d in graph.dims}
    for name, type_ in types.items():
        for dim in type_.shape:
            if isinstance(dim, str) and dim not in bounded:
                raise IRError(f"graph {graph.name}{where}: %{name} has symbolic dim '{dim}', which has no bound "
                              f"(bounded: {', '.join(sorted(bounded))})")
