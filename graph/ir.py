"""The graph IR: values, weights with lazy sources, state slots, ops, and the graph itself.
Everything is immutable; passes build new graphs with `GraphBuilder`."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Union

from nemocompile.base.errors import IRError

from .types import DType, TensorType

AttrValue = Union[int, float, str, bool, None, tuple["AttrValue", ...]]  # noqa: UP007 (recursive alias)


@dataclass(frozen=True)
class Attrs:
    """An immutable, ordered attribute mapping (sorted by key so equal attrs print equally)."""

    items: tuple[tuple[str, AttrValue], ...] = ()

    @staticmethod
    def of(values: Mapping[str, AttrValue]) -> Attrs:
        return Attrs(tuple(sorted((k, _freeze(v)) for k, v in values.items())))

    def __getitem__(self, key: str) -> AttrValue:
        for name, value in self.items:
            if name == key:
                return value
        raise KeyError(key)

    def get(self, key: str, default: AttrValue = None) -> AttrValue:
        for name, value in self.items:
            if name == key:
                return value
        return default

    def __contains__(self, key: object) -> bool:
        return any(name == key for name, _ in self.items)

    def keys(self) -> list[str]:
        return [name for name, _ in self.items]

    def int(self, key: builtins.str) -> int:
        value = self[key]
        assert isinstance(value, int) and not isinstance(value, bool), f"attr {key}={value!r} is not an int"
        return value

    def float(self, key: builtins.str) -> builtins.float:
        value = self[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), f"attr {key} is not a number"
        return float(value)

    def str(self, key: builtins.str) -> builtins.str:
        value = self[key]
        assert isinstance(value, str), f"attr {key}={value!r} is not a string"
        return value

    def bool(self, key: builtins.str) -> builtins.bool:
        value = self[key]
        assert isinstance(value, bool), f"attr {key}={value!r} is not a bool"
        return value

    def ints(self, key: builtins.str) -> tuple[builtins.int, ...]:
        value = self[key]
        assert isinstance(value, tuple), f"attr {key}={value!r} is not a list"
        return tuple(int(v) for v in value)  # type: ignore[arg-type]


def _freeze(value: object) -> AttrValue:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    assert value is None or isinstance(value, int | float | str | bool), f"bad attribute value {value!r}"
    return value


@dataclass(frozen=True)
class Value:
    """An SSA value: a graph input or an op result."""

    name: str
    type: TensorType


@dataclass(frozen=True)
class TensorSource:
    """Where a weight's bytes are: one tensor of a safetensors file, relative to the graph's root
    directory (the checkpoint when imported, the engine after build)."""

    file: str
    tensor: str


@dataclass(frozen=True)
class Weight:
    """A parameter of the model. `sources` is empty for a graph built from config.json alone
    (plan mode); several sources are stacked along a new leading dim (routed experts stored
    one tensor per expert in Hugging Face checkpoints)."""

    name: str
    type: TensorType
    category: str
    sources: tuple[TensorSource, ...] = ()
    # The format the sources hold (bf16 in a plain checkpoint, nvfp4 in a ModelOpt one); the
    # build converts it to `type.dtype`, taking it bit for bit when the two agree.
    source_dtype: DType | None = None

    def __post_init__(self) -> None:
        if not self.sources and self.source_dtype is not None:
            raise IRError(f"weight {self.name} has a source dtype but no sources")
        if self.sources and self.source_dtype is None:
            object.__setattr__(self, "source_dtype", self.type.dtype)  # sources hold the weight as typed

    @property
    def stacked(self) -> bool:
        return len(self.sources) > 1


STATE_KINDS = ("kv", "conv", "ssm")


@dataclass(frozen=True)
class StateSlot:
    """Per-sequence state that persists between calls (the keys or values of an attention layer,
    the conv window or SSM state of a Mamba layer). The slot is a graph input, read by ops as an
    operand of role `state`; `update` names the value that holds its content after the call, a
    graph output that the runtime's cache binds back to the slot."""

    name: str
    kind: str
    type: TensorType
    update: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STATE_KINDS:
            raise IRError(f"state {self.name} has kind '{self.kind}', not one of {', '.join(STATE_KINDS)}")


@dataclass(frozen=True)
class DimBound:
    """The range a symbolic dimension may take at run time (kernels, memory plans and caches size
    themselves from these)."""

    name: str
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise IRError(f"dim {self.name} has bounds [{self.low}, {self.high}]; need 0 <= low <= high")


@dataclass(frozen=True)
class Op:
    opname: str
    operands: tuple[str | None, ...]
    results: tuple[Value, ...]
    attrs: Attrs = field(default_factory=Attrs)
    scope: str = ""
    origin: str = "import"

    @property
    def result(self) -> Value:
        assert len(self.results) == 1, f"{self.opname} has {len(self.results)} results"
        return self.results[0]


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[Value, ...]
    weights: tuple[Weight, ...]
    states: tuple[StateSlot, ...]
    ops: tuple[Op, ...]
    outputs: tuple[str, ...]
    metadata: tuple[tuple[str, str], ...] = ()
    dims: tuple[DimBound, ...] = ()

    def dim_bound(self, name: str) -> DimBound | None:
        for bound in self.dims:
            if bound.name == name:
                return bound
        return None

    def meta(self, key: str, default: str | None = None) -> str | None:
        for name, value in self.metadata:
            if name == key:
                return value
        return default

    def weight_map(self) -> dict[str, Weight]:
        return {w.name: w for w in self.weights}

    def state_map(self) -> dict[str, StateSlot]:
        return {s.name: s for s in self.states}

    def value_types(self) -> dict[str, TensorType]:
        """Every named value's type: inputs, weights, state slots and op results."""
        types = {v.name: v.type for v in self.inputs}
        types.update({s.name: s.type for s in self.states})
        types.update({w.name: w.type for w in self.weights})
        for op in self.ops:
            types.update({r.name: r.type for r in op.results})
        return types

    def ops_named(self, opname: str) -> Iterator[Op]:
        return (op for op in self.ops if op.opname == opname)

    @cached_property
    def _def_use(self) -> tuple[dict[str, Op], dict[str, tuple[Op, ...]]]:
        producers: dict[str, Op] = {}
        users: dict[str, list[Op]] = {}
        for op in self.ops:
            for name in op.operands:
                if name is not None:
                    readers = users.setdefault(name, [])
                    if not readers or readers[-1] is not op:  # an op reading a value twice is one user
                        readers.append(op)
            for result in op.results:
                producers[result.name] = op
        return producers, {name: tuple(ops) for name, ops in users.items()}

    def producer(self, value: str) -> Op | None:
        """The op whose result `value` is; None for graph inputs and weights."""
        return self._def_use[0].get(value)

    def users(self, value: str) -> tuple[Op, ...]:
        """The ops that read `value`, in program order, each once."""
        return self._def_use[1].get(value, ())

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.opname] = counts.get(op.opname, 0) + 1
        return dict(sorted(counts.items()))


def unique(names: Iterable[str]) -> list[str]:
    """Names that occur more than once."""
    seen: set[str] = set()
    repeated: list[str] = []
    for name in names:
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    return repeated
