"""Kernel name -> implementation, per op: the runtime half of kernel selection.

select_kernels records each op's kernel in its `kernel` attribute; `resolve` returns the code
registered under that name for the op, or the op's reference implementation when that kernel
cannot run here (not registered in this runtime, or built for another device type), and says
which it used and why. The reference implementations of `reference_dispatch` are the `reference`
kernels of their ops; they are looked up there, not copied, so new ops need no second entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Op
from nemocompile.graph.kernels import REFERENCE, kernel_of

from ..reference_dispatch import REFERENCE as REFERENCE_IMPLS
from ..reference_dispatch import OpImpl, Result, reference_impl

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelImpl:
    """Code for kernel `name` of `op`, and the device types (torch's `cpu`, `cuda`) it runs on."""

    op: str
    name: str
    impl: OpImpl
    devices: tuple[str, ...]


_REGISTRY: dict[tuple[str, str], KernelImpl] = {}


def register(op: str, name: str, impl: OpImpl, devices: tuple[str, ...] = ("cuda",)) -> KernelImpl:
    if name == REFERENCE:
        raise IRError(f"the reference kernel of {op} is its reference implementation; register another name")
    if (op, name) in _REGISTRY:
        raise IRError(f"kernel {name} of {op} is registered twice")
    entry = KernelImpl(op, name, impl, tuple(devices))
    _REGISTRY[op, name] = entry
    return entry


def unregister(op: str, name: str) -> None:
    _REGISTRY.pop((op, name), None)


def implementations() -> dict[tuple[str, str], tuple[str, ...]]:
    """(op, kernel) -> device types, the reference kernels included (they run anywhere torch does)."""
    found: dict[tuple[str, str], tuple[str, ...]] = {(op, REFERENCE): ("cpu", "cuda") for op in REFERENCE_IMPLS}
    found.update({key: entry.devices for key, entry in _REGISTRY.items()})
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class Resolution:
    """The implementation one op runs with. Callable like the implementation itself.

    requested: the kernel the IR names; kernel: the one used; fallback: why they differ (None when not).
    """

    op: str
    requested: str
    kernel: str
    impl: OpImpl
    fallback: str | None = None

    def __call__(self, *args: Any) -> tuple[Result, ...]:
        return self.impl(*args)


def resolve(op: Op, device: torch.device | str) -> Resolution:
    """The implementation of `op` on `device`, as its `kernel` attribute asks, else the reference."""
    device_type = torch.device(device).type
    requested = kernel_of(op)
    if requested != REFERENCE:
        entry = _REGISTRY.get((op.opname, requested))
        if entry is not None and device_type in entry.devices:
            return Resolution(op.opname, requested, requested, entry.impl)
        why = (f"kernel {requested} of {op.opname} is not in this runtime" if entry is None else
               f"kernel {requested} of {op.opname} runs on {', '.join(entry.devices)}, not {device_type}")
        _log.info("%s at %s: %s; running the reference implementation", op.opname, op.scope, why)
        return Resolution(op.opname, requested, REFERENCE, reference_impl(op.opname), why)
    return Resolution(op.opname, requested, REFERENCE, reference_impl(op.opname))


def device_of(weights: Mapping[str, object]) -> torch.device:
    """The device a graph's weights live on (the executor's device); the CPU when there are none."""
    for value in weights.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
