"""Weights as ONNX initializers, from the engine's stored tensors (a `WeightSource` the driver
passes in, keyed by stored tensor name as graph/storage.py names them). A tensor of
EXTERNAL_MIN_BYTES or more is never read here: its initializer refers to the shared external data
file, which the driver streams from the source afterwards, so exporting a model of any size holds
only its small tensors in memory.

- a float weight: one initializer in its dtype;
- NVFP4 (TensorRT's and ModelOpt's pattern): codes as a FLOAT4E2M1 initializer with the logical
  shape [..., out, in], E4M3 block scales FLOAT8E4M3FN [..., out, in/16] and the FP32 global scale;
  `s = DequantizeLinear(block_scale, global_scale)`, `w = DequantizeLinear(codes, s, axis=-1,
  block_size=16)`;
- FP8: FLOAT8E4M3FN data and its FP32 scale (per tensor, per stacked expert or per output row);
  `w = DequantizeLinear(data, scale)`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from onnx import TensorProto

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Weight
from nemocompile.graph.storage import component_name, stored_tensors

from .onnx_graph import Initializer, OnnxBuilder, onnx_type

EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside the model file


class WeightSource(Protocol):
    """The stored tensors an export reads: their sizes, and the bytes of the small ones."""

    def nbytes(self, name: str) -> int | None:
        """The tensor's size in bytes, or None when the source has no such tensor."""
        ...

    def read(self, name: str) -> bytes:
        """The tensor's bytes (little endian, as stored)."""
        ...


@dataclass(frozen=True)
class BytesSource:
    """A source over tensors already in memory (tests, small graphs)."""

    tensors: Mapping[str, bytes]

    def nbytes(self, name: str) -> int | None:
        raw = self.tensors.get(name)
        return None if raw is None else len(raw)

    def read(self, name: str) -> bytes:
        return self.tensors[name]


@dataclass(frozen=True)
class WeightParts:
    """The initializer names of one weight: `data` (codes or values) and, for a quantized weight,
    `scale` (block scales or the FP8 scale) and `scale_2` (NVFP4's global scale)."""

    data: str
    scale: str = ""
    scale_2: str = ""


def _bytes(weights: WeightSource, name: str, expected: int, external: bool) -> bytes | None:
    """The tensor's bytes, or None for one that stays in the external data file; its size checked."""
    size = weights.nbytes(name)
    if size is None:
        raise IRError(f"weight tensor {name} was not given to the ONNX export")
    if size != expected:
        raise IRError(f"weight tensor {name} has {size} bytes, its stored type needs {expected}")
    if external and size >= EXTERNAL_MIN_BYTES:
        return None
    raw = weights.read(name)
    if len(raw) != expected:
        raise IRError(f"weight tensor {name} read {len(raw)} bytes, its stored type needs {expected}")
    return raw


def add_weight(builder: OnnxBuilder, weight: Weight, weights: WeightSource) -> WeightParts:
    """The weight's initializers, added to `builder` (large ones as references into its external
    data file when it has one)."""
    fmt = weight.type.dtype.name
    names: list[str] = []
    for stored in stored_tensors(weight.type):
        tensor = component_name(weight.name, stored.component)
        raw = _bytes(weights, tensor, stored.nbytes, builder.external is not None)
        if stored.component == "" and fmt == "nvfp4":
            dims = tuple(int(d) for d in weight.type.shape)  # the codes' logical shape
            builder.initializer(Initializer(tensor, TensorProto.FLOAT4E2M1, dims, stored.nbytes, raw))
        elif stored.component == "" and fmt == "fp8":
            builder.initializer(Initializer(tensor, TensorProto.FLOAT8E4M3FN, stored.shape, stored.nbytes, raw))
        else:
            builder.initializer(Initializer(tensor, onnx_type(stored.dtype), stored.shape, stored.nbytes, raw))
        names.append(tensor)
    return WeightParts(*names)


def dequantized(builder: OnnxBuilder, weight: Weight, parts: WeightParts) -> str:
    """The weight as float32 values (DequantizeLinear for NVFP4 and FP8; a Cast for bf16)."""
    fmt = weight.type.dtype.name
    rank = weight.type.rank
    if fmt == "nvfp4":
        # stacked experts carry one global scale each: a per-axis dequantization along dim 0
        per_expert = rank == 3
        block = builder.one("DequantizeLinear", [parts.scale, parts.scale_2], axis=0 if per_expert else None)
        return builder.one("DequantizeLinear", [parts.data, block], axis=-1, block_size=weight.type.dtype.block_size)
    if fmt == "fp8":
        scale_rank = len(stored_tensors(weight.type)[1].shape)
        axis = 0 if scale_rank == 1 and rank >= 2 else None
        if scale_rank > 1:
            raise IRError(f"weight {weight.name}: FP8 with a {scale_rank}-D scale has no ONNX form yet")
        return builder.one("DequantizeLinear", [parts.data, parts.scale], axis=axis)
    if weight.type.dtype.quantized:
        raise IRError(f"weight {weight.name} is stored as {fmt}, which has no ONNX form yet")
    return builder.to_f32(parts.data) if fmt != "f32" else parts.data
