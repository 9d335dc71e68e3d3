"""The whole model against Hugging Face transformers' NemotronHForCausalLM on random tiny
configs saved with save_pretrained: prefill logits, token-by-token decode logits, and greedy
generation, in fp32 (tight) and bf16 (stated tolerance). The bias flags (mlp_bias, use_bias)
are checked the same way, with random non-zero biases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import nemocompile
from nemocompile.graph.opdef import operand
from nemocompile.runtime.engine import Engine

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' NemotronHForCausalLM")

FP32_TOLERANCE = 1e-4  # max|diff| <= this x max|logits|
# bf16: both sides round every activation to 8 mantissa bits, in different places (e.g. the
# reference casts the fp32 SSD output once, transformers' kernels cast per step), so errors of a
# few bf16 ulps of the largest logit are expected after a handful of layers.
BF16_TOLERANCE = 3e-2

BASE: dict[str, Any] = dict(
    vocab_size=101, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
    intermediate_size=80, mamba_num_heads=6, mamba_head_dim=8, n_groups=3, ssm_state_size=8, chunk_size=8,
    conv_kernel=4, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=40, eos_token_id=2,
)

CASES: dict[str, dict[str, Any]] = {
    # all four block kinds, latent MoE, grouped routing, scaled routing weights
    "latent_grouped": dict(hybrid_override_pattern="M*EM-E", moe_latent_size=24, n_group=4, topk_group=2,
                           routed_scaling_factor=2.5),
    # plain MoE (no latent), one group, attention first, tied embeddings
    "plain_tied": dict(hybrid_override_pattern="*EMM-EM", moe_latent_size=None, n_group=1, topk_group=1,
                       routed_scaling_factor=1.0, tie_word_embeddings=True, norm_topk_prob=False),
}


# transformers' NemotronH: mlp_bias -> dense MLP, shared expert and latent fc1/fc2 biases (routed
# experts have none); use_bias -> Mamba in_proj and out_proj biases.
BIAS_CASES: dict[str, dict[str, Any]] = {
    "mlp_bias": dict(hybrid_override_pattern="M-E*", moe_latent_size=24, n_group=1, topk_group=1, mlp_bias=True),
    "use_bias": dict(hybrid_override_pattern="M*M-", use_bias=True),
    "both_biases": dict(hybrid_override_pattern="ME-*M", moe_latent_size=None, mlp_bias=True, use_bias=True,
                        routed_scaling_factor=2.5),
}


@dataclass
class Pair:
    model: Any  # transformers NemotronHForCausalLM (fp32)
    checkpoint: Path
    engine: Engine


def _randomize(model: Any, generator: torch.Generator) -> None:
    """Make the routing and the Mamba parameters non-trivial (the defaults are zeros and ones)."""
    with torch.no_grad():
        for layer in model.model.layers:
            mixer = layer.mixer
            if hasattr(mixer, "gate"):
                mixer.gate.e_score_correction_bias.normal_(0, 0.05, generator=generator)
                mixer.gate.weight.normal_(0, 0.3, generator=generator)
            if hasattr(mixer, "D"):
                mixer.D.uniform_(0.5, 1.5, generator=generator)
                mixer.norm.weight.uniform_(0.8, 1.2, generator=generator)
            layer.norm.weight.uniform_(0.8, 1.2, generator=generator)
        for module in model.modules():
            # transformers initialises biases to zero, which would hide a missing bias
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5, generator=generator)


def _make_pair(tmp: Path, name: str, shard: bool = False) -> Pair:
    torch.manual_seed(1234)
    config = transformers.NemotronHConfig(**BASE, **{**CASES, **BIAS_CASES}[name], dtype="float32")
    model = transformers.NemotronHForCausalLM(config).eval()
    _randomize(model, torch.Generator().manual_seed(99))
    checkpoint = tmp / f"{name}-ckpt"
    model.save_pretrained(checkpoint, **({"max_shard_size": "30KB"} if shard else {}))
    nemocompile.build(checkpoint, tmp / f"{name}-fp32", target="h100", precision="fp32")
    return Pair(model, checkpoint, nemocompile.load(tmp / f"{name}-fp32"))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return _make_pair(tmp_path_factory.mktemp("hf"), request.param, shard=request.param == "plain_tied")


def _prompt(batch: int = 3, length: int = 13, seed: int = 5) -> torch.Tensor:
    # 13 is not a multiple of chunk_size 8: the scan's last chunk is partial
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max())


def test_sharded_checkpoint_was_sharded(pair: Pair) -> None:
    if (pair.checkpoint / "model.safetensors.index.json").exists():
        assert len(list(pair.checkpoint.glob("*.safetensors"))) > 1


def test_prefill_logits_match(pair: Pair, request: pytest.FixtureRequest) -> None:
    ids = _prompt()
    with torch.no_grad():
        expected = pair.model(ids).logits
    got = pair.engine.forward(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    print(f"\n{request.node.callspec.id}: fp32 prefill relative max|diff| {_relative(got, expected):.2e}")
    assert _relative(got, expected) <= FP32_TOLERANCE


@pytest.fixture(scope="module", params=list(BIAS_CASES))
def bias_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    pair = _make_pair(tmp_path_factory.mktemp("hf-bias"), request.param)
    biases = [name for name, _ in pair.model.named_parameters() if name.endswith(".bias")]
    assert biases, f"{request.param}: transformers built no biases"
    return pair


def _decode_logits(pair: Pair, ids: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers') logits of a prefill of ids[:, :split], then one token per step."""
    cache = pair.engine.new_cache(ids.shape[0])
    ours = [pair.engine.forward(ids[:, :split], cache)]
    hf_cache = None
    with torch.no_grad():
        first = pair.model(ids[:, :split], use_cache=True)
        theirs = [first.logits]
        hf_cache = first.cache
        for t in range(split, ids.shape[1]):
            step = pair.model(ids[:, t:t + 1], cache=hf_cache, use_cache=True)
            hf_cache = step.cache
            theirs.append(step.logits)
            ours.append(pair.engine.forward(ids[:, t:t + 1], cache))
    assert cache.length == ids.shape[1]
    return torch.cat(ours, 1), torch.cat(theirs, 1)


def test_token_by_token_decode_matches_transformers_decode(pair: Pair, request: pytest.FixtureRequest) -> None:
    ours, theirs = _decode_logits(pair, _prompt(), split=5)
    print(f"\n{request.node.callspec.id}: fp32 decode relative max|diff| {_relative(ours, theirs):.2e}")
    assert _relative(ours, theirs) <= FP32_TOLERANCE


def test_decode_continues_prefill_exactly(pair: Pair) -> None:
    """Our own decode steps reproduce our full-sequence prefill (state carried correctly)."""
    ids = _prompt(batch=2, length=11, seed=8)
    full = pair.engine.forward(ids)
    cache = pair.engine.new_cache(2)
    steps = [pair.engine.forward(ids[:, :1], cache)] + [pair.engine.forward(ids[:, t:t + 1], cache)
                                                        for t in range(1, 11)]
    assert _relative(torch.cat(steps, 1), full) <= FP32_TOLERANCE


def _greedy(pair: Pair, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers') 16 greedy tokens after ids."""
    with torch.no_grad():
        # no EOS on either side: 16 tokens each, whatever they are
        expected = pair.model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    return pair.engine.generate(ids, max_new_tokens=16), expected


def test_sixteen_greedy_tokens_identical(pair: Pair) -> None:
    ids = _prompt()
    got, expected = _greedy(pair, ids)
    assert got.shape == (3, ids.shape[1] + 16)
    assert torch.equal(got, expected)


def _check_bf16_engine(pair: Pair, out: Path) -> tuple[float, float]:
    """Build and run a bf16 engine; (its diff from transformers' bf16 model, and from the fp32 truth)."""
    nemocompile.build(pair.checkpoint, out, target="h100", precision="bf16")
    engine = nemocompile.load(out)
    model = transformers.NemotronHForCausalLM.from_pretrained(pair.checkpoint, dtype=torch.bfloat16).eval()
    ids = _prompt()
    with torch.no_grad():
        expected = model(ids).logits
        truth = pair.model(ids).logits
    got = engine.forward(ids)
    assert _relative(got, expected) <= BF16_TOLERANCE
    # against the fp32 truth, the bf16 engine is no worse than transformers' own bf16 model
    assert _relative(got, truth) <= 1.5 * _relative(expected, truth) + 1e-3
    return _relative(got, expected), _relative(got, truth)


def test_bf16_engine_within_stated_tolerance(pair: Pair, tmp_path: Path) -> None:
    _check_bf16_engine(pair, tmp_path / "bf16")


# ---------------------------------------------------------------- bias flags


def test_bias_weights_are_graph_weights(bias_pair: Pair) -> None:
    """Every bias transformers holds reaches the engine as a float weight that a linear op adds."""
    hf_biases = {name for name, _ in bias_pair.model.named_parameters() if name.endswith(".bias")
                 and not name.endswith("conv1d.bias")}
    graph = bias_pair.engine.graph
    used = {op.operands[2] for op in graph.ops if op.opname == "linear" and op.operands[2] is not None}
    assert len(used) == len(hf_biases)
    assert all(graph.weight_map()[name].type.dtype.name == "f32" for name in used)


def test_bias_models_match_transformers_in_fp32(bias_pair: Pair, request: pytest.FixtureRequest) -> None:
    ids = _prompt()
    with torch.no_grad():
        expected = bias_pair.model(ids).logits
    prefill = _relative(bias_pair.engine.forward(ids), expected)
    decode = _relative(*_decode_logits(bias_pair, ids, split=5))
    got, tokens = _greedy(bias_pair, ids)
    print(f"\n{request.node.callspec.id}: fp32 relative max|diff| prefill {prefill:.2e}, decode {decode:.2e}")
    assert prefill <= FP32_TOLERANCE and decode <= FP32_TOLERANCE
    assert torch.equal(got, tokens)


def test_bias_models_build_and_run_in_bf16(bias_pair: Pair, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    against_bf16, against_fp32 = _check_bf16_engine(bias_pair, tmp_path / "bf16")
    print(f"\n{request.node.callspec.id}: bf16 engine vs transformers bf16 {against_bf16:.2e}, "
          f"vs fp32 {against_fp32:.2e}")


def test_bias_models_run_at_h100_auto_precision(bias_pair: Pair, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    """The target's policy (FP8 W8A8 Mamba projections and shared experts, NVFP4 routed experts)
    keeps every bias in the float base, and the quantized GEMMs add it."""
    nemocompile.build(bias_pair.checkpoint, tmp_path / "auto", target="h100")
    engine = nemocompile.load(tmp_path / "auto")
    weights = engine.graph.weight_map()
    # (a W8A8 GEMM after a fused norm is a quant_linear reading the norm's E4M3 codes)
    linears = [op for op in engine.graph.ops if op.opname in ("linear", "quant_linear") and operand(op, "bias")]
    quantized = [op for op in linears if weights[op.operands[1] or ""].type.dtype.quantized]
    assert linears and all(not weights[operand(op, "bias") or ""].type.dtype.quantized for op in linears)
    ids = _prompt()
    with torch.no_grad():
        truth = bias_pair.model(ids).logits
    error = _relative(engine.forward(ids), truth)
    print(f"\n{request.node.callspec.id}: h100 auto engine ({len(quantized)} quantized GEMMs with a bias) "
          f"vs fp32 {error:.2e}")
    # quantization noise is a few percent; a dropped bias costs over 100% (measured 145-198%)
    assert error <= 0.15
