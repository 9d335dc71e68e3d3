"""How a weight of each IR dtype is stored: its tensors, named as NVIDIA ModelOpt exports them.
A plain weight is one tensor; an NVFP4 weight is packed codes + E4M3 block scales + an FP32
global scale; an FP8 weight is E4M3 data + an FP32 scale. Stacked experts carry the scalars
per expert (leading dims). Component tensors are named `<base>.weight_scale` etc., where
<base> is the main tensor's name without a trailing `.weight`."""

from __future__ import annotations

from dataclasses import dataclass

from nemocompile.base.errors import IRError
from nemocompile.base.formats import indivisible_input

from .types import DTYPES, DType, TensorType


@dataclass(frozen=True)
class StoredTensor:
    component: str  # "" for the main tensor, else "weight_scale", "weight_scale_2"
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.bits // 8


def _static(type_: TensorType) -> tuple[int, ...]:
    if not type_.is_static:
        raise IRError(f"a stored weight needs a static shape, got {type_}")
    return tuple(int(d) for d in type_.shape)


def _scale_shape(layout: str, lead: list[int], rows: int, cols: int, block: int | None) -> tuple[int, ...]:
    if layout == "per_block":
        assert block is not None
        return (*lead, rows, cols // block)
    if layout == "per_channel":
        return (*lead, rows)
    return tuple(lead)  # per tensor: one per expert when experts are stacked


def stored_tensors(type_: TensorType) -> list[StoredTensor]:
    """The main tensor (codes, packed when narrower than their storage dtype) and the weight
    scales, as the format registry lays them out."""
    shape = _static(type_)
    fmt = type_.dtype.format
    if not fmt.quantized:
        return [StoredTensor("", type_.dtype, shape)]
    *lead, rows, cols = shape
    reason = indivisible_input(fmt.name, cols)
    if reason:
        raise IRError(f"a weight of type {type_} cannot be stored: {reason}")
    storage = DTYPES[fmt.storage or ""]
    per_byte = storage.bits // fmt.bits
    tensors = [StoredTensor("", storage, (*lead, rows, cols // per_byte))]
    return tensors + [StoredTensor(scale.tensor, DTYPES[scale.dtype],
                                   _scale_shape(scale.layout, lead, rows, cols, fmt.block_size))
                      for scale in fmt.weight_scales()]


def stored_nbytes(type_: TensorType) -> int:
    return sum(t.nbytes for t in stored_tensors(type_))


def component_name(main: str, component: str) -> str:
    """`x.weight` + weight_scale -> `x.weight_scale`; `x` + weight_scale -> `x.weight_scale`."""
    if not component:
        return main
    base = main[: -len(".weight")] if main.endswith(".weight") else main
    return f"{base}.{component}"
