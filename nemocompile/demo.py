"""The embedded demo model: a small Nemotron-H with all four block kinds (Mamba2, attention, a
latent MoE with grouped routing, a dense MLP) and a byte tokenizer, trained to continue a few
paragraphs of the project's own prose (demo_data/demo_text.txt) by tools/train_demo.py, which
wrote its weights to demo_data/model.safetensors. A build writes it as an ordinary Hugging Face
checkpoint, so it takes the same import path as any."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nemocompile.runtime.tokenizer import ByteTokenizer

DEMO_NAME = "nemotron-h-demo"
DEMO_SEED = 20261129  # seeds the training (tools/train_demo.py)
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_TEXT = DEMO_DATA / "demo_text.txt"  # the project-written text the demo was trained on
DEMO_WEIGHTS = DEMO_DATA / "model.safetensors"  # written by tools/train_demo.py


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


def write_demo_checkpoint(directory: Path) -> Path:
    """Write the demo checkpoint (config.json, model.safetensors, tokenizer.json): the trained weights
    shipped with the package, as tools/train_demo.py wrote them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(demo_config(), indent=2, sort_keys=True) + "\n")
    shutil.copyfile(DEMO_WEIGHTS, directory / "model.safetensors")
    (directory / "tokenizer.json").write_text(ByteTokenizer().to_json())
    return directory
