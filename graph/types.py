"""IR types: immutable, self-checking. A dtype, a shape whose dims are ints or symbols
(`batch`, `seq`, `ctx`, ...), and how the tensor is sharded over ranks."""

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
    # the block scales' dtype where the format has blocks (nvfp4codes' are not stored with a weight),
    # else the first weight scale's
    scales = [s for s in fmt.scales if s.layout == "per_block"] or list(fmt.weight_scales())
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
NVFP4_CODES = DTYPES["nvfp4codes"]
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


# Mesh axes a tensor can be distributed over: tensor parallel and expert parallel ranks.
MESH_AXES = ("tp", "ep")


@dataclass(frozen=True)
class Sharding:
    """How a tensor is distributed over the `parts` ranks of mesh axis `axis`: split into equal
    pieces along `dim`, or (dim None) replicated; `partial` marks a value each rank holds a partial
    sum of (a row-parallel GEMM's output before its all-reduce; for a weight, such as a row-parallel
    GEMM's bias, rank 0 holds it and the others zeros).

    A split may have fewer `pieces` than ranks: rank r then holds piece r * pieces // parts, each
    piece shared by parts // pieces consecutive ranks (attention's KV heads when there are fewer
    of them than ranks). A split dim may consist of consecutive `blocks` (Mamba's in_proj rows z,
    x, B, C, dt): each block is split, and a rank's piece is its piece of every block, in order.
    Text: `shard<tp=8, dim=0>`, `shard<tp=8>`, `shard<tp=8, partial>`, `shard<tp=8, dim=1, pieces=2>`,
    `shard<tp=2, dim=0, blocks=[64, 64, 16, 16, 4]>`."""

    axis: str
    parts: int
    dim: int | None = None
    partial: bool = False
    pieces: int | None = None
    blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.axis not in MESH_AXES:
            raise IRError(f"sharding axis '{self.axis}' is not one of {', '.join(MESH_AXES)}")
        if isinstance(self.parts, bool) or not isinstance(self.parts, int) or self.parts < 1:
            raise IRError(f"sharding over {self.axis} needs a positive rank count, not {self.parts!r}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0):
            raise IRError(f"sharding dim must be a non-negative int, not {self.dim!r}")
        if self.partial and self.dim is not None:
            raise IRError("a partial-sum value is not also split along a dim")
        if not isinstance(self.blocks, tuple):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if (self.pieces is not None or self.blocks) and self.dim is None:
            raise IRError(f"{self} has pieces or blocks but splits no dim")
        if self.pieces is not None and (isinstance(self.pieces, bool) or not isinstance(self.pieces, int)
                                        or self.pieces < 1 or self.parts % self.pieces):
            raise IRError(f"sharding over {self.parts} ranks cannot have {self.pieces!r} pieces: the pieces must "
                          f"divide the ranks")
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 or b % self.piece_count for b in self.blocks):
            raise IRError(f"sharding blocks {list(self.blocks)} do not each split into {self.piece_count} equal parts")

    @property
    def piece_count(self) -> int:
        """Into how many pieces the dim is split (the ranks, unless fewer `pieces` are shared)."""
        return self.parts if self.pieces is None else self.pieces

    def piece_of(self, rank: int) -> int:
        return rank * self.piece_count // self.parts

    def local_size(self, size: int) -> int:
        return size // self.piece_count

    def ranges(self, size: int, rank: int) -> list[tuple[int, int]]:
        """The [start, stop) ranges along the split dim (of static size `size`) that `rank` holds."""
        assert self.dim is not None, f"{self} splits nothing"
        piece = self.piece_of(rank)
        blocks = self.blocks or (size,)
        out, start = [], 0
        for block in blocks:
            width = block // self.piece_count
            out.append((start + piece * width, start + (piece + 1) * width))
            start += block
        return out

    def __str__(self) -> str:
        extra = f", dim={self.dim}" if self.dim is not None else ", partial" if self.partial else ""
        if self.pieces is not None:
            extra += f", pieces={self.pieces}"
        if self.blocks:
            extra += f", blocks=[{', '.join(map(str, self.blocks))}]"
        return f"shard<{self.axis}={self.parts}{extra}>"


@dataclass(frozen=True)
class TensorType:
    """dtype + shape (+ how it is sharded over ranks; None: whole on every rank)."""

    dtype: DType
    shape: tuple[Dim, ...]
    sharding: Sharding | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shape, tuple):
            object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            _check_dim(dim)
        if self.sharding is not None:
            if not isinstance(self.sharding, Sharding):
                raise IRError(f"sharding must be a Sharding, not {self.sharding!r}")
            split = self.sharding.dim
            if split is not None and split >= len(self.shape):
                raise IRError(f"{self.sharding} splits dim {split} of a rank-{len(self.shape)} tensor")
            size = self.shape[split] if split is not None else None
            if isinstance(size, int) and self.sharding.blocks and sum(self.sharding.blocks) != size:
                raise IRError(f"sharding blocks {list(self.sharding.blocks)} do not sum to dim {split} of size {size}")
            if isinstance(size, int) and size % self.sharding.piece_count:
                raise IRError(f"dim {split} of size {size} does not split into "
                              f"{self.sharding.piece_count} equal parts")

    def local_shape(self) -> tuple[Dim, ...]:
        """The shape each rank holds."""
        if self.sharding is None or self.sharding.dim is None:
            return self.shape
        split = self.sharding.dim
        size = self.shape[split]
        local = self.sharding.local_size(size) if isinstance(size, int) else size
        return (*self.shape[:split], local, *self.shape[split + 1 :])

    def local(self) -> TensorType:
        """What one rank holds, as a plain type (ops of a sharded graph see their operands so)."""
        if self.sharding is None:
            return self
        return TensorType(self.dtype, self.local_shape())

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
        suffix = "" if self.sharding is None else f", {self.sharding}"
        return f"tensor<{self.dtype}, [{dims}]{suffix}>"


def tensor(dtype: DType, *shape: Dim) -> TensorType:
    return TensorType(dtype, tuple(shape))
