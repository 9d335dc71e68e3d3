"""The reference implementation of every composite op (the blocks, and fused ops as they come):
the composition of the core references. The op's decomposition (graph/decompositions.py, the
same rule the Decompose pass applies) is run on that one op, in a graph whose inputs are the
op's operands typed as their values are, and the core ops it becomes run by their references."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nemocompile.base.errors import IRError
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.decompositions import DECOMPOSITIONS
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.types import DTYPES, NVFP4, TensorType

from .dtypes import ir_dtype
from .formats import FP8Tensor, NVFP4Tensor
from .reference_dispatch import Args, OpImpl, reference_impl
from .weights import WeightValue


def value_type(value: WeightValue) -> TensorType:
    """The IR type of a runtime value (a quantized weight by its logical shape). A quantized
    activation (the fp32 values the reference runtime holds for a `quantize` result) reads as
    f32: a fused op that takes one will need its operand types from the graph instead."""
    if isinstance(value, NVFP4Tensor):
        packed = value.packed.shape
        return TensorType(NVFP4, (*packed[:-1], packed[-1] * 2))
    if isinstance(value, FP8Tensor):
        return TensorType(DTYPES["fp8"], tuple(value.data.shape))
    return TensorType(DTYPES[ir_dtype(value.dtype)], tuple(value.shape))


def expand(op: Op, operand_types: Sequence[TensorType | None]) -> Graph:
    """`op` decomposed alone: a graph whose inputs are its operands and whose outputs its results."""
    decomposition = DECOMPOSITIONS.get(op.opname)
    if decomposition is None:
        raise IRError(f"op '{op.opname}' has no decomposition")
    builder = GraphBuilder(f"{op.opname}@{op.scope}", origin="composite")
    for name, type_ in zip(op.operands, operand_types, strict=True):
        if name is not None and not builder.has(name):
            assert type_ is not None
            builder.input(name, type_)
    builder.number_after([*(name for name in op.operands if name), *(r.name for r in op.results)])
    decomposition(builder, op)
    for result in op.results:
        builder.output(result.name)
    return builder.build()


def run_expanded(graph: Graph, args: Args, operands: Sequence[str | None]) -> tuple[torch.Tensor, ...]:
    values: dict[str, WeightValue] = {name: value for name, value in zip(operands, args, strict=True)
                                      if name is not None and value is not None}
    for core in graph.ops:
        impl = reference_impl(core.opname)
        results = impl(core, [None if name is None else values[name] for name in core.operands])
        values.update({r.name: tensor for r, tensor in zip(core.results, results, strict=True)})
    out = tuple(values[name] for name in graph.outputs)
    assert all(isinstance(t, torch.Tensor) for t in out)
    return out  # type: ignore[return-value]


def _run_composite(op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    types = [None if value is None else value_type(value) for value in args]
    return run_expanded(expand(op, types), args, op.operands)


def composite_impl(opname: str) -> OpImpl | None:
    """The reference of a composite op, or None when `opname` has no decomposition."""
    return _run_composite if opname in DECOMPOSITIONS else None
