"""Typed descriptions of Triton kernels: a template function plus everything that specialises it.

A `KernelTemplate` names a jit function in a template file (codegen/triton/templates/), the
files it imports, its runtime parameters with their Triton types, and the constexpr parameters
that must be filled. A `KernelInstance` fills them (shapes, formats, tile sizes) and adds launch
options: it is one compiled binary per arch, and its `key` hashes everything that changes that
binary (sources, signature, constexprs, options, arch, Triton version)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nemocompile.base.errors import IRError

TEMPLATE_DIR = Path(__file__).parent / "templates"
ARCHS = {"sm_90": 90, "sm_100": 100}
Constexpr = int | float | bool | str


@dataclass(frozen=True)
class KernelTemplate:
    """entry: the jit function in `module` (templates/<module>.py); imports: template modules it
    imports; params: its runtime parameters in order with Triton types ("*bf16", "*u8", "i32", ...,
    "*dtype" for a pointer whose element type an instance fills in); constexprs: the constexpr
    parameter names, in signature order; archs: where it compiles; aligned: pointer parameters
    the compiler may assume 16-byte aligned (the runtime checks this at launch)."""

    module: str
    entry: str
    params: tuple[tuple[str, str], ...]
    constexprs: tuple[str, ...]
    imports: tuple[str, ...] = ()
    archs: tuple[str, ...] = ("sm_90", "sm_100")
    aligned: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return (*(f"{name}.py" for name in self.imports), f"{self.module}.py")

    def source(self) -> bytes:
        """Every file this template needs, concatenated in a fixed order (what the key hashes)."""
        return b"".join((TEMPLATE_DIR / name).read_bytes() for name in self.files)


@dataclass(frozen=True)
class KernelInstance:
    """One specialised kernel: `name` is unique in an engine."""

    name: str
    op: str
    template: KernelTemplate
    pointer_types: tuple[tuple[str, str], ...]  # param -> element type for "*dtype" params
    constexprs: tuple[tuple[str, Constexpr], ...]
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        given = [name for name, _ in self.constexprs]
        if sorted(given) != sorted(self.template.constexprs):
            missing = sorted(set(self.template.constexprs) - set(given))
            extra = sorted(set(given) - set(self.template.constexprs))
            raise IRError(f"kernel {self.name}: constexprs of {self.template.entry} do not match "
                          f"(missing {missing}, unknown {extra})")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise IRError(f"kernel {self.name}: num_warps {self.num_warps} is not a power of two up to 16")

    def signature(self) -> dict[str, str]:
        """Parameter -> Triton type, runtime parameters first then constexprs, in template order."""
        fills = dict(self.pointer_types)
        sig = {}
        for name, kind in self.template.params:
            if kind == "*dtype":
                if name not in fills:
                    raise IRError(f"kernel {self.name}: pointer parameter {name} needs an element type")
                kind = f"*{fills[name]}"
            sig[name] = kind
        for name in self.template.constexprs:
            sig[name] = "constexpr"
        return sig

    def constexpr_values(self, interpret: bool = False) -> dict[str, Constexpr]:
        values = dict(self.constexprs)
        if "INTERPRET" in values:
            values["INTERPRET"] = interpret
        return values

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "op": self.op, "module": self.template.module, "entry": self.template.entry,
                "files": list(self.template.files), "signature": self.signature(),
                "constexprs": self.constexpr_values(), "aligned": list(self.template.aligned),
                "num_warps": self.num_warps, "num_stages": self.num_stages}

    def key(self, arch: str, triton_version: str) -> str:
        text = json.dumps({"kernel": self.describe(), "arch": arch, "triton": triton_version}, sort_keys=True)
        return hashlib.sha256(self.template.source() + text.encode()).hexdigest()


def instance(name: str, op: str, template: KernelTemplate, constexprs: Mapping[str, Constexpr],
             pointer_types: Mapping[str, str] | None = None, num_warps: int = 4, num_stages: int = 3) -> KernelInstance:
    return KernelInstance(name, op, template, tuple(sorted((pointer_types or {}).items())),
                          tuple(sorted(constexprs.items())), num_warps, num_stages)
