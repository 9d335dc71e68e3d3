"""IR types: immutable, self-checking. A dtype, a shape whose dims are ints or symbols
(`batch`, `seq`, `ctx`, ...), and a layout/sharding tag."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from nemocompile.base.errors import IRError

_SYMBOL = re.compile(r"[a-z_][a-z0-9_]*")
_RESERVED_SYMBOLS = frozenset({"inf", "nan"})  # these read back as numbers
# row (unsharded), or a sharding tag such as col/8 (split along columns over 8 ranks)
_LAYOUT = re.compile(r"[a-z_][a-z0-9_]*(/[0-9]+)?")


@dataclass(frozen=True)
class DType:
    """A storage/compute format. Quantized formats (later) add a block size and a scale dtype."""

    name: str
    bits: int
    is_float: bool = True
    block_size: int | None = None
    scale_dtype: str | None = None
    # A quantized weight format: stored as codes plus scales (see graph/storage.py).
    quantized: bool = False

    def __str__(self) -> str:
        return self.name


F32 = DType("f32", 32)
BF16 = DType("bf16", 16)
F16 = DType("f16", 16)
FP8_E4M3 = DType("fp8e4m3", 8)
I64 = DType("i64", 64, is_float=False)
I32 = DType("i32", 32, is_float=False)
U8 = DType("u8", 8, is_float=False)
BOOL = DType("bool", 8, is_float=False)
# NVFP4: E2M1 codes, an E4M3 scale per 16 inputs, an FP32 global scale (NVIDIA ModelOpt's layout).
NVFP4 = DType("nvfp4", 4, block_size=16, scale_dtype="fp8e4m3", quantized=True)
# FP8 E4M3 weight with an FP32 per-tensor scale.
FP8_SCALED = DType("fp8", 8, scale_dtype="f32", quantized=True)

DTYPES: dict[str, DType] = {d.name: d for d in (F32, BF16, F16, FP8_E4M3, I64, I32, U8, BOOL, NVFP4, FP8_SCALED)}

# safetensors header dtype strings <-> IR dtypes.
SAFETENSORS_DTYPES: dict[str, DType] = {
    "F32": F32,
    "BF16": BF16,
    "F16": F16,
    "F8_E4M3": FP8_E4M3,
    "I64": I64,
    "I32": I32,
    "U8": U8,
    "BOOL": BOOL,
}


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
