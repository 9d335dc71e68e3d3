"""GraphBuilder: the one way graphs are made (importer, passes, tests). It infers each op's
result types from its declaration, so a builder-made graph is well-typed by construction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nemocompile.base.errors import IRError

from .ir import Attrs, AttrValue, DimBound, Graph, Op, StateSlot, TensorSource, Value, Weight
from .opdef import opdef
from .types import DType, TensorType


class GraphBuilder:
    def __init__(self, name: str, metadata: Mapping[str, str] | None = None, origin: str = "import") -> None:
        self.name = name
        self.metadata = dict(metadata or {})
        self.origin = origin
        self._inputs: list[Value] = []
        self._weights: dict[str, Weight] = {}
        self._states: dict[str, StateSlot] = {}
        self._ops: list[Op] = []
        self._outputs: list[str] = []
        self._dims: dict[str, DimBound] = {}
        self._types: dict[str, TensorType] = {}
        self._producers: dict[str, Op] = {}
        self._counter = 0

    def _declare(self, name: str, type_: TensorType) -> None:
        if name in self._types:
            raise IRError(f"value %{name} is defined twice")
        self._types[name] = type_

    def input(self, name: str, type_: TensorType) -> str:
        self._declare(name, type_)
        self._inputs.append(Value(name, type_))
        return name

    def weight(self, name: str, type_: TensorType, category: str,
               sources: Sequence[TensorSource] = (), source_dtype: DType | None = None) -> str:
        self._declare(name, type_)
        self._weights[name] = Weight(name, type_, category, tuple(sources), source_dtype)
        return name

    def add_weight(self, weight: Weight) -> str:
        self._declare(weight.name, weight.type)
        self._weights[weight.name] = weight
        return weight.name

    def state(self, name: str, kind: str, type_: TensorType, update: str = "") -> str:
        """Declare a state slot: a graph input that ops read as a `state` operand."""
        if name in self._states:
            raise IRError(f"state {name} is declared twice")
        self._declare(name, type_)
        self._states[name] = StateSlot(name, kind, type_, update)
        return name

    def update_state(self, name: str, value: str) -> None:
        """Bind `value` as the content of state slot `name` after the call (a graph output)."""
        slot = self._states[name]
        self._states[name] = StateSlot(slot.name, slot.kind, slot.type, value)

    def bound(self, dim: str, low: int, high: int) -> None:
        """The run-time range of a symbolic dimension."""
        self._dims[dim] = DimBound(dim, low, high)

    def has(self, name: str) -> bool:
        return name in self._types

    def type_of(self, name: str) -> TensorType:
        return self._types[name]

    def fresh(self) -> str:
        name = str(self._counter)
        self._counter += 1
        return name

    def op(self, opname: str, operands: Sequence[str | None], attrs: Mapping[str, AttrValue] | None = None,
           scope: str = "", result_names: Sequence[str] | None = None) -> tuple[str, ...]:
        """Append an op; returns the names of its results (fresh numbers unless given)."""
        definition = opdef(opname)
        frozen = Attrs.of(attrs or {})
        missing = range(len(operands), len(definition.operands))
        if all(definition.is_optional(i) for i in missing):
            operands = [*operands, *(None for _ in missing)]  # trailing optional operands may be left out
        # a sharded weight or state is seen as the piece each rank holds (the graph is one rank's program)
        types = [None if o is None else self._types[o].local() for o in operands]
        result_types = definition.infer(types, frozen)
        names = list(result_names) if result_names else [self.fresh() for _ in result_types]
        results = []
        for name, type_ in zip(names, result_types, strict=True):
            self._declare(name, type_)
            results.append(Value(name, type_))
        self._emit(Op(opname, tuple(operands), tuple(results), frozen, scope, self.origin))
        return tuple(names)

    def _emit(self, op: Op) -> None:
        self._ops.append(op)
        for result in op.results:
            self._producers[result.name] = op

    def _read_since(self, op: Op) -> tuple[int | None, str | None]:
        """(op's index among the emitted ops, a result of op that a later emitted op reads)."""
        index = next((i for i in range(len(self._ops) - 1, -1, -1) if self._ops[i] is op), None)
        if index is None:
            return None, None
        results = {r.name for r in op.results}
        for later in self._ops[index + 1:]:
            read = results.intersection(name for name in later.operands if name is not None)
            if read:
                return index, f"{later.opname} reads %{sorted(read)[0]}"
        return index, None

    def can_drop(self, *ops: Op) -> bool:
        """Whether dropping `ops` in the order given would succeed: each was emitted, and nothing
        emitted after it reads it except the ops dropped before it."""
        absorbed: list[Op] = []
        for op in ops:
            index = next((i for i in range(len(self._ops) - 1, -1, -1) if self._ops[i] is op), None)
            if index is None:
                return False
            results = {r.name for r in op.results}
            for later in self._ops[index + 1:]:
                if any(later is a for a in absorbed):
                    continue
                if results.intersection(name for name in later.operands if name is not None):
                    return False
            absorbed.append(op)
        return True

    def drop(self, op: Op) -> None:
        """Take back an op emitted earlier, so a fusion that absorbs it can define its result names
        again. Refused when an op emitted after it reads one of its results."""
        index, reader = self._read_since(op)
        if index is None:
            raise IRError(f"{op.opname} at {op.scope} was not emitted, so it cannot be dropped")
        if reader is not None:
            raise IRError(f"cannot drop {op.opname} at {op.scope}: {reader}")
        results = {r.name for r in op.results}
        del self._ops[index]
        for name in results:
            self._types.pop(name, None)
            self._producers.pop(name, None)

    def producer(self, name: str) -> Op | None:
        """The op emitted so far whose result `name` is (None for inputs, weights, states)."""
        return self._producers.get(name)

    def number_after(self, names: Sequence[str]) -> None:
        """Continue fresh numbering after the largest numeric name given, so new names never collide."""
        numbers = [int(name) for name in names if name.isdigit()]
        self._counter = max(self._counter, max(numbers, default=-1) + 1)

    def reemit(self, op: Op, opname: str | None = None, attrs: Mapping[str, AttrValue] | None = None,
               operands: Sequence[str | None] | None = None) -> None:
        """Emit `op` again (optionally as another op, with other attrs or operands), re-inferring its
        result types from the operands as they are now; result names are kept. An op that comes out
        unchanged is kept as it was, with the provenance of the pass that made it."""
        new_attrs = dict(op.attrs.items) if attrs is None else dict(attrs)
        self.op(opname or op.opname, op.operands if operands is None else operands, new_attrs, op.scope,
                [r.name for r in op.results])
        emitted = self._ops[-1]
        same_operands = operands is None or emitted.operands == op.operands
        if same_operands and (emitted.opname, emitted.attrs, emitted.results) == (op.opname, op.attrs, op.results):
            self._ops[-1] = op
            for result in op.results:
                self._producers[result.name] = op

    def op_named(self, opname: str, operands: Mapping[str, str | None],
                 attrs: Mapping[str, AttrValue] | None = None, scope: str = "",
                 result_names: Sequence[str] | None = None) -> tuple[str, ...]:
        """`op` with operands given by their declared names; absent optional ones may be left out."""
        definition = opdef(opname)
        unknown = sorted(set(operands) - set(definition.operand_names))
        if unknown:
            raise IRError(f"{opname} has no operand '{unknown[0]}'; it takes {', '.join(definition.operand_names)}")
        return self.op(opname, [operands.get(name) for name in definition.operand_names], attrs, scope, result_names)

    def op1(self, opname: str, operands: Sequence[str | None], attrs: Mapping[str, AttrValue] | None = None,
            scope: str = "") -> str:
        (name,) = self.op(opname, operands, attrs, scope)
        return name

    def append(self, op: Op) -> None:
        """Re-emit an op unchanged (passes copy the ops they don't rewrite)."""
        for result in op.results:
            self._declare(result.name, result.type)
        self._emit(op)

    def output(self, name: str) -> None:
        self._outputs.append(name)

    def build(self) -> Graph:
        return Graph(
            name=self.name,
            inputs=tuple(self._inputs),
            weights=tuple(self._weights.values()),
            states=tuple(self._states.values()),
            ops=tuple(self._ops),
            outputs=tuple(self._outputs),
            metadata=tuple(sorted(self.metadata.items())),
            dims=tuple(self._dims.values()),
        )


def rebuild_header(graph: Graph, origin: str, weights: Sequence[Weight] | None = None) -> GraphBuilder:
    """A builder holding `graph`'s inputs, weights (or the given replacements) and states, ready
    for a pass to emit ops. Result numbering continues after the largest numeric name so new
    names never collide."""
    builder = GraphBuilder(graph.name, dict(graph.metadata), origin)
    for value in graph.inputs:
        builder.input(value.name, value.type)
    for weight in graph.weights if weights is None else weights:
        builder.add_weight(weight)
    for slot in graph.states:
        builder.state(slot.name, slot.kind, slot.type, slot.update)
    for bound in graph.dims:
        builder.bound(bound.name, bound.low, bound.high)
    builder.number_after([r.name for op in graph.ops for r in op.results])
    return builder


def reemit(builder: GraphBuilder, op: Op, opname: str | None = None,
           attrs: Mapping[str, AttrValue] | None = None) -> None:
    """`builder.reemit(op, opname, attrs)`, for passes written before the method."""
    builder.reemit(op, opname, attrs)
