"""IR types: immutable, self-checking. A dtype, a shape whose dims are ints or symbols
(`batch`, `seq`, `ctx`, ...), and a layout/sharding tag."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from nemocompile.base.errors import IRError
from nemocompile.base.formats import FORMATS, NumberFormat, ir_formats

_SYMBOL = re.compile(r"[a-z_][a-z0-9_]*")
_RESERVED_SYMBOLS = frozenset({"inf", "nan"})  # these read back as numbers
# row (unsharded), or a sharding tag such as col/8 (split along columns over 8 ranks)
_LAYOUT = re.compile(r"[a-z_][a-z0-9_]*(/[0-9]+)?")


@dataclass(frozen=True)
class DType:
    """A storage/compute format of the IR: one entry of the format registry (base/formats.py),
    which holds everything else about it (scales, maxima, ModelOpt names, native archs)."""

    name: str
    bits: int
    is_float: bool = True
    block_size: int | None = None
    scale_dtype: str | None = None
    # A quantized weight format: stored as codes plus scales (see graph/storage.py).
    quantized: bool = False

    @property
    def format(self) -> NumberFormat:
        return FORMATS[self.name]

    @property
    def safetensors(self) -> str:
        """The safetensors dtype string of a plain dtype (a quantized weight is several tensors:
        graph/storage.py)."""
        name = self.format.safetensors
        if name is None:
            raise IRError(f"dtype {self.name} has no safetensors dtype; it is stored as codes and scales")
        return name

    def __str__(self) -> str:
        return self.name


def _dtype(fmt: NumberFormat) -> DType:
    scales = fmt.weight_scales()
    return DType(fmt.name, fmt.bits, fmt.is_float, fmt.block_size, scales[0].dtype if scales else None,
                 fmt.quantized)


DTYPES: Mapping[str, DType] = MappingProxyType({fmt.name: _dtype(fmt) for fmt in ir_formats()})
F32 = DTYPES["f32"]
BF16 = DTYPES["bf16"]
F16 = DTYPES["f16"]
FP8_E4M3 = DTYPES["fp8e4m3"]
I64 = DTYPES["i64"]
I32 = DTYPES["i32"]
U8 = DTYPES["u8"]
BOOL = DTYPES["bool"]
NVFP4 = DTYPES["nvfp4"]
FP8_SCALED = DTYPES["fp8"]

# safetensors header dtype strings -> IR dtypes.
SAFETENSORS_DTYPES: Mapping[str, DType] = MappingProxyType(
    {dtype.safetensors: dtype for dtype in DTYPES.values() if not dtype.quantized})


def dtype_named(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise IRError(f"unknown dtype '{name}'; known dtypes: {', '.join(sorted(DTYPES))}") from None


Dim = int | str


def _check_dim(dim: Any) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int | str):
        raise IRError(f"a dimension must be an int or a symbol, not {dim!r}")
    if isinstance(dim, int) and dim < 0:
        raise IRError(f"a dimension must be non-negative, not {dim}")
    if isinstance(dim, str) and (not _SYMBOL.fullmatch(dim) or dim in _RESERVED_SYMBOLS):
        raise IRError(f"'{dim}' is not a valid symbolic dimension name")


@dataclass(frozen=True)
class TensorType:
    """dtype + shape (+ layout tag: `row` by default; sharding passes set e.g. `col/8`)."""

    dtype: DType
    shape: tuple[Dim, ...]
    layout: str = "row"

    def __post_init__(self) -> None:
        if not isinstance(self.shape, tuple):
            object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            _check_dim(dim)
        if not isinstance(self.layout, str) or not _LAYOUT.fullmatch(self.layout):
            raise IRError(f"'{self.layout}' is not a valid layout tag (e.g. row, col/8)")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        """Element count; only for static shapes."""
        count = 1
        for dim in self.shape:
            if not isinstance(dim, int):
                raise IRError(f"numel of a symbolic shape {self}")
            count *= dim
        return count

    def nbytes(self) -> int:
        """Bytes of the elements alone (for quantized formats, the codes without their scales;
        graph/storage.py gives what a weight really stores)."""
        return self.numel() * self.dtype.bits // 8

    def with_(self, **changes: Any) -> TensorType:
        """A changed copy; the same object when nothing changes."""
        if all(getattr(self, key) == value for key, value in changes.items()):
            return self
        return replace(self, **changes)

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        suffix = "" if self.layout == "row" else f", {self.layout}"
        return f"tensor<{self.dtype}, [{dims}]{suffix}>"


def tensor(dtype: DType, *shape: Dim) -> TensorType:
    return TensorType(dtype, tuple(shape))
