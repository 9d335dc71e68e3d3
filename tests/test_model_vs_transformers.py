"""The whole model against Hugging Face transformers' NemotronHForCausalLM on random tiny
configs saved with save_pretrained: prefill logits, token-by-token decode logits, and greedy
generation, in fp32 (tight) and bf16 (stated tolerance)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import nemocompile
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


def _make_pair(tmp: Path, name: str, shard: bool = False) -> Pair:
    torch.manual_seed(1234)
    config = transformers.NemotronHConfig(**BASE, **CASES[name], dtype="float32")
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


def test_prefill_logits_match(pair: Pair) -> None:
    ids = _prompt()
    with torch.no_grad():
        expected = pair.model(ids).logits
    got = pair.engine.forward(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert _relative(got, expected) <= FP32_TOLERANCE


def test_token_by_token_decode_matches_transformers_decode(pair: Pair) -> None:
    ids = _prompt()
    split = 5
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
    assert _relative(torch.cat(ours, 1), torch.cat(theirs, 1)) <= FP32_TOLERANCE


def test_decode_continues_prefill_exactly(pair: Pair) -> None:
    """Our own decode steps reproduce our full-sequence prefill (state carried correctly)."""
    ids = _prompt(batch=2, length=11, seed=8)
    full = pair.engine.forward(ids)
    cache = pair.engine.new_cache(2)
    steps = [pair.engine.forward(ids[:, :1], cache)] + [pair.engine.forward(ids[:, t:t + 1], cache)
                                                        for t in range(1, 11)]
    assert _relative(torch.cat(steps, 1), full) <= FP32_TOLERANCE


def test_sixteen_greedy_tokens_identical(pair: Pair) -> None:
    ids = _prompt()
    with torch.no_grad():
        # no EOS on either side: 16 tokens each, whatever they are
        expected = pair.model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = pair.engine.generate(ids, max_new_tokens=16)
    assert got.shape == (3, ids.shape[1] + 16)
    assert torch.equal(got, expected)


def test_bf16_engine_within_stated_tolerance(pair: Pair, tmp_path: Path) -> None:
    nemocompile.build(pair.checkpoint, tmp_path / "bf16", target="h100", precision="bf16")
    engine = nemocompile.load(tmp_path / "bf16")
    model = transformers.NemotronHForCausalLM.from_pretrained(pair.checkpoint, dtype=torch.bfloat16).eval()
    ids = _prompt()
    with torch.no_grad():
        expected = model(ids).logits
    assert _relative(engine.forward(ids), expected) <= BF16_TOLERANCE
    # against the fp32 truth, the bf16 engine is no worse than transformers' own bf16 model
    with torch.no_grad():
        truth = pair.model(ids).logits
    assert _relative(engine.forward(ids), truth) <= 1.5 * _relative(expected, truth) + 1e-3
