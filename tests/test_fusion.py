"""The fusion passes (passes/fuse_*.py): each through the before/after check of tests/passcheck.py
on random tiny configs, float and quantized (the fused ops' references are compositions of the
core references, so every fused graph computes the very same logits), their counts against what
the model implies, and the fused ops' references against the core functions directly."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from passcheck import check_pass
from test_pass_equivalence import WEIGHT_ONLY, WITH_ACTIVATIONS, core_graph, pattern

from nemocompile.graph.fused_ops import fusions_in
from nemocompile.graph.ir import Graph
from nemocompile.graph.kernels import REFERENCE, candidates
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.base import Pass
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.passes.select_kernels import SelectKernels
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.pipeline import fusion_steps
from nemocompile.runtime.formats import NVFP4Tensor, dequantize_nvfp4, quantize_nvfp4
from nemocompile.runtime.quantized_ops import quant_grouped_gemm, quantize
from nemocompile.runtime.reference import fused, moe_combine, moe_dispatch, moe_router, relu2, rms_norm

FUSION_PASSES: Sequence[Pass] = [step.pipeline_pass for step in fusion_steps()]
# W4A4 everywhere: the norm of every Mamba layer after the first hands its in_proj NVFP4 codes
W4A4 = PrecisionPolicy("fp32", {"routed_experts": "nvfp4_w4a4", "shared_experts": "nvfp4_w4a4",
                                "mamba_linears": "nvfp4_w4a4"})
POLICIES: dict[str, PrecisionPolicy | None] = {"fp32": None, "weight_only": WEIGHT_ONLY,
                                               "w4a4_w8a8": WITH_ACTIVATIONS}


def implied(letters: str, activations_quantized: bool) -> dict[str, int]:
    """The fusions a model of this layer pattern implies: one fused router and one fused expert
    pair per MoE layer, one add+norm per layer (each layer's residual add feeds the next norm or
    norm_f), one conv1d+SiLU per Mamba layer; with W8A8 Mamba/shared-expert GEMMs, the norm of a
    Mamba layer after the first quantizes its in_proj input, and every other W8A8 GEMM (Mamba
    out_proj, the first layer's in_proj, the shared expert's up and down) quantizes on load."""
    moe, mamba = letters.count("E"), letters.count("M")
    norm_quantize = sum(1 for index, letter in enumerate(letters) if letter == "M" and index > 0)
    quant_linear = 2 * moe + 2 * mamba - norm_quantize
    return {"fuse_experts": moe, "fuse_router": moe, "add_rms_norm": len(letters),
            "add_rms_norm_quantize": norm_quantize if activations_quantized else 0,
            "quant_linear": quant_linear if activations_quantized else 0, "quant_grouped_gemm": 0,
            "conv1d_silu": mamba}


def precision_graph(name: str, policy: str) -> Graph:
    chosen = W4A4 if policy == "w4a4" else POLICIES[policy]
    graph = core_graph(name)
    return graph if chosen is None else AssignPrecision(chosen).apply(graph).graph


@pytest.fixture(scope="module", params=sorted(POLICIES))
def policy(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module", params=["hybrid", "latent", "wide_heads"])
def config_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_every_fusion_pass_keeps_every_logit_and_counts_what_the_model_implies(config_name: str,
                                                                               policy: str) -> None:
    check_fusions(config_name, policy)


def test_w4a4_norms_hand_nvfp4_codes_and_keep_every_logit() -> None:
    """Every linear W4A4: each Mamba layer's norm after the first hands its in_proj NVFP4 codes (one
    config: the policy changes only the format the norm rule writes)."""
    assert check_fusions("hybrid", "w4a4") >= 1


def check_fusions(config_name: str, policy: str) -> int:
    """The fusion passes one by one, each checked before/after; returns how many norms quantize."""
    graph = precision_graph(config_name, policy)
    counts: dict[str, int] = {}
    for fusion in FUSION_PASSES:
        output, result = check_pass(fusion, graph, decode_pass=SpecializeDecode())
        # the fused references compose the same core references in the same order: bit-identical
        assert result.max_abs_diff == 0.0, f"{fusion.name} changed the logits by {result.max_abs_diff}"
        assert fusion.apply(output.graph).counts == dict.fromkeys(output.counts, 0)  # a fixed point
        counts.update(output.counts)
        graph = output.graph
    expected = implied(pattern(config_name), policy in ("w4a4_w8a8", "w4a4"))
    print(f"{config_name} {policy}: {counts}")
    assert counts == expected
    assert fusions_in(graph) == expected  # what inspect reads from an engine's graph
    left = graph.op_counts()
    assert not {"moe_router", "moe_dispatch", "grouped_gemm", "moe_combine", "quantize"} & set(left)
    assert left.get("rms_norm") == 1  # layer 0's norm reads the embedding: no residual add to fuse
    # a norm that quantizes hands its GEMM codes: E4M3 for W8A8, packed E2M1 + block scales for W4A4
    codes = {"w4a4_w8a8": "fp8e4m3", "w4a4": "nvfp4codes"}.get(policy)
    norms = [op for op in graph.ops if op.opname == "add_rms_norm" and op.attrs.get("act_format") is not None]
    assert [op.results[0].type.dtype.name for op in norms] == [codes] * len(norms)
    for norm in norms:
        (reader,) = graph.users(norm.results[0].name)
        assert reader.opname == "quant_linear" and reader.operands[2] == norm.operands[3]  # the same input_scale
    return len(norms)


def test_fused_ops_have_reference_kernels_that_select_kernels_records() -> None:
    graph = precision_graph("hybrid", "w4a4_w8a8")
    for fusion in FUSION_PASSES:
        graph = fusion.apply(graph).graph
    fused_ops = {"moe_route", "moe_expert_up", "moe_expert_down", "add_rms_norm", "quant_linear"}
    assert fused_ops <= set(graph.op_counts())
    for name in fused_ops | {"quant_grouped_gemm"}:
        assert candidates(name)[0].name == REFERENCE
    output, result = check_pass(SelectKernels("sm_100"), graph, decode_pass=SpecializeDecode())
    assert all(op.attrs.get("kernel") for op in output.graph.ops if op.opname in fused_ops)
    assert result.max_abs_diff == 0.0


def _random_route(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=generator)
    router = torch.randn(experts, 32, generator=generator)
    bias = torch.zeros(experts)
    bias[experts - 1] = -100.0  # the correction bias keeps the last expert from being chosen: no rows
    return x, router, bias


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_fused_moe_references_are_the_core_composition(tokens: int) -> None:
    experts, top_k = 4, 2
    x, router, bias = _random_route(tokens, experts, top_k, seed=tokens)
    attrs = {"top_k": top_k, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5}
    weights, ids, offsets, order = fused.moe_route(x, router, bias, num_experts=experts, **attrs)  # type: ignore[arg-type]
    core_weights, core_ids = moe_router(x, router, bias, **attrs)  # type: ignore[arg-type]
    x_sorted, core_offsets, core_order = moe_dispatch(x, core_ids, experts)
    assert torch.equal(weights, core_weights) and torch.equal(ids, core_ids)
    assert torch.equal(offsets, core_offsets) and torch.equal(order, core_order)
    assert offsets[-1] - offsets[-2] == 0  # an expert with no tokens
    generator = torch.Generator().manual_seed(7)
    up_float = torch.randn(experts, 16, 32, generator=generator) * 0.2
    down_float = torch.randn(experts, 32, 16, generator=generator) * 0.2
    up = _stacked_nvfp4(up_float)
    down = _stacked_nvfp4(down_float)
    scale_up, scale_down = torch.full((experts,), 0.01), torch.full((experts,), 0.002)
    hidden = fused.moe_expert_up(x, order, offsets, up, scale_up, top_k=top_k, activation_kind="relu2",
                                 act_format="nvfp4", out_dtype=torch.float32)
    expected_hidden = relu2(quant_grouped_gemm(quantize(x_sorted, "nvfp4", scale_up, offsets), offsets, up,
                                               torch.float32))
    assert torch.equal(hidden, expected_hidden)
    out = fused.moe_expert_down(hidden, order, offsets, down, weights, scale_down, act_format="nvfp4",
                                out_dtype=torch.float32)
    y = quant_grouped_gemm(quantize(expected_hidden, "nvfp4", scale_down, offsets), offsets, down, torch.float32)
    assert torch.equal(out, moe_combine(y, order, weights, tokens))


def test_add_rms_norm_reference_is_add_then_norm_then_quantize() -> None:
    generator = torch.Generator().manual_seed(3)
    x, residual = torch.randn(2, 3, 32, generator=generator), torch.randn(2, 3, 32, generator=generator)
    weight, scale = torch.rand(32, generator=generator) + 0.5, torch.tensor(0.003)
    codes, residual_out = fused.add_rms_norm(x, residual, weight, scale, eps=1e-5, act_format="fp8")
    assert torch.equal(residual_out, residual + x)
    # FP8: the norm writes E4M3 codes; times the scale they are the `quantize` op's values, bit for bit
    values = quantize(rms_norm(residual + x, weight, 1e-5), "fp8", scale)
    assert codes.dtype == torch.float8_e4m3fn and torch.equal(codes.float() * scale, values)
    assert values.abs().max() == 448 * scale  # the scale is small enough that some values saturate
    # and the quant_linear after it reads the codes as those values
    w = torch.randn(8, 32, generator=generator)
    assert torch.equal(fused.quant_linear_on_load(codes, w, scale, None, act_format="fp8", out_dtype=torch.float32),
                       fused.linear_any(values, w, None, torch.float32))


def test_add_rms_norm_nvfp4_codes_are_the_quantize_values() -> None:
    """NVFP4: the norm writes packed E2M1 codes and E4M3 block scales under input_scale (an
    NVFP4Tensor); dequantized they are the `quantize` op's values bit for bit, and the quant_linear
    after it reads them as those values."""
    generator = torch.Generator().manual_seed(4)
    x, residual = torch.randn(2, 3, 64, generator=generator), torch.randn(2, 3, 64, generator=generator)
    x[0, 0] = -residual[0, 0]  # a zero row: its blocks get scale 1.0 and code 0
    weight = torch.rand(64, generator=generator) + 0.5
    for scale in (torch.tensor(2.5 / 2688), torch.tensor(0.3 / 2688)):  # the second saturates blocks
        codes, residual_out = fused.add_rms_norm(x, residual, weight, scale, eps=1e-5, act_format="nvfp4")
        assert isinstance(codes, NVFP4Tensor) and torch.equal(residual_out, residual + x)
        assert codes.packed.shape == (2, 3, 32) and codes.block_scale.shape == (2, 3, 4)
        assert codes.global_scale is not scale and torch.equal(codes.global_scale, scale)
        values = quantize(rms_norm(residual + x, weight, 1e-5), "nvfp4", scale)
        dequantized = dequantize_nvfp4(codes)
        assert torch.equal(dequantized.view(torch.int32), values.view(torch.int32))  # signs of zero too
        assert torch.equal(codes.block_scale[0, 0].float(), torch.ones(4))
        w = torch.randn(8, 64, generator=generator)
        assert torch.equal(fused.quant_linear_on_load(codes, w, scale, None, act_format="nvfp4",
                                                      out_dtype=torch.float32),
                           fused.linear_any(values, w, None, torch.float32))


def _stacked_nvfp4(weights: torch.Tensor) -> fused.WeightValue:
    from nemocompile.runtime.formats import NVFP4Tensor

    parts = [quantize_nvfp4(w) for w in weights]
    return NVFP4Tensor(torch.stack([p.packed for p in parts]), torch.stack([p.block_scale for p in parts]),
                       torch.stack([p.global_scale for p in parts]))


GOLDEN_FUSED_MOE = """
%7, %6 = add_rms_norm(%5, %3, %layers.2.norm, _) {eps = 1e-05} : tensor<bf16, [batch, seq, 16]>, tensor<bf16, [batch, seq, 16]> scope "layers.2.norm" by "fuse_add_rms_norm"
%31, %32, %34, %35 = moe_route(%7, %layers.2.mixer.router, %layers.2.mixer.router_bias) {n_group = 1, norm_topk_prob = true, num_experts = 4, routed_scaling_factor = 1.0, top_k = 2, topk_group = 1} : tensor<f32, [batch, seq, 2]>, tensor<i64, [batch, seq, 2]>, tensor<i64, [5]>, tensor<i64, [routed]> scope "layers.2.mixer" by "fuse_router"
%45 = moe_expert_up(%7, %35, %34, %layers.2.mixer.experts_up, _) {activation = "relu2", top_k = 2} : tensor<bf16, [routed, 8]> scope "layers.2.mixer" by "fuse_experts"
%39 = moe_expert_down(%45, %35, %34, %layers.2.mixer.experts_down, %31, _) {top_k = 2} : tensor<bf16, [batch, seq, 16]> scope "layers.2.mixer" by "fuse_experts"
%40 = linear(%7, %layers.2.mixer.shared_up, _) : tensor<bf16, [batch, seq, 12]> scope "layers.2.mixer" by "decompose"
"""


def test_golden_text_of_a_fused_moe_layer_round_trips() -> None:
    from test_ir_text import TINY

    from nemocompile.graph.config import config_from_dict
    from nemocompile.graph.nemotron_h import build_block_graph
    from nemocompile.graph.text import parse_graph, print_graph
    from nemocompile.graph.types import BF16
    from nemocompile.passes.decompose import Decompose

    graph = Decompose().apply(build_block_graph(config_from_dict(TINY), BF16)).graph
    for fusion in FUSION_PASSES:
        graph = fusion.apply(graph).graph
    text = print_graph(graph)
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("%")]
    golden = GOLDEN_FUSED_MOE.strip().splitlines()
    start = lines.index(golden[0])
    assert lines[start:start + len(golden)] == golden
    assert parse_graph(text) == graph
