"""What every op's lowering sees: the ONNX builder, the IR graph and its value types, the ONNX name
of each IR value, and the weights (their initializers, dequantized on first use)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Graph, Op, Weight
from nemocompile.graph.types import TensorType

from .onnx_graph import OnnxBuilder
from .weights import WeightParts, WeightSource, add_weight, dequantized

TENSORRT = "tensorrt"  # Mamba, MoE and cached attention as plugin ops
DECOMPOSED = "decomposed"  # every op in standard ONNX ops
MODES = (TENSORRT, DECOMPOSED)


@dataclass
class Lowering:
    builder: OnnxBuilder
    graph: Graph
    weight_source: WeightSource
    mode: str
    types: dict[str, TensorType] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)  # IR value -> ONNX name (float32 for narrow floats)
    weights: dict[str, Weight] = field(default_factory=dict)
    parts: dict[str, WeightParts] = field(default_factory=dict)
    float_weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.mode in MODES, self.mode
        self.types = self.graph.value_types()
        self.weights = self.graph.weight_map()

    @property
    def b(self) -> OnnxBuilder:
        return self.builder

    def type_of(self, name: str) -> TensorType:
        return self.types[name]

    def is_weight(self, name: str) -> bool:
        return name in self.weights

    def weight_parts(self, name: str) -> WeightParts:
        """A weight's initializers as stored (codes and scales), for plugins that read them as such."""
        if name not in self.parts:
            self.parts[name] = add_weight(self.builder, self.weights[name], self.weight_source)
        return self.parts[name]

    def value(self, name: str) -> str:
        """The ONNX name of an IR value; a weight as float32 values (dequantized once)."""
        if name in self.weights:
            if name not in self.float_weights:
                self.float_weights[name] = dequantized(self.builder, self.weights[name], self.weight_parts(name))
            return self.float_weights[name]
        try:
            return self.values[name]
        except KeyError:
            raise IRError(f"the ONNX export reached %{name} before the op that makes it") from None

    def optional(self, name: str | None) -> str | None:
        return None if name is None else self.value(name)

    def bind(self, op: Op, names: list[str] | tuple[str, ...], rounded: bool = True) -> None:
        """The op's results are these ONNX values (float32), rounded to each result's dtype unless
        they hold such values already."""
        if len(names) != len(op.results):
            raise IRError(f"the ONNX lowering of {op.opname} made {len(names)} values for {len(op.results)} results")
        for result, name in zip(op.results, names, strict=True):
            dtype = result.type.dtype
            exact = dtype.quantized or not rounded
            self.values[result.name] = name if exact else self.builder.round_to(name, dtype)

    def dims(self, name: str) -> tuple[int | str, ...]:
        return self.types[name].shape

    def static(self, name: str, axis: int) -> int:
        dim = self.types[name].shape[axis]
        if not isinstance(dim, int):
            raise IRError(f"the ONNX export needs dim {axis} of %{name} to be static, got {dim}")
        return dim


Lower = Callable[[Lowering, Op], None]
