"""Engines built from a random tiny transformers NemotronHForCausalLM checkpoint (save_pretrained),
run end to end on the triton backend in Triton's interpreter against backend="reference": fp32 and
bf16 engines, and quantized ones (h100: FP8 W8A8 projections and shared experts, NVFP4 W4A16 routed
experts; b200: the same with NVFP4 W4A4 routed experts). The shapes are multiples of 64 so every op
kind with a Triton kernel gets one on both archs (W4A4 steps K by 64); the test asserts that every
such op ran its kernel, states the logits error, and checks 8 greedy tokens of a mixed-length batch
(right-padded prefill, then decode) are identical.

Tolerance on the logits: 5% of the largest logit (bf16 engines: the fused expert GEMMs round once
where the reference rounds each GEMM output; every other kernel rounds as its reference does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package (the [triton] extra)")
transformers = pytest.importorskip("transformers", reason="the checkpoint is transformers' NemotronHForCausalLM")

import nemocompile  # noqa: E402
from nemocompile.base.settings import override  # noqa: E402

CONFIG: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=16,
    conv_kernel=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
    moe_shared_expert_intermediate_size=64, moe_latent_size=None, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, hybrid_override_pattern="M*EM-E", eos_token_id=2,
)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]  # 19: not a chunk multiple
BUILDS = {"fp32": ("h100", "fp32"), "bf16": ("h100", "bf16"), "h100-quantized": ("h100", None),
          "b200-quantized": ("b200", None)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG, dtype="float32")).eval()
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():  # non-trivial routing and Mamba parameters (the defaults are zeros and ones)
        for layer in model.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.e_score_correction_bias.normal_(0, 0.05, generator=generator)
                layer.mixer.gate.weight.normal_(0, 0.3, generator=generator)
            if hasattr(layer.mixer, "D"):
                layer.mixer.D.uniform_(0.5, 1.5, generator=generator)
            layer.norm.weight.uniform_(0.8, 1.2, generator=generator)
    path = tmp_path_factory.mktemp("tiny-hf") / "checkpoint"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("build", list(BUILDS))
def test_checkpoint_engine_on_triton_matches_reference(checkpoint: Path, build: str,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    target, precision = BUILDS[build]
    out = tmp_path_factory.mktemp("engines") / build
    with override(kernel_cache_dir=str(checkpoint.parent / "kernel-cache")):
        nemocompile.build(checkpoint, out, target=target, **({"precision": precision} if precision else {}))
    reference = nemocompile.load(out, backend="reference")
    triton = nemocompile.load(out, backend="triton")
    resolutions = triton.kernels()
    assert all(r.kernel == r.requested for r in resolutions), [(r.op, r.fallback) for r in resolutions if r.fallback]
    on_triton = {r.op for r in resolutions if r.kernel.startswith("triton_")}
    expected = {"add_rms_norm", "attention_gqa", "causal_conv1d", "gated_rms_norm", "moe_route", "rms_norm",
                "ssd_chunk_scan", "ssd_state_update"}
    if precision is None:  # quantized: the expert GEMMs and the FP8 projections too
        expected |= {"moe_expert_up", "moe_expert_down", "quant_linear"}
    assert expected <= on_triton, expected - on_triton
    ids = torch.tensor([PROMPTS[1][:16], PROMPTS[1][3:19]])
    want, got = reference.forward(ids), triton.forward(ids)
    error, scale = float((want - got).abs().max()), float(want.abs().max())
    print(f"\n{build}: logits max |triton - reference| = {error:.3g} (max |logit| {scale:.3g}, "
          f"{error / scale:.2%})")
    assert error <= 0.05 * scale
    assert reference.complete(PROMPTS, 8) == triton.complete(PROMPTS, 8)
