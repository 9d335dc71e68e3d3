"""The memory plan per GPU (nemocompile/memory_plan.py): its numbers against values computed by
hand from a tiny config, its refusal of a build that does not fit, and the consistency of the
largest batch and context it reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nemocompile.base.errors import TargetError
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.graph.config import config_from_dict
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.types import BF16
from nemocompile.memory_plan import BLOCK_WORKSPACE, MemoryPlan, check_fits, plan_memory
from nemocompile.memory_plan_split import Parallelism
from nemocompile.options import BuildOptions
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.fuse_norms import FuseAddRmsNorm
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.planner import plan_model
from nemocompile.targets import load_target

MODELS = Path("/work/shared/models") if Path("/work/shared/models").is_dir() else \
    Path(__file__).resolve().parents[2] / "shared" / "models"

# One block of each kind: Mamba (4 heads of 8, 2 groups, state 16), attention (4 query heads, 2 KV
# heads of 8), MoE (8 experts, top 2) and a dense MLP; hidden 32, vocabulary 64.
TINY = {
    "model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "M*E-",
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 24,
    "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 16, "conv_kernel": 4,
    "chunk_size": 8, "expand": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 16, "use_conv_bias": True, "use_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
# bf16 bytes of each category, counted by hand from TINY (the router is fp32)
WORLD_1 = {
    "embeddings": 64 * 32 * 2, "lm_head": 64 * 32 * 2,
    "attention": (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32) * 2,
    # in_proj rows: z 32 + x 32 + B, C 2 x 2 x 16 + dt 4 = 132
    "mamba_in_proj": 132 * 32 * 2, "mamba_out_proj": 32 * 32 * 2,
    "conv1d": (96 * 4 + 96) * 2, "mamba_ssm": 3 * 4 * 2,
    "norms": (4 * 32 + 32 + 32) * 2,  # four layer norms, norm_f, the Mamba gated norm
    "router": (8 * 32 + 8) * 4, "routed_experts": 2 * 8 * 16 * 32 * 2, "shared_experts": 2 * 16 * 32 * 2,
    "mlp": 2 * 24 * 32 * 2,
}
# on 4 ranks: 1 query head, 1 KV head (2 KV heads < 4 ranks: replicated), 1 Mamba head, 1 group,
# 2 experts; routers and layer norms replicated
WORLD_4 = {
    "embeddings": 16 * 32 * 2, "lm_head": 16 * 32 * 2,
    "attention": (8 * 32 + 8 * 32 + 8 * 32 + 32 * 8) * 2,
    "mamba_in_proj": (8 + 8 + 2 * 16 + 1) * 32 * 2, "mamba_out_proj": 32 * 8 * 2,
    "conv1d": (40 * 4 + 40) * 2, "mamba_ssm": 3 * 1 * 2,
    "norms": (5 * 32 + 8) * 2,
    "router": (8 * 32 + 8) * 4, "routed_experts": 2 * 2 * 16 * 32 * 2, "shared_experts": 2 * 4 * 32 * 2,
    "mlp": 2 * 6 * 32 * 2,
}


def tiny_plan(world: int, batch: int = 2, context: int = 100, target: str = "h100") -> MemoryPlan:
    config = config_from_dict(TINY)
    graph = SetPrecision("bf16").apply(build_block_graph(config, BF16, bounds=(batch, context))).graph
    return plan_memory("tiny", graph, config, load_target(target), Parallelism(world, world), (batch, context))


@pytest.mark.parametrize(("world", "expected"), [(1, WORLD_1), (4, WORLD_4)])
def test_weights_per_rank_are_the_hand_counted_bytes(world: int, expected: dict[str, int]) -> None:
    assert dict(tiny_plan(world).weights) == expected


def test_state_per_token_and_per_sequence_are_the_hand_counted_bytes() -> None:
    one, four = tiny_plan(1), tiny_plan(4)
    # one attention layer: keys and values of 2 KV heads of 8 in bf16; on 4 ranks one head each
    assert (one.kv_bytes_per_token, four.kv_bytes_per_token) == (2 * 2 * 8 * 2, 2 * 1 * 8 * 2)
    # one Mamba layer: a conv window of 3 over 96 channels (bf16), an fp32 SSM state of 4 x 8 x 16
    assert (one.conv_state_bytes_per_sequence, one.ssm_bytes_per_sequence) == (96 * 3 * 2, 4 * 8 * 16 * 4)
    assert (four.conv_state_bytes_per_sequence, four.ssm_bytes_per_sequence) == (40 * 3 * 2, 1 * 8 * 16 * 4)
    assert one.ssm_state_bytes_per_sequence == 96 * 3 * 2 + 4 * 8 * 16 * 4


def test_workspace_communication_and_total_are_the_hand_counted_bytes() -> None:
    with override(plan_step_tokens=16, plan_runtime_reserve_bytes=1000, plan_nccl_bytes=500):
        one, four = tiny_plan(1), tiny_plan(4)
    tokens = 16  # min(max(16 tokens a step, batch 2), 2 x 100)
    assert one.step_tokens(2, 100) == tokens and one.step_tokens(2, 3) == 6
    # the Mamba block is the largest: quantized input, in_proj out, conv out, 16/8 + 2 chunk
    # states of 4 x 8 x 16 fp32, SSD output and gated norm
    mamba = tokens * 32 + tokens * 132 * 2 + tokens * 96 * 2 + 4 * 4 * 8 * 16 * 4 + 2 * tokens * 32 * 2
    residual = 3 * tokens * 32 * 2
    assert sum(one.workspace(2, 100).values()) == residual + mamba
    assert one.communication(2, 100) == {}
    assert four.communication(2, 100) == {
        "NCCL channel buffers": 500,
        "tensor-parallel all-reduce of a block output": tokens * 32 * 2,
        "logits all-gather (fp32)": 2 * 64 * 4,
        "expert-parallel combine": tokens * 32 * 2,
    }
    assert one.bytes_per_gpu == (sum(WORLD_1.values()) + 2 * 100 * 64 + 2 * (96 * 3 * 2 + 4 * 8 * 16 * 4)
                                 + residual + mamba + 1000)


def test_largest_context_and_batch_are_consistent_with_fits() -> None:
    plan = tiny_plan(1)
    previous = None
    for batch in (1, 2, 7, 64, 1000):
        longest = plan.largest_context(batch)
        assert longest is not None and longest > 0
        assert plan.fits_at(batch, longest) and not plan.fits_at(batch, longest + 1)
        assert previous is None or longest <= previous  # more sequences leave each less context
        previous = longest
    for context in (1, 4096, 1 << 20):
        most = plan.largest_batch(context)
        assert plan.fits_at(most, context) and not plan.fits_at(most + 1, context)
    # bytes grow with batch and context; past one step's tokens only the KV cache grows with the context
    assert plan.bytes_at(1, 1000) - plan.bytes_at(1, 999) > plan.kv_bytes_per_token
    assert plan.bytes_at(1, 20000) - plan.bytes_at(1, 19999) == plan.kv_bytes_per_token
    assert plan.bytes_at(3, 50) > plan.bytes_at(2, 50)


def test_a_plan_past_the_memory_is_refused_in_one_sentence_naming_what_fits() -> None:
    plan = tiny_plan(1, batch=256, context=1 << 30)
    assert not plan.fits
    with pytest.raises(TargetError) as refused:
        check_fits(plan)
    message = str(refused.value)
    longest = plan.largest_context(256)
    assert message.startswith("tiny does not fit h100 at world size 1: the memory plan at --max-batch-size 256 and "
                              "--max-context 1073741824 needs")
    assert f"--max-context {longest} at this batch" in message and "\n" not in message
    check_fits(tiny_plan(1, batch=256, context=longest))  # the context it names fits


def test_build_refuses_a_plan_that_does_not_fit_before_calibration_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    with override():
        result = CliRunner().invoke(main, ["build", "--target", "h100", "-o", str(out), "--max-context",
                                           "1000000000"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: nemotron-h-demo does not fit h100 at world size 1: the memory plan")
    assert "--max-context 2407792 at this batch" in result.stderr and result.stderr.count("\n") == 1
    assert "[calibration]" not in result.stderr and list(tmp_path.iterdir()) == []


def _plan_json(*args: str) -> dict[str, Any]:
    with override():
        result = CliRunner().invoke(main, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_ultra_on_eight_gpus_holds_a_million_tokens_at_batch_one(target: str) -> None:
    plan = _plan_json(str(MODELS / "ultra.json"), "--target", target, "--world-size", "8", "--max-batch-size", "1",
                      "--max-context", str(1 << 20))
    # 12 attention layers x K and V x one KV head per rank (2 heads over 8 ranks) x 128 x bf16
    assert plan["kv_bytes_per_token"] == 12 * 2 * 1 * 128 * 2
    # 48 Mamba layers x (fp32 SSM state of 32 heads x 64 x 128 + a bf16 conv window of 3 x (2048 + 2 x 128))
    assert plan["ssm_state_bytes_per_sequence"] == 48 * (32 * 64 * 128 * 4 + 3 * (32 * 64 + 2 * 128) * 2)
    assert plan["fits"] is True and plan["max_context_at_batch_1"] >= 1 << 20
    memory = plan["memory_plan"]
    assert plan["bytes_per_gpu"] == sum(memory[key] for key in ("weights_bytes", "kv_cache_bytes", "mamba_state_bytes",
                                                                 "workspace_bytes", "communication_bytes",
                                                                 "reserve_bytes"))
    assert memory["kv_cache_bytes"] == (1 << 20) * plan["kv_bytes_per_token"]
    # 512 experts over 8 ranks: an eighth of the routed experts; the fp32 routers on every rank
    assert memory["weights_by_category"]["routed_experts"] * 8 == plan["categories"]["routed_experts"]["bytes"]
    assert memory["weights_by_category"]["router"] == plan["categories"]["router"]["bytes"]


def test_plan_fits_is_the_full_plan_not_the_weights() -> None:
    # Ultra's weights fit on 8 H100s, but 256 sequences of 131072 tokens do not
    plan = _plan_json(str(MODELS / "ultra.json"), "--world-size", "8", "--max-batch-size", "256",
                      "--max-context", "131072")
    assert plan["weights_bytes_per_gpu"] < plan["gpu_memory_bytes"] < plan["bytes_per_gpu"]
    assert plan["fits"] is False and plan["bounds"]["chosen_automatically"] == []
    result = plan_model(MODELS / "ultra.json", BuildOptions(world_size=8, max_batch_size=256, max_context=131072))
    assert result.memory.largest_batch(131072) == plan["memory_plan"]["max_batch_at_max_context"] > 0


def test_docs_table_is_what_the_planner_prints() -> None:
    from nemocompile.memory_plan_table import memory_plan_table

    text = (Path(__file__).resolve().parents[1] / "docs" / "memory-plan.md").read_text()
    table = text.split("<!-- memory-plan-table -->\n", 1)[1].split("<!-- end memory-plan-table -->", 1)[0]
    assert table == memory_plan_table(MODELS), "docs/memory-plan.md is stale: python bench/bench_memory_plan.py"


def test_a_norm_handing_nvfp4_codes_plans_their_real_bytes() -> None:
    """W4A4 Mamba and MLP linears: the norm of the Mamba layer (layer 1) hands its in_proj NVFP4 codes
    with E4M3 block scales, 0.5 + 1/16 byte per element, not the FP8-sized bound; layer 0's MLP has
    no norm to fuse (it reads the embedding) and keeps no quantized copy."""
    config = config_from_dict({**TINY, "hybrid_override_pattern": "-M*E"})
    graph = SetPrecision("bf16").apply(build_block_graph(config, BF16, bounds=(2, 100))).graph
    w4a4 = PrecisionPolicy("bf16", {"mamba_linears": "nvfp4_w4a4", "mlp": "nvfp4_w4a4"})
    for step in (Decompose(), AssignPrecision(w4a4), FuseAddRmsNorm()):
        graph = step.apply(graph).graph
    assert [op.results[0].type.dtype.name for op in graph.ops if op.opname == "add_rms_norm"
            and op.attrs.get("act_format")] == ["nvfp4codes"]
    with override(plan_step_tokens=16):
        plan = plan_memory("tiny", graph, config, load_target("b200"), Parallelism(1, 1), (2, 100))
    assert dict(plan.norm_codes_bytes) == {"mamba": 0.5 + 1 / 16}
    tokens = 16
    assert plan.workspace(2, 100)["mamba: quantized input"] == tokens * 32 * 9 // 16  # 288, not 512 (FP8-sized)
    assert BLOCK_WORKSPACE["mlp"](config, Parallelism(1, 1), tokens, 2, 2, 0.5625) == {
        "quantized input": tokens * 32 * 9 // 16, "mlp hidden": tokens * 24 * 2}
    assert BLOCK_WORKSPACE["mlp"](config, Parallelism(1, 1), tokens, 2, 2, None) == {"mlp hidden": tokens * 24 * 2}
