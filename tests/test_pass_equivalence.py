"""Every pass, on random tiny configs, through the before/after check of tests/passcheck.py:
random weights and tokens, prefill then decode with state, logits within the pass's tolerance;
and each pass's rewrite counts."""

from __future__ import annotations

from typing import Any

import pytest
from passcheck import ACTIVATION_QUANT, BF16, STRUCTURAL, check_pass

from nemocompile.graph.config import ModelConfig, config_from_dict
from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.types import F32
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.passes.select_kernels import SelectKernels
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.passes.specialize_decode import SpecializeDecode

CONFIGS: dict[str, dict[str, Any]] = {
    "hybrid": {"hybrid_override_pattern": "M*EM-E"},
    "latent": {"hybrid_override_pattern": "ME*E", "moe_latent_size": 16, "n_groups": 1},
    "wide_heads": {"hybrid_override_pattern": "*M-E", "num_attention_heads": 8, "num_key_value_heads": 8,
                   "mamba_num_heads": 8, "mamba_head_dim": 2, "n_routed_experts": 8, "num_experts_per_tok": 3},
}


def config(name: str) -> ModelConfig:
    raw: dict[str, Any] = {
        "model_type": "nemotron_h", "vocab_size": 48, "hidden_size": 32,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32,
        "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 8, "conv_kernel": 4,
        "chunk_size": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 32, "routed_scaling_factor": 2.5,
        **CONFIGS[name],
    }
    return config_from_dict(raw)


def block_graph(name: str) -> Graph:
    return build_block_graph(config(name), F32)


def core_graph(name: str) -> Graph:
    return Decompose().apply(block_graph(name)).graph


def pattern(name: str) -> str:
    return str(CONFIGS[name]["hybrid_override_pattern"])


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_set_precision_to_the_same_precision_is_exact(name: str) -> None:
    output, result = check_pass(SetPrecision("fp32"), block_graph(name))
    assert output.counts == {"weights_retyped": 0}
    assert result.max_abs_diff == 0.0


def test_set_precision_to_bf16_stays_within_the_bf16_bound(name: str) -> None:
    graph = block_graph(name)
    output, result = check_pass(SetPrecision("bf16"), graph, rel_rms=BF16)
    assert output.counts == {"weights_retyped": sum(w.category != "router" for w in graph.weights)}
    assert result.max_abs_diff > 0  # bf16 changed something: the check compared two computations


def test_decompose_is_the_meaning_of_the_blocks(name: str) -> None:
    # The graph before runs each block by its composite reference: the same core ops, so exact.
    output, result = check_pass(Decompose(), block_graph(name))
    kinds = {"M": "mamba2_mixer", "*": "attention", "E": "moe", "-": "mlp"}
    expected: dict[str, int] = {}
    for letter in pattern(name):
        expected[kinds[letter]] = expected.get(kinds[letter], 0) + 1
    assert output.counts == expected
    assert result.max_abs_diff == 0.0


def test_specialize_decode_steps_match_the_chunked_scan(name: str) -> None:
    output, _ = check_pass(SpecializeDecode(), core_graph(name), decode_only=True, tolerance=STRUCTURAL)
    assert output.counts == {"ssd_state_update": pattern(name).count("M")}


WEIGHT_ONLY = PrecisionPolicy("fp32", {"routed_experts": "nvfp4_w4a16", "shared_experts": "fp8_e4m3",
                                       "mamba_linears": "fp8_e4m3"})
WITH_ACTIVATIONS = PrecisionPolicy("fp32", {"routed_experts": "nvfp4_w4a4", "shared_experts": "fp8_e4m3_w8a8",
                                            "mamba_linears": "fp8_e4m3_w8a8"})


def _gemm_counts(name: str) -> tuple[int, int]:
    """(grouped GEMMs of routed experts, FP8 linears: shared up/down per MoE, in/out per Mamba)"""
    letters = pattern(name)
    return 2 * letters.count("E"), 2 * letters.count("E") + 2 * letters.count("M")


def test_assign_precision_weight_only_is_the_dequantized_model(name: str) -> None:
    output, result = check_pass(AssignPrecision(WEIGHT_ONLY), core_graph(name), tolerance=STRUCTURAL)
    experts, linears = _gemm_counts(name)
    assert output.counts == {"act_nvfp4": 0, "act_fp8": 0, "grouped_gemm_nvfp4": experts, "linear_fp8": linears}
    assert "quantize" not in output.graph.op_counts()
    assert result.max_abs_diff == 0.0  # the same fp32 products of the same dequantized values


def test_assign_precision_with_activation_quantization_stays_within_its_bound(name: str) -> None:
    output, result = check_pass(AssignPrecision(WITH_ACTIVATIONS), core_graph(name), rel_rms=ACTIVATION_QUANT)
    experts, linears = _gemm_counts(name)
    assert output.counts == {"act_nvfp4": experts, "act_fp8": linears, "grouped_gemm_nvfp4": experts,
                             "linear_fp8": linears}
    assert output.graph.op_counts()["quantize"] == experts + linears
    assert result.rel_rms > 0  # activations were really quantized


def test_select_kernels_changes_no_number(name: str) -> None:
    graph = AssignPrecision(WITH_ACTIVATIONS).apply(core_graph(name)).graph
    output, result = check_pass(SelectKernels("sm_100"), graph, rel_rms=0.0)
    assert sum(output.counts.values()) == len(graph.ops)
    assert all(op.attrs.get("kernel") for op in output.graph.ops)
    assert result.max_abs_diff == 0.0


def test_a_block_op_runs_as_the_composition_of_its_core_references() -> None:
    # The graph before decompose executes each block op by its composite reference; the same
    # graph decomposed runs the core ops directly: identical logits (exactly).
    graph = block_graph("hybrid")
    assert {op.opname for op in graph.ops} >= {"mamba2_mixer", "attention", "moe", "mlp"}
    _, result = check_pass(Decompose(), graph, total=7, prompt=7)
    assert result.max_abs_diff == 0.0 and result.scale > 0
