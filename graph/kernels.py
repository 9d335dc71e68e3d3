"""The kernel catalog: descriptions of the implementations an op may run with, as data.

A description says which op it implements, its backend (reference, triton, cutlass, tensorrt),
the operand formats it accepts, the GPU archs it runs on, the options it can be tuned over, and a
priority. `select_kernels` picks one per op and records its name in the op's `kernel` attribute;
the runtime's kernel registry maps that name to code. Every op has the `reference` kernel: its
reference implementation, any arch, nothing to tune. The catalog holds descriptions only (no code),
so passes can choose kernels without importing the runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nemocompile.base.errors import IRError

from .ir import AttrValue, Graph, Op
from .opdef import KERNEL_ATTR, REGISTRY, opdef
from .types import TensorType

BACKENDS = ("reference", "triton", "cutlass", "tensorrt")
REFERENCE = "reference"


@dataclass(frozen=True)
class KernelSpec:
    """One candidate implementation of `op`.

    formats: operand name -> the dtype names it accepts there; an operand not named takes any.
    attrs: attribute name -> the values it accepts (None: the attribute is absent), e.g. a W4A4
    kernel takes act_format "nvfp4" only; an attribute not named takes any.
    archs: GPU archs it runs on ("sm_90", "sm_100"); empty means any (the reference one).
    config_space: option -> candidate values an autotuner may try; empty for the reference.
    """

    name: str
    op: str
    backend: str
    formats: tuple[tuple[str, tuple[str, ...]], ...] = ()
    archs: tuple[str, ...] = ()
    config_space: tuple[tuple[str, tuple[AttrValue, ...]], ...] = ()
    priority: int = 0
    doc: str = ""
    attrs: tuple[tuple[str, tuple[AttrValue, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise IRError(f"kernel {self.name} of {self.op}: backend '{self.backend}' is not one of "
                          f"{', '.join(BACKENDS)}")
        if not self.name or not self.name.replace("_", "").isalnum():
            raise IRError(f"kernel of {self.op}: '{self.name}' is not a valid kernel name (letters, digits, _)")
        if (self.name == REFERENCE) != (self.backend == REFERENCE):
            raise IRError(f"kernel {self.name} of {self.op}: only the kernel named '{REFERENCE}' has the "
                          f"{REFERENCE} backend")
        operands = opdef(self.op).operand_names
        for operand, _ in self.formats:
            if operand not in operands:
                raise IRError(f"kernel {self.name}: {self.op} has no operand '{operand}'")

    def accepts(self, formats: Mapping[str, str]) -> bool:
        """Whether the op's operand formats (operand name -> dtype name) are all ones this kernel takes."""
        return all(formats.get(operand) in allowed for operand, allowed in self.formats if operand in formats)

    def accepts_attrs(self, attrs: Mapping[str, AttrValue]) -> bool:
        """Whether the op's attributes take values this kernel handles."""
        return all(attrs.get(name) in allowed for name, allowed in self.attrs)

    def runs_on(self, arch: str) -> bool:
        return not self.archs or arch in self.archs


def kernel(name: str, op: str, backend: str, formats: Mapping[str, Sequence[str]] | None = None,
           archs: Sequence[str] = (), config_space: Mapping[str, Sequence[AttrValue]] | None = None,
           priority: int = 0, doc: str = "", attrs: Mapping[str, Sequence[AttrValue]] | None = None) -> KernelSpec:
    """A description from plain mappings (the frozen spec holds sorted tuples)."""
    return KernelSpec(name, op, backend, tuple(sorted((k, tuple(v)) for k, v in (formats or {}).items())),
                      tuple(archs), tuple(sorted((k, tuple(v)) for k, v in (config_space or {}).items())),
                      priority, doc, tuple(sorted((k, tuple(v)) for k, v in (attrs or {}).items())))


# Compiled candidates by op, then name; the reference kernels are implicit (one per declared op).
_CATALOG: dict[str, dict[str, KernelSpec]] = {}


def register(spec: KernelSpec) -> KernelSpec:
    entries = _CATALOG.setdefault(spec.op, {})
    if spec.name == REFERENCE or spec.name in entries:
        raise IRError(f"kernel {spec.name} of {spec.op} is registered twice")
    entries[spec.name] = spec
    return spec


def unregister(op: str, name: str) -> None:
    _CATALOG.get(op, {}).pop(name, None)


def reference_kernel(op: str) -> KernelSpec:
    return KernelSpec(REFERENCE, op, REFERENCE, doc="the reference implementation, the op's meaning")


def candidates(op: str) -> tuple[KernelSpec, ...]:
    """Every kernel of `op`: the reference one first, then the registered ones by name."""
    opdef(op)  # an unknown op is an error, not an empty list
    return (reference_kernel(op), *(spec for _, spec in sorted(_CATALOG.get(op, {}).items())))


def find(op: str, name: str) -> KernelSpec | None:
    if name == REFERENCE:
        return reference_kernel(op)
    return _CATALOG.get(op, {}).get(name)


def catalog() -> dict[str, tuple[KernelSpec, ...]]:
    """Every declared op's candidates (docs and tests read this)."""
    return {op: candidates(op) for op in sorted(REGISTRY)}


def operand_formats(op: Op, types: Mapping[str, TensorType]) -> dict[str, str]:
    """Operand name -> dtype name of each present operand of `op` (`types`: graph.value_types())."""
    formats: dict[str, str] = {}
    for name, value in zip(opdef(op.opname).operand_names, op.operands, strict=False):
        if value is not None and value in types:
            formats[name] = types[value].dtype.name
    return formats


def signature(op: str, formats: Mapping[str, str]) -> str:
    """What a tuning entry is keyed on: the op and its operand formats, e.g. linear(weight=nvfp4,x=bf16)."""
    return f"{op}({','.join(f'{k}={v}' for k, v in sorted(formats.items()))})"


@dataclass(frozen=True)
class Tuning:
    """Measured choices: signature -> kernel name. A tuner fills it; select_kernels prefers it."""

    choices: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def of(choices: Mapping[str, str]) -> Tuning:
        return Tuning(tuple(sorted(choices.items())))

    def lookup(self, key: str) -> str | None:
        return dict(self.choices).get(key)


def choose(op: str, formats: Mapping[str, str], arch: str, backends: Iterable[str],
           tuning: Tuning | None = None, attrs: Mapping[str, AttrValue] | None = None) -> KernelSpec:
    """The kernel for one op: the tuned choice when it is a usable candidate, else the usable
    candidate of highest priority (at equal priority a compiled kernel before the reference one,
    then by name). The reference kernel is always usable, whatever `backends` allows."""
    allowed = set(backends)
    usable = [spec for spec in candidates(op)
              if spec.name == REFERENCE or (spec.backend in allowed and spec.runs_on(arch) and spec.accepts(formats)
                                            and spec.accepts_attrs(attrs or {}))]
    tuned = tuning.lookup(signature(op, formats)) if tuning is not None else None
    for spec in usable:
        if spec.name == tuned:
            return spec
    return min(usable, key=lambda spec: (-spec.priority, spec.name == REFERENCE, spec.name))


def kernel_of(op: Op) -> str:
    """The kernel recorded on `op` (`reference` when none was selected)."""
    value = op.attrs.get(KERNEL_ATTR)
    return value if isinstance(value, str) else REFERENCE


def kernel_uses(graph: Graph) -> list[tuple[str, str, str, int]]:
    """(op, kernel, backend, count) for every op kind and kernel in `graph`, sorted."""
    counts: dict[tuple[str, str], int] = {}
    for op in graph.ops:
        key = (op.opname, kernel_of(op))
        counts[key] = counts.get(key, 0) + 1
    rows = []
    for (opname, name), count in sorted(counts.items()):
        spec = find(opname, name)
        rows.append((opname, name, spec.backend if spec is not None else "unknown", count))
    return rows


def _register_compiled_candidates() -> None:
    from .kernel_candidates import register_candidates

    register_candidates()


_register_compiled_candidates()
