"""The mixture of experts in standard ONNX: the sigmoid group-limited top-k router, dispatch (a
stable sort of the token-expert pairs by expert: TopK over the unique keys expert * pairs + pair),
the grouped GEMM (each row times its expert's weight, gathered per row) and the weighted combine."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from nemocompile.graph.ir import Op
from nemocompile.graph.opdef import operand

from .context import Lowering
from .lower_core import expert_of_row, matmul_t


def _req(op: Op, name: str) -> str:
    found = operand(op, name)
    assert found is not None
    return found


def _dim(low: Lowering, value: str, axis: int) -> str:
    b = low.b
    return b.one("Gather", [b.one("Shape", [value]), b.i64(axis)], axis=0)


def _leading_then(low: Lowering, value: str, last: int) -> str:
    """The shape of `value` with its last dim replaced by `last`."""
    b = low.b
    leading = b.one("Slice", [b.one("Shape", [value]), b.ints([0]), b.ints([-1]), b.ints([0])])
    return b.one("Concat", [leading, b.ints([last])], axis=0)


def moe_router(low: Lowering, op: Op) -> None:
    low.bind(op, list(router_values(low, op)))


def router_values(low: Lowering, op: Op) -> tuple[str, str]:
    """(weights f32, ids i64), both [..., top_k], of a moe_router or moe_route op."""
    b = low.b
    at = op.attrs
    top_k, n_group, topk_group = at.int("top_k"), at.int("n_group"), at.int("topk_group")
    x, weight, bias = _req(op, "x"), _req(op, "weight"), operand(op, "bias")
    experts = low.static(weight, 0)
    hidden = low.static(x, -1)
    rows = b.one("Reshape", [low.value(x), b.ints([-1, hidden])])
    scores = b.one("Sigmoid", [matmul_t(low, rows, low.value(weight))])  # [N, E]
    choice = scores if bias is None else b.one("Add", [scores, low.value(bias)])
    if topk_group < n_group:
        per_group = experts // n_group
        grouped = b.one("Reshape", [choice, b.ints([-1, n_group, per_group])])
        best_two, _ = b.node("TopK", [grouped, b.ints([2])], 2, axis=-1, largest=1, sorted=1)
        group_scores = b.one("ReduceSum", [best_two, b.ints([-1])], keepdims=0)  # [N, G]
        _, best_groups = b.node("TopK", [group_scores, b.ints([topk_group])], 2, axis=-1, largest=1, sorted=1)
        zeros = b.one("ConstantOfShape", [b.one("Shape", [group_scores])], value=numpy_helper.from_array(
            np.zeros(1, dtype=np.float32)))
        ones = b.one("ConstantOfShape", [b.one("Shape", [best_groups])], value=numpy_helper.from_array(
            np.ones(1, dtype=np.float32)))
        kept = b.one("ScatterElements", [zeros, best_groups, ones], axis=1)  # [N, G]
        kept = b.one("Mul", [b.one("Unsqueeze", [kept, b.ints([2])]),
                             b.const(np.ones((1, 1, per_group), dtype=np.float32))])
        kept = b.one("Reshape", [kept, b.ints([-1, experts])])
        choice = b.one("Where", [b.one("Greater", [kept, b.scalar(0.5)]), choice, b.scalar(-np.inf)])
    _, ids = b.node("TopK", [choice, b.ints([top_k])], 2, axis=-1, largest=1, sorted=1)
    weights = b.one("GatherElements", [scores, ids], axis=1)
    if at.bool("norm_topk_prob"):
        total = b.one("Add", [b.one("ReduceSum", [weights, b.ints([-1])], keepdims=1), b.scalar(1e-20)])
        weights = b.one("Div", [weights, total])
    weights = b.one("Mul", [weights, b.scalar(at.float("routed_scaling_factor"))])
    shape = _leading_then(low, low.value(x), top_k)
    return b.one("Reshape", [weights, shape]), b.one("Reshape", [ids, shape])


def moe_dispatch(low: Lowering, op: Op) -> None:
    x, ids = _req(op, "x"), _req(op, "ids")
    top_k = low.static(ids, -1)
    offsets, order = expert_order(low, low.value(ids), op.attrs.int("num_experts"))
    low.bind(op, [gather_rows(low, low.value(x), low.static(x, -1), order, top_k), offsets, order])


def gather_rows(low: Lowering, x32: str, hidden: int, order: str, top_k: int) -> str:
    """x_sorted[r] = x[order[r] // top_k]: the row of each token-expert pair, grouped by expert."""
    b = low.b
    rows = b.one("Reshape", [x32, b.ints([-1, hidden])])
    return b.one("Gather", [rows, b.one("Div", [order, b.i64(top_k)])], axis=0)


def expert_order(low: Lowering, ids: str, experts: int) -> tuple[str, str]:
    """(offsets [E+1], order [N*k]) of the pairs sorted stably by expert, as moe_dispatch makes them."""
    b = low.b
    flat = b.one("Reshape", [ids, b.ints([-1])])  # pair t*k + j -> its expert
    pairs = _dim(low, flat, 0)
    index = b.one("Range", [b.i64(0), pairs, b.i64(1)])
    keys = b.one("Add", [b.one("Mul", [flat, pairs]), index])  # unique, so the sort is stable
    _, order = b.node("TopK", [keys, b.one("Unsqueeze", [pairs, b.ints([0])])], 2, axis=0, largest=0, sorted=1)
    one_hot = b.one("Equal", [b.one("Unsqueeze", [flat, b.ints([1])]), b.const(np.arange(experts, dtype=np.int64))])
    counts = b.one("ReduceSum", [b.one("Cast", [one_hot], to=TensorProto.INT64), b.ints([0])], keepdims=0)
    offsets = b.one("Concat", [b.ints([0]), b.one("CumSum", [counts, b.i64(0)])], axis=0)
    return offsets, order


def grouped_gemm_value(low: Lowering, x32: str, offsets: str, weight: str) -> str:
    """Row r times its expert's weight^T (float32), the expert read from offsets."""
    b = low.b
    experts = expert_of_row(low, offsets, x32)
    per_row = b.one("Gather", [low.value(weight), experts], axis=0)  # [R, out, in]
    product = b.one("MatMul", [b.one("Unsqueeze", [x32, b.ints([1])]),
                               b.one("Transpose", [per_row], perm=[0, 2, 1])])  # [R, 1, out]
    return b.one("Squeeze", [product, b.ints([1])])


def grouped_gemm(low: Lowering, op: Op) -> None:
    x, offsets, weight = _req(op, "x"), _req(op, "offsets"), _req(op, "weight")
    low.bind(op, [grouped_gemm_value(low, low.value(x), low.value(offsets), weight)])


def moe_combine(low: Lowering, op: Op) -> None:
    y, order, weights = _req(op, "y"), _req(op, "order"), _req(op, "weights")
    low.bind(op, [combine_value(low, low.value(y), low.value(order), low.value(weights), low.static(weights, -1),
                                low.static(y, -1))])


def combine_value(low: Lowering, y32: str, order: str, weights: str, top_k: int, width: int) -> str:
    """out[token] = sum over its pairs of weight * y (float32), shaped as weights' leading dims."""
    b = low.b
    pair_weight = b.one("Gather", [b.one("Reshape", [weights, b.ints([-1])]), order], axis=0)
    weighted = b.one("Mul", [y32, b.one("Unsqueeze", [pair_weight, b.ints([1])])])  # float32 [R, D]
    zeros = b.one("ConstantOfShape", [b.one("Shape", [weighted])],
                  value=numpy_helper.from_array(np.zeros(1, dtype=np.float32)))
    by_pair = b.one("ScatterND", [zeros, b.one("Unsqueeze", [order, b.ints([1])]), weighted])
    summed = b.one("ReduceSum", [b.one("Reshape", [by_pair, b.ints([-1, top_k, width])]), b.ints([1])], keepdims=0)
    return b.one("Reshape", [summed, _leading_then(low, weights, width)])
