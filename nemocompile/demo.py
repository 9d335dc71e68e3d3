"""The embedded demo model: a small Nemotron-H with all four block kinds (Mamba2, attention, a
latent MoE with grouped routing, a dense MLP), seeded weights made here, and a byte tokenizer.
It is written as an ordinary Hugging Face checkpoint so it takes the same import path as any."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nemocompile.runtime.tokenizer import ByteTokenizer

DEMO_NAME = "nemotron-h-demo"
DEMO_SEED = 20261129


def demo_config() -> dict[str, Any]:
    tokenizer = ByteTokenizer()
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": 64,
        "hybrid_override_pattern": "M*EM-E",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "mlp_hidden_act": "relu2",
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "n_groups": 2,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "chunk_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 48,
        "moe_shared_expert_intermediate_size": 96,
        "moe_latent_size": 32,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "layer_norm_epsilon": 1e-5,
        "use_conv_bias": True,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "bfloat16",
    }


def _demo_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, heads: int) -> torch.Tensor:
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        return torch.ones(shape)
    if leaf == "A_log":
        return torch.log(torch.arange(1, heads + 1, dtype=torch.float32))
    if leaf == "D":
        return torch.ones(shape)
    if leaf == "dt_bias":
        dt = torch.exp(torch.rand(shape, generator=generator) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if leaf in ("e_score_correction_bias", "bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * 0.05


def write_demo_checkpoint(directory: Path) -> Path:
    """Write the demo checkpoint (config.json, model.safetensors, tokenizer.json); deterministic."""
    from nemocompile.graph.config import config_from_dict
    from nemocompile.graph.nemotron_h import model_weights

    raw = demo_config()
    config = config_from_dict(raw, "demo config")
    generator = torch.Generator().manual_seed(DEMO_SEED)
    tensors: dict[str, torch.Tensor] = {}
    for spec in model_weights(config):
        shape = spec.shape[1:] if len(spec.tensors) > 1 else spec.shape
        for name in spec.tensors:
            value = _demo_tensor(name, shape, generator, config.mamba_num_heads)
            tensors[name] = value.float() if spec.keep_fp32 else value.to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "tokenizer.json").write_text(ByteTokenizer().to_json())
    return directory
