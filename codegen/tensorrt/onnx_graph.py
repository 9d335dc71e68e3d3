"""A small builder for ONNX graphs: nodes with fresh names, constants, typed graph inputs and
outputs, and weight initializers whose bytes the driver passes in. Float values that the IR holds
in bf16 or f16 are carried between ops as float32 holding exactly the narrower value (each op
rounds its result through a Cast to the IR dtype and back), so only Cast ever touches a 16-bit
float inside the graph; graph inputs and outputs keep the IR dtypes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import AttrValue
from nemocompile.graph.types import DType, TensorType

OPSET = 23  # FLOAT4E2M1 in DequantizeLinear needs 23; TensorRT 10.15's parser reads opsets 9-24
IR_VERSION = 11  # the ONNX IR version of opset 23
CUSTOM_DOMAIN = "nemocompile"  # the plugin ops' domain, also their TensorRT plugin namespace
TRT_DOMAIN = "trt"  # TensorRT's own custom ops (TRT_FP4DynamicQuantize)
PLUGIN_VERSION = "1"

# IR dtype name -> ONNX element type of a tensor holding it.
ONNX_TYPES: dict[str, int] = {
    "f32": TensorProto.FLOAT, "bf16": TensorProto.BFLOAT16, "f16": TensorProto.FLOAT16,
    "fp8e4m3": TensorProto.FLOAT8E4M3FN, "i64": TensorProto.INT64, "i32": TensorProto.INT32,
    "u8": TensorProto.UINT8, "bool": TensorProto.BOOL,
}
# IR float dtypes whose values the graph carries in float32 between ops.
NARROW_FLOATS = ("bf16", "f16")


def onnx_type(dtype: DType | str) -> int:
    name = dtype if isinstance(dtype, str) else dtype.name
    try:
        return ONNX_TYPES[name]
    except KeyError:
        raise IRError(f"dtype {name} has no ONNX element type") from None


def onnx_dims(type_: TensorType) -> list[int | str]:
    return list(type_.shape)


@dataclass(frozen=True)
class Initializer:
    """A tensor the model holds: its logical dims, its size and its bytes (little endian, FP4 two
    codes a byte, the even element in the low nibble), or None for a tensor that lives in the
    builder's external data file."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    nbytes: int
    raw: bytes | None


DATA_ALIGNMENT = 4096  # each external tensor starts on a page, so it can be mapped in place


@dataclass
class ExternalData:
    """Where each large initializer lies in one data file shared by several models: a tensor the
    models share is placed once. The driver writes the file from the same layout."""

    file: str
    placed: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, length)
    end: int = 0

    def place(self, name: str, nbytes: int) -> tuple[int, int]:
        known = self.placed.get(name)
        if known is not None:
            if known[1] != nbytes:
                raise IRError(f"initializer {name} has {nbytes} bytes in one exported model and {known[1]} in another")
            return known
        offset = -(-self.end // DATA_ALIGNMENT) * DATA_ALIGNMENT
        self.placed[name] = (offset, nbytes)
        self.end = offset + nbytes
        return self.placed[name]


@dataclass
class OnnxBuilder:
    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    initializers: dict[str, Initializer] = field(default_factory=dict)
    domains: set[str] = field(default_factory=set)
    external: ExternalData | None = None  # where large initializers go; None: every one inline
    counter: int = 0

    def fresh(self, hint: str = "t") -> str:
        self.counter += 1
        return f"_{hint}_{self.counter}"

    def node(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, domain: str = "",
             **attrs: object) -> list[str]:
        """Append a node; returns its output names (fresh unless given)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        kept: dict[str, Any] = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(f"n_{op_type}"),
                                           domain=domain or None, **kept))
        if domain:
            self.domains.add(domain)
        return names

    def one(self, op_type: str, inputs: Sequence[str], domain: str = "", **attrs: object) -> str:
        return self.node(op_type, inputs, 1, domain, **attrs)[0]

    def const(self, value: np.ndarray | float | int | Sequence[int] | Sequence[float], dtype: str = "") -> str:
        """A small constant (kept inside the model, never as external data)."""
        array = np.asarray(value, dtype=np.dtype(dtype) if dtype else None)
        if not dtype and array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self.fresh("c")
        self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n_Constant"),
                                           value=numpy_helper.from_array(array, name)))
        return name

    def i64(self, value: int) -> str:
        """An int64 scalar constant."""
        return self.const(np.asarray(value, dtype=np.int64))

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def scalar(self, value: float) -> str:
        return self.const(np.asarray(value, dtype=np.float32))

    def initializer(self, init: Initializer) -> str:
        known = self.initializers.get(init.name)
        if known is not None and known != init:
            raise IRError(f"initializer {init.name} is given twice with different contents")
        self.initializers[init.name] = init
        return init.name

    def graph_input(self, name: str, type_: TensorType) -> None:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_type(type_.dtype), onnx_dims(type_)))

    def graph_output(self, name: str, type_: TensorType) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, onnx_type(type_.dtype), onnx_dims(type_)))

    # ------------------------------------------------------------------ float helpers

    def to_f32(self, value: str) -> str:
        return self.one("Cast", [value], to=TensorProto.FLOAT)

    def round_to(self, value: str, dtype: DType | str) -> str:
        """A float32 value rounded to `dtype` (round to nearest even) and carried in float32 again;
        unchanged for f32."""
        name = dtype if isinstance(dtype, str) else dtype.name
        if name not in NARROW_FLOATS:
            return value
        narrow = self.one("Cast", [value], to=onnx_type(name))
        return self.to_f32(narrow)

    def model(self) -> onnx.ModelProto:
        inits = [_tensor_proto(init, self.external) for init in self.initializers.values()]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, inits)
        opsets = [helper.make_opsetid("", OPSET)]
        opsets += [helper.make_opsetid(domain, 1) for domain in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="nemocompile")
        model.ir_version = IR_VERSION
        return model


def _tensor_proto(init: Initializer, external: ExternalData | None) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name = init.name
    tensor.data_type = init.data_type
    tensor.dims.extend(init.dims)
    if init.raw is not None:
        tensor.raw_data = init.raw
        return tensor
    if external is None:
        raise IRError(f"initializer {init.name} refers to external data, but the model has no data file")
    offset, length = external.place(init.name, init.nbytes)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", external.file), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def attr_value(value: AttrValue) -> object:
    """An IR attribute as an ONNX attribute value (bools as ints, as ONNX has no bool)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, tuple):
        return [attr_value(v) for v in value]
    return value
