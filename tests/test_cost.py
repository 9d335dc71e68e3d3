"""The roofline cost model (graph/cost.py) against sums done by hand on a tiny graph."""

from __future__ import annotations

import pytest
from test_pass_equivalence import WITH_ACTIVATIONS, core_graph

from nemocompile.graph.cost import CostModel, OpCost, Sizes, experts_hit, kernel_label
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.pipeline import fusion_steps


def test_experts_hit_is_top_k_for_one_token_and_approaches_all_experts() -> None:
    assert experts_hit(128, 6, 1) == pytest.approx(6.0)
    assert experts_hit(128, 6, 100_000) == pytest.approx(128.0)
    assert 6 < experts_hit(128, 6, 8) < 48


def test_roofline_time_is_the_larger_of_memory_and_compute() -> None:
    peaks = {"bf16": 1000.0, "fp4": 4000.0}
    memory = OpCost(bytes=1e9, flops=1e9, compute="bf16")
    assert memory.seconds(1e12, peaks) == pytest.approx(1e-3) and memory.memory_bound(1e12, peaks)
    compute = OpCost(bytes=1e6, flops=4e15, compute="fp4")
    assert compute.seconds(1e12, peaks) == pytest.approx(1.0) and not compute.memory_bound(1e12, peaks)
    assert OpCost(0, 1e15, "fp8").seconds(1e12, peaks) == pytest.approx(1.0)  # no fp8 peak: bf16's


def test_gemm_and_expert_costs_by_hand() -> None:
    graph = AssignPrecision(WITH_ACTIVATIONS).apply(core_graph("hybrid")).graph  # hidden 32, M*EM-E, fp32
    for step in fusion_steps():
        graph = step.pipeline_pass.apply(graph).graph
    model = CostModel(graph)
    sizes = Sizes(batch=2, seq=3, cached=5)
    lm_head = next(op for op in graph.ops if op.scope == "lm_head" and op.opname == "linear")
    cost = model.cost(lm_head, sizes)
    tokens, hidden, vocab = 6, 32, 48
    assert cost.flops == 2 * tokens * hidden * vocab
    assert cost.bytes == 4 * (vocab * hidden + tokens * hidden + tokens * vocab)  # fp32 weight, input, output
    assert cost.compute == "fp32"
    up = next(op for op in graph.ops if op.opname == "moe_expert_up")
    cost = model.cost(up, sizes)
    experts, top_k, inter = 4, 2, 16
    assert cost.flops == 2 * tokens * top_k * hidden * inter
    assert cost.compute == "fp4"  # W4A4
    weight_bytes = experts * inter * (hidden // 2 + hidden // 16) + experts * 4  # codes, E4M3 scales, fp32 scale
    indices = 8 * (tokens * top_k + experts + 1)  # order and offsets, int64
    expected = (weight_bytes * experts_hit(experts, top_k, tokens) / experts + 4 * tokens * hidden + indices
                + 4 * experts + 4 * tokens * top_k * inter)  # + input_scale[experts], the fp32 hidden rows
    assert cost.bytes == pytest.approx(expected)
    assert kernel_label(up, graph.value_types(), {n: w.type for n, w in graph.weight_map().items()}) == \
        "moe_expert_up(w=nvfp4, x=f32, act=nvfp4)"


def test_decode_attention_reads_the_cache_and_writes_one_position() -> None:
    graph = core_graph("hybrid")  # fp32; attention: 4 heads, 2 KV heads, head_dim 8
    model = CostModel(graph)
    attention = next(op for op in graph.ops if op.opname == "attention_gqa")
    cost = model.cost(attention, Sizes(batch=1, seq=1, cached=100))
    cache = 2 * 2 * 100 * 8 * 4 + 2 * 2 * 1 * 8 * 4
    qkv_out = 4 * (32 + 16 + 16 + 32)
    assert cost.bytes == cache + qkv_out
    assert cost.flops == 4 * 4 * 1 * (100 + 1) * 8


def test_nvfp4_codes_a_norm_hands_its_gemm_cost_their_real_bytes() -> None:
    """Every linear W4A4: the norm of a Mamba layer after the first writes NVFP4 codes with E4M3 block
    scales (0.5 + 1/16 byte per element, not fp32 values), and the in_proj after it reads those bytes."""
    w4a4 = PrecisionPolicy("fp32", {"routed_experts": "nvfp4_w4a4", "shared_experts": "nvfp4_w4a4",
                                    "mamba_linears": "nvfp4_w4a4"})
    graph = AssignPrecision(w4a4).apply(core_graph("hybrid")).graph  # hidden 32, M*EM-E, fp32
    for step in fusion_steps():
        graph = step.pipeline_pass.apply(graph).graph
    model = CostModel(graph)
    sizes = Sizes(batch=2, seq=3)
    tokens, hidden = 6, 32
    norm = next(op for op in graph.ops if op.opname == "add_rms_norm" and op.attrs.get("act_format") == "nvfp4")
    codes = tokens * hidden * (0.5 + 1 / 16)
    # reads x, residual, weight and input_scale; writes the codes and the fp32 sum
    assert model.cost(norm, sizes).bytes == 4 * (2 * tokens * hidden + hidden + 1) + codes + 4 * tokens * hidden
    (in_proj,) = graph.users(norm.results[0].name)
    cost = model.cost(in_proj, sizes)
    rows = int(graph.weight_map()[in_proj.operands[1] or ""].type.shape[0])
    weight_bytes = rows * (hidden // 2 + hidden // 16) + 4  # codes, E4M3 scales, the fp32 weight_scale_2
    assert cost.compute == "fp4" and cost.bytes == weight_bytes + codes + 4 + 4 * tokens * rows
