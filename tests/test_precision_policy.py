"""Precision policy resolution and the assign_precision pass: target policies, overrides, TOML
policy files, excludes, refusals with the alternative named, and what the pass rewrites."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemocompile.base.errors import TargetError, UsageError
from nemocompile.driver import pipeline
from nemocompile.graph.config import config_from_dict, load_config
from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.text import parse_graph, print_graph
from nemocompile.graph.types import BF16
from nemocompile.options import BuildOptions
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.manager import PassManager, PassRecord
from nemocompile.passes.precision_policy import resolve_policy
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.planner import plan_model
from nemocompile.targets import load_target

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
if not MODELS.exists():
    MODELS = Path("/work/shared/models")

TINY = {
    "model_type": "nemotron_h", "hybrid_override_pattern": "M*E-", "vocab_size": 64, "hidden_size": 32,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 40,
    "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 8, "conv_kernel": 4,
    "chunk_size": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 24,
}


def _assigned(target: str) -> tuple[Graph, PassRecord]:
    policy = resolve_policy(load_target(target))
    graph, records = PassManager([SetPrecision(policy.base), Decompose(), AssignPrecision(policy)]).run(
        build_block_graph(config_from_dict(TINY), BF16))
    return graph, records[-1]


def test_target_policies_follow_design_table() -> None:
    b200 = resolve_policy(load_target("b200"))
    h100 = resolve_policy(load_target("h100"))
    assert b200.components["routed_experts"] == "nvfp4_w4a4"
    assert h100.components["routed_experts"] == "nvfp4_w4a16"
    for policy in (b200, h100):
        assert policy.components["shared_experts"] == "fp8_e4m3_w8a8"
        assert policy.components["mamba_linears"] == "fp8_e4m3_w8a8"
        assert policy.components["attention"] == "bf16"
        assert policy.components["router"] == "fp32"


def test_w4a4_on_hopper_is_refused_naming_w4a16() -> None:
    with pytest.raises(TargetError, match="routed_experts=nvfp4_w4a16"):
        resolve_policy(load_target("h100"), overrides=["routed_experts=nvfp4_w4a4"])


def test_override_and_alias() -> None:
    policy = resolve_policy(load_target("h100"), overrides=["routed_experts=fp8"])
    assert policy.components["routed_experts"] == "fp8_e4m3_w8a8"


@pytest.mark.parametrize("override, message", [
    ("experts=fp8", "unknown component 'experts'"),
    ("routed_experts=int3", "unknown precision 'int3'"),
    ("embeddings=fp8", "embeddings can only be bf16 or fp32"),
    ("routed_experts", "component=precision"),
])
def test_bad_overrides_are_refused(override: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_policy(load_target("b200"), overrides=[override])


def test_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('exclude = ["layers.0.*"]\n[components]\nrouted_experts = "w4a16"\nattention = "fp8"\n')
    policy = resolve_policy(load_target("b200"), policy_file=path)
    assert policy.components["routed_experts"] == "nvfp4_w4a16"
    assert policy.components["attention"] == "fp8_e4m3_w8a8"
    assert policy.excluded("layers.0.mixer.in_proj") and not policy.excluded("layers.1.mixer.in_proj")
    path.write_text("[components\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        resolve_policy(load_target("b200"), policy_file=path)


def test_assign_precision_rewrites_gemms_and_counts() -> None:
    graph, record = _assigned("b200")
    weights = graph.weight_map()
    assert weights["layers.2.mixer.experts_up"].type.dtype.name == "nvfp4"
    assert weights["layers.0.mixer.in_proj"].type.dtype.name == "fp8"
    assert weights["layers.1.mixer.q_proj"].type.dtype.name == "bf16"
    assert weights["layers.2.mixer.router"].type.dtype.name == "f32"
    assert record.counts == {"grouped_gemm_nvfp4": 2, "act_nvfp4": 2, "linear_fp8": 4,
                             "act_fp8": 4}
    text = print_graph(graph)
    assert '{format = "nvfp4"} : tensor<nvfp4, [routed, 32]>' in text and "tensor<nvfp4, [4, 16, 32]>" in text
    assert parse_graph(text) == graph


def test_w4a16_has_no_activation_scales() -> None:
    graph, record = _assigned("h100")
    assert record.counts["act_nvfp4"] == 0 and record.counts["grouped_gemm_nvfp4"] == 2
    scales = [w.name for w in graph.weights if w.category == "activation_scales"]
    assert all("experts" not in name for name in scales) and scales


def test_exclude_and_indivisible_input_dim_are_kept_and_said() -> None:
    config = dict(TINY, intermediate_size=40)
    policy = resolve_policy(load_target("b200"), overrides=["mlp=nvfp4"], exclude=["layers.0.*"])
    graph, records = PassManager([SetPrecision("bf16"), Decompose(), AssignPrecision(policy)]).run(
        build_block_graph(config_from_dict(config), BF16))
    weights = graph.weight_map()
    assert weights["layers.0.mixer.in_proj"].type.dtype.name == "bf16"  # excluded
    assert weights["layers.3.mixer.down_proj"].type.dtype.name == "bf16"  # in = 40, not a multiple of 16
    assert weights["layers.3.mixer.up_proj"].type.dtype.name == "nvfp4"
    assert any("layers.3.mixer.down_proj" in note and "16" in note for note in records[-1].notes)
    refuse = resolve_policy(load_target("b200"), overrides=["mlp=nvfp4"])
    with pytest.raises(UsageError, match=r"layers\.3\.mixer\.down_proj has input dim 40"):
        AssignPrecision(type(refuse)(refuse.base, refuse.components, (), "refuse")).apply(
            Decompose().apply(build_block_graph(config_from_dict(config), BF16)).graph)


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_ultra_plan_matches_the_released_mix(target: str) -> None:
    result = plan_model(MODELS / "ultra.json", BuildOptions(target=target, world_size=8, max_batch_size=1,
                                                            max_context=1 << 20))
    # released NVFP4 mixed-precision checkpoint: about 352 GB, 5.03 bits per element (MTP included)
    assert abs(result.stats.bytes_total / 1e9 - 352) < 3
    assert abs(result.stats.bits_per_element - 5.03) < 0.03
    # replicated routers, norms and KV heads: every rank holds at least an eighth
    assert result.memory.weights_bytes * 8 >= result.stats.bytes_total
    assert result.fits and result.bytes_per_gpu < 80e9  # one million tokens at batch 1 on 8 GPUs


def test_bf16_plan_is_sixteen_bits() -> None:
    config, _ = load_config(MODELS / "nano.json")
    result = plan_model(MODELS / "nano.json", BuildOptions(precision="bf16"))
    assert 16 <= result.stats.bits_per_element < 16.1
    assert config.num_layers == 52


def test_float_components_follow_the_base_and_mixed_floats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "fp32.toml"
    path.write_text('base = "fp32"\n')
    policy = resolve_policy(load_target("b200"), policy_file=path)
    assert policy.components["attention"] == "fp32" and policy.components["kv_cache"] == "fp32"
    assert policy.components["routed_experts"] == "nvfp4_w4a4"  # quantized choices stay
    with pytest.raises(UsageError, match="attention=fp32 differs from the float base bf16"):
        resolve_policy(load_target("b200"), overrides=["attention=fp32"])
    with pytest.raises(UsageError, match="fp16 is an ssm_state option"):
        resolve_policy(load_target("b200"), overrides=["attention=fp16"])


def test_fp16_ssm_state_is_applied_to_the_state_slots() -> None:
    policy = resolve_policy(load_target("h100"), overrides=["ssm_state=fp16"])
    graph, _ = PassManager(pipeline(load_target("h100"), policy)).run(build_block_graph(config_from_dict(TINY), BF16))
    kinds = {slot.kind: slot.type.dtype.name for slot in graph.states}
    assert kinds == {"conv": "bf16", "ssm": "f16", "kv": "bf16"}


def test_four_over_six_policy_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("nvfp4_four_over_six = true\n")
    assert resolve_policy(load_target("b200"), policy_file=path).nvfp4_four_over_six
    assert not resolve_policy(load_target("b200")).nvfp4_four_over_six
    path.write_text('nvfp4_four_over_six = "yes"\n')
    with pytest.raises(UsageError, match="nvfp4_four_over_six must be true or false"):
        resolve_policy(load_target("b200"), policy_file=path)


def test_four_over_six_build_lowers_nvfp4_error(tmp_path: Path) -> None:
    import nemocompile

    policy = tmp_path / "policy.toml"
    policy.write_text("nvfp4_four_over_six = true\n")
    plain = nemocompile.build(None, tmp_path / "plain", target="h100")
    four_six = nemocompile.build(None, tmp_path / "four-six", target="h100", policy_file=policy)
    assert four_six.manifest.policy.nvfp4_four_over_six is True
    plain_err = {e.weight: e.sqnr_db for e in plain.errors if e.format == "nvfp4"}
    four_six_err = {e.weight: e.sqnr_db for e in four_six.errors if e.format == "nvfp4"}
    assert plain_err.keys() == four_six_err.keys() and plain_err
    assert all(four_six_err[w] > plain_err[w] for w in plain_err)  # each block picks the better of 6 and 4
    fp8 = {e.weight: e.sqnr_db for e in four_six.errors if e.format == "fp8"}
    assert fp8 == {e.weight: e.sqnr_db for e in plain.errors if e.format == "fp8"}  # FP8 untouched
