"""How a weight of each IR dtype is stored: its tensors, named as NVIDIA ModelOpt exports them.
A plain weight is one tensor; an NVFP4 weight is packed codes + E4M3 block scales + an FP32
global scale; an FP8 weight is E4M3 data + an FP32 scale. Stacked experts carry the scalars
per expert (leading dims). Component tensors are named `<base>.weight_scale` etc., where
<base> is the main tensor's name without a trailing `.weight`."""

from __future__ import annotations

from dataclasses import dataclass

from nemocompile.base.errors import IRError

from .types import F32, FP8_E4M3, U8, DType, TensorType


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


def stored_tensors(type_: TensorType) -> list[StoredTensor]:
    shape = _static(type_)
    name = type_.dtype.name
    if name == "nvfp4":
        *lead, rows, cols = shape
        block = type_.dtype.block_size or 16
        if cols % block:
            raise IRError(f"an nvfp4 weight needs an input dim divisible by {block}, got {type_}")
        return [StoredTensor("", U8, (*lead, rows, cols // 2)),
                StoredTensor("weight_scale", FP8_E4M3, (*lead, rows, cols // block)),
                StoredTensor("weight_scale_2", F32, tuple(lead))]
    if name == "fp8":
        *lead, _, _ = shape
        return [StoredTensor("", FP8_E4M3, shape), StoredTensor("weight_scale", F32, tuple(lead))]
    return [StoredTensor("", type_.dtype, shape)]


def stored_nbytes(type_: TensorType) -> int:
    return sum(t.nbytes for t in stored_tensors(type_))


def component_name(main: str, component: str) -> str:
    """`x.weight` + weight_scale -> `x.weight_scale`; `x` + weight_scale -> `x.weight_scale`."""
    if not component:
        return main
    base = main[: -len(".weight")] if main.endswith(".weight") else main
    return f"{base}.{component}"
