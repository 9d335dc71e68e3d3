"""Ops are declared as data: name, level, typed operands and results, attributes, shape inference,
an optional verify hook. State (KV cache, conv window, SSM state) is an operand of role `state`
and its new content a result. The executable meaning of each core op
is its reference implementation in `nemocompile.runtime.reference_dispatch`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nemocompile.base.errors import IRError

from .ir import Attrs, Op
from .types import Dim, TensorType

InferFn = Callable[[Sequence[TensorType | None], Attrs], tuple[TensorType, ...]]
VerifyFn = Callable[[Sequence[TensorType | None], Attrs], str | None]

LEVELS = ("model", "block", "core", "fused")

# What an operand is to its op. Passes, sharding and codegen find operands by role, never by
# position: `act` flows between ops, `weight` is a parameter, `scale` a quantization scale,
# `bias` an additive parameter, `state` persists between calls, `index` holds integer ids.
ROLES = ("act", "weight", "scale", "bias", "state", "index")


@dataclass(frozen=True)
class Operand:
    """One declared operand: written `name`, `name?` (optional) or `name:role` / `name?:role`."""

    name: str
    role: str = "act"
    optional: bool = False

    @staticmethod
    def parse(spec: str) -> Operand:
        name, _, role = spec.partition(":")
        optional = name.endswith("?")
        operand = Operand(name.rstrip("?"), role or "act", optional)
        assert operand.role in ROLES, f"operand {spec!r}: role {operand.role!r} not in {ROLES}"
        return operand

    def __str__(self) -> str:
        role = "" if self.role == "act" else f":{self.role}"
        return f"{self.name}{'?' if self.optional else ''}{role}"

# Every op accepts this attribute: the kernel select_kernels chose for it (graph/kernels.py).
KERNEL_ATTR = "kernel"

# Python types an attribute may declare; "list" means a tuple of scalars.
ATTR_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (tuple,),
    "ints": (tuple,),  # a tuple of ints
    "dtype": (str,),
}


@dataclass(frozen=True)
class OpDef:
    name: str
    level: str
    operands: tuple[Operand, ...]
    results: tuple[str, ...]
    attrs: tuple[tuple[str, str], ...]  # (name, kind) with kind from ATTR_KINDS; "?" suffix = optional
    infer: InferFn
    verify: VerifyFn | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        assert self.level in LEVELS, f"{self.name}: level {self.level!r} not in {LEVELS}"
        for _, kind in self.attrs:
            assert kind.rstrip("?") in ATTR_KINDS, f"{self.name}: attr kind {kind!r}"

    @property
    def operand_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.operands)

    def is_optional(self, index: int) -> bool:
        return self.operands[index].optional

    def index_of(self, name: str) -> int:
        """Position of the operand called `name`."""
        for index, operand in enumerate(self.operands):
            if operand.name == name:
                return index
        raise KeyError(f"{self.name} has no operand '{name}'")

    def indices_with_role(self, role: str) -> tuple[int, ...]:
        assert role in ROLES, f"unknown role {role!r}"
        return tuple(i for i, o in enumerate(self.operands) if o.role == role)

    def check_attrs(self, attrs: Attrs) -> list[str]:
        problems: list[str] = []
        declared = {name: kind for name, kind in self.attrs}
        for name, kind in declared.items():
            optional = kind.endswith("?")
            if name not in attrs:
                if not optional:
                    problems.append(f"missing attribute '{name}'")
                continue
            value = attrs[name]
            allowed = ATTR_KINDS[kind.rstrip("?")]
            if value is None and optional:
                continue
            if isinstance(value, bool) and bool not in allowed:
                problems.append(f"attribute '{name}' must be {kind.rstrip('?')}, got {value!r}")
            elif not isinstance(value, allowed) or (kind.rstrip("?") == "ints" and not _all_ints(value)):
                problems.append(f"attribute '{name}' must be {kind.rstrip('?')}, got {value!r}")
        for name in attrs.keys():
            if name == KERNEL_ATTR:
                if not isinstance(attrs[name], str) or not attrs[name]:
                    problems.append(f"attribute '{KERNEL_ATTR}' must name a kernel, got {attrs[name]!r}")
            elif name not in declared:
                problems.append(f"unknown attribute '{name}'")
        return problems


def _all_ints(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


REGISTRY: dict[str, OpDef] = {}


def define(
    name: str,
    level: str,
    operands: Sequence[str],
    results: Sequence[str],
    attrs: Sequence[tuple[str, str]] = (),
    *,
    infer: InferFn,
    verify: VerifyFn | None = None,
    doc: str = "",
) -> OpDef:
    """Declare an op; one short call per op."""
    assert name not in REGISTRY, f"op {name} declared twice"
    opdef = OpDef(name, level, tuple(Operand.parse(o) for o in operands), tuple(results), tuple(attrs), infer, verify, doc)
    REGISTRY[name] = opdef
    return opdef


def opdef(name: str) -> OpDef:
    from . import ops  # noqa: F401  (the declarations register themselves)

    try:
        return REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown op '{name}'") from None


def operand(op: Op, name: str) -> str | None:
    """The value bound to the operand called `name` of `op` (None when an optional one is absent)."""
    index = opdef(op.opname).index_of(name)
    return op.operands[index] if index < len(op.operands) else None


def dims_agree(a: Dim, b: Dim) -> bool:
    """Two dims agree unless both are ints and differ, or both are the same kind and differ."""
    return a == b or isinstance(a, str) or isinstance(b, str)


def require(types: Sequence[TensorType | None], index: int) -> TensorType:
    found = types[index]
    if found is None:
        raise IRError(f"operand {index} is required")
    return found
