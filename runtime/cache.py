"""Per-sequence state between calls: KV caches of attention layers, conv windows and SSM states of
Mamba layers. Made from the graph's state slots, so the runtime never guesses shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemocompile.base.errors import UsageError
from nemocompile.graph.ir import StateSlot

from .dtypes import torch_dtype


def _concrete(slot: StateSlot, batch_size: int) -> list[int]:
    dims: list[int] = []
    for dim in slot.type.shape:
        if dim == "batch":
            dims.append(batch_size)
        elif dim == "ctx":
            dims.append(0)  # the KV cache starts empty and grows
        elif isinstance(dim, int):
            dims.append(dim)
        else:
            raise UsageError(f"state {slot.name} has an unknown symbolic dim '{dim}'")
    return dims


@dataclass
class Cache:
    """State of `batch_size` sequences; `length` tokens have been seen so far."""

    batch_size: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    length: int = 0

    @staticmethod
    def for_slots(slots: tuple[StateSlot, ...], batch_size: int, device: torch.device) -> Cache:
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        cache = Cache(batch_size)
        for slot in slots:
            shape = _concrete(slot, batch_size)
            empty = torch.zeros(shape, dtype=torch_dtype(slot.type.dtype), device=device)
            if slot.kind == "kv":
                cache.kv[slot.name] = (empty, empty.clone())
            else:
                cache.tensors[slot.name] = empty
        return cache

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return total + sum(k.numel() * k.element_size() * 2 for k, _ in self.kv.values())
