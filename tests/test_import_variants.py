"""Checkpoint variants the importer takes as released: MTP tensors carried and counted, FP16 and
BF16 weights, legacy config spellings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nemocompile
from nemocompile.graph.config import config_from_dict
from nemocompile.graph.importer import import_checkpoint
from nemocompile.graph.ir import Graph
from nemocompile.inspection import inspect_engine

transformers = pytest.importorskip("transformers", reason="checkpoints are made by NemotronHForCausalLM")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
        n_groups=2, ssm_state_size=8, chunk_size=4, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, dtype="float32")
    directory = tmp_path_factory.mktemp("ckpt")
    transformers.NemotronHForCausalLM(config).save_pretrained(directory)
    return directory


def _copy_with(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, str(target / "model.safetensors"))
    return target


def test_mtp_tensors_are_carried_and_counted(checkpoint: Path, tmp_path: Path) -> None:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    mtp = {"mtp.layers.0.eh_proj.weight": torch.randn(32, 64), "mtp.layers.0.enorm.weight": torch.ones(32)}
    source = _copy_with(checkpoint, tmp_path / "with-mtp", {**tensors, **mtp})
    imported = import_checkpoint(source)
    assert {w.name for w in imported.graph.weights if w.category == "mtp"} == set(mtp)
    nemocompile.build(source, tmp_path / "engine", precision="fp32")
    info = inspect_engine(tmp_path / "engine")
    assert info.stats.params_mtp == 32 * 64 + 32
    assert info.stats.params_total == imported_params_without_mtp(imported.graph)
    with safe_open(str(tmp_path / "engine" / "weights" / "rank0.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("mtp.layers.0.eh_proj.weight"), mtp["mtp.layers.0.eh_proj.weight"])
    # carried, not executed: the engine still runs
    logits = nemocompile.load(tmp_path / "engine").forward([[1, 2, 3]])
    assert logits.shape == (1, 3, 64)


def imported_params_without_mtp(graph: Graph) -> int:
    return sum(w.type.numel() for w in graph.weights if w.category != "mtp")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_build_and_agree(checkpoint: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    halved = {name: t if "gate." in name else t.to(dtype) for name, t in tensors.items()}
    source = _copy_with(checkpoint, tmp_path / "half", halved)
    nemocompile.build(source, tmp_path / "half-engine", precision="fp32")
    nemocompile.build(checkpoint, tmp_path / "full-engine", precision="fp32")
    ids = [[5, 6, 7, 8, 9]]
    half = nemocompile.load(tmp_path / "half-engine").forward(ids)
    full = nemocompile.load(tmp_path / "full-engine").forward(ids)
    relative = float((half - full).abs().max() / full.abs().max())
    assert 0 < relative < 2e-2  # only the weights were rounded


def test_legacy_and_list_config_spellings_agree(checkpoint: Path) -> None:
    raw = json.loads((checkpoint / "config.json").read_text())
    from_list = config_from_dict(raw)
    legacy = {k: v for k, v in raw.items() if k not in ("layers_block_type", "n_groups", "conv_kernel")}
    legacy.update(hybrid_override_pattern="M*E-", mamba_n_groups=raw["n_groups"], mamba_d_conv=raw["conv_kernel"])
    assert config_from_dict(legacy) == from_list
    assert from_list.pattern == "M*E-"
