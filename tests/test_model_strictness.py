"""Models that are not silently wrong: every config.json key is classified (implemented, no effect
at inference, or changing the numerics and refused unless at its no-op value), a misspelled key
is refused with a suggestion, unknown keys are listed, and every checkpoint tensor is either used,
carried (MTP), known to be unused (skipped and named in report.md), or refused by name.
Oracles: transformers' NemotronHConfig (its fields) and NemotronHForCausalLM (its parameters)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import assert_one_line_error, edit_config, invoke

from nemocompile.base.errors import ConfigError
from nemocompile.graph.config import (
    CONFIG_FIELDS,
    IMPLEMENTED,
    LEGACY_NAMES,
    NO_EFFECT,
    REFUSED,
    config_from_dict,
)
from nemocompile.graph.importer import UNUSED_AT_INFERENCE, import_checkpoint
from nemocompile.planner import plan_model

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' NemotronH")

MODELS = Path("/work/shared/models")
TINY: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    chunk_size=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24, moe_latent_size=16, dtype="float32",
)
BIAS_FLAGS = {"mlp_bias": dict(mlp_bias=True), "use_bias": dict(use_bias=True),
              "both": dict(mlp_bias=True, use_bias=True)}


def _save(directory: Path, **fields: Any) -> Path:
    torch.manual_seed(0)
    transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**{**TINY, **fields})).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def bias_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("ckpt") / "tiny-bias", mlp_bias=True, use_bias=True)


def _copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def _saved_config(checkpoint: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((checkpoint / "config.json").read_text())
    return raw


def _build(checkpoint: Path, out: Path, *extra: str) -> Any:
    return invoke("build", checkpoint, "--target", "h100", "--precision", "fp32", "-o", out, *extra)


# ---------------------------------------------------------------- the one table of config keys


def test_every_transformers_config_field_is_classified() -> None:
    fields = {f.name for f in dataclasses.fields(transformers.NemotronHConfig)}
    standard = set(transformers.PretrainedConfig().to_dict())
    known = set(CONFIG_FIELDS) | set(LEGACY_NAMES)
    assert fields - known == set()
    assert standard - known == set()
    assert {rule.status for rule in CONFIG_FIELDS.values()} == {IMPLEMENTED, NO_EFFECT, REFUSED}
    for name, rule in CONFIG_FIELDS.items():
        if rule.status == REFUSED:
            assert rule.no_op and rule.why, name
        if rule.status == NO_EFFECT:
            assert rule.why, name
    # the defaults transformers writes are the no-op values of every refused field
    saved = transformers.NemotronHConfig(**TINY).to_dict()
    assert all(name in saved for name, rule in CONFIG_FIELDS.items() if rule.status == REFUSED and name in fields)


def test_saved_and_released_configs_load_without_unknown_keys(checkpoint: Path) -> None:
    assert config_from_dict(_saved_config(checkpoint)).unknown_keys == ()
    for path in sorted(MODELS.glob("*.json")):
        raw = json.loads(path.read_text())
        assert config_from_dict(raw, path.name).unknown_keys == (), path.name


def test_transformers_aliases_and_legacy_spellings_are_honoured(checkpoint: Path) -> None:
    raw = _saved_config(checkpoint)
    alias = {k: v for k, v in raw.items() if k not in ("n_routed_experts", "layers_block_type")}
    alias.update(num_local_experts=raw["n_routed_experts"], layer_types=raw["layers_block_type"])
    assert config_from_dict(alias) == config_from_dict(raw)
    # transformers would take the legacy spelling over the current one: two values are refused
    with pytest.raises(ConfigError, match=r"'mamba_n_groups' .* 'n_groups'"):
        config_from_dict({**raw, "mamba_n_groups": raw["n_groups"] * 2})


def test_defaults_are_transformers_defaults(checkpoint: Path) -> None:
    omitted = ("head_dim", "num_key_value_heads")
    raw = {k: v for k, v in _saved_config(checkpoint).items() if k not in omitted}
    raw["num_attention_heads"] = 16
    reference = transformers.NemotronHConfig(**{**{k: v for k, v in TINY.items() if k not in omitted},
                                                "num_attention_heads": 16})
    config = config_from_dict(raw)
    assert (config.head_dim, config.num_key_value_heads) == (reference.head_dim, reference.num_key_value_heads)


@pytest.mark.parametrize("field,value", [("residual_in_fp32", True), ("n_shared_experts", 2),
                                         ("sliding_window", 64), ("time_step_limit", [0.0, 0.1]),
                                         ("mamba_dt_limit", [0.01, 1.0])])
def test_unimplemented_numerics_field_is_refused_naming_it(checkpoint: Path, field: str, value: Any) -> None:
    raw = _saved_config(checkpoint)
    if field in LEGACY_NAMES:  # an older spelling alone follows the rule of the field it names
        raw.pop(LEGACY_NAMES[field])
    with pytest.raises(ConfigError, match=re.escape(f"'{field}' is {json.dumps(value)}, which")):
        config_from_dict({**raw, field: value})


def test_unimplemented_numerics_field_is_refused_by_the_cli(checkpoint: Path, tmp_path: Path) -> None:
    model = _copy(checkpoint, tmp_path / "fp32-residual")
    edit_config(model, lambda c: c.update(residual_in_fp32=True))
    out = tmp_path / "engine"
    assert_one_line_error(_build(model, out), "residual_in_fp32", "true")
    assert not out.exists()
    assert_one_line_error(invoke("plan", model / "config.json"), "residual_in_fp32")


# ---------------------------------------------------------------- misspelled and unknown keys


def test_misspelled_key_is_refused_with_a_suggestion(checkpoint: Path, tmp_path: Path) -> None:
    model = _copy(checkpoint, tmp_path / "typo")
    edit_config(model, lambda c: c.update(routed_scaling_fator=2.5))
    out = tmp_path / "engine"
    assert_one_line_error(_build(model, out), "'routed_scaling_fator'", "did you mean 'routed_scaling_factor'?")
    assert not out.exists()


def test_misspelled_size_is_refused_by_plan(tmp_path: Path) -> None:
    raw = json.loads((MODELS / "nano.json").read_text())
    raw["moe_intermediate_sise"] = raw.pop("moe_intermediate_size")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    assert_one_line_error(invoke("plan", config, "--json"), "did you mean 'moe_intermediate_size'?")


def test_unknown_keys_are_kept_and_listed(checkpoint: Path, tmp_path: Path) -> None:
    model = _copy(checkpoint, tmp_path / "notes")
    edit_config(model, lambda c: c.update(fine_tuned_by="someone", release_notes_url="https://example.com"))
    result = invoke("plan", model / "config.json", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["unknown_config_keys"] == ["fine_tuned_by", "release_notes_url"]
    out = tmp_path / "engine"
    assert _build(model, out).exit_code == 0
    report = (out / "report.md").read_text()
    assert "`fine_tuned_by`, `release_notes_url`" in report
    assert json.loads((out / "config.json").read_text())["fine_tuned_by"] == "someone"


# ---------------------------------------------------------------- checkpoint tensors


def _add_tensors(model: Path, extra: dict[str, torch.Tensor]) -> None:
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, **extra}, str(path), metadata={"format": "pt"})


def test_extra_tensors_are_refused_naming_all(checkpoint: Path, tmp_path: Path) -> None:
    model = _copy(checkpoint, tmp_path / "extra")
    extra = {"backbone.layers.1.mixer.q_proj.bias": torch.zeros(32), "backbone.adapter.weight": torch.zeros(4, 4)}
    _add_tensors(model, extra)
    out = tmp_path / "engine"
    assert_one_line_error(_build(model, out), "2 tensor(s)", *extra)
    assert not out.exists()


def test_bias_tensors_and_bias_flags_must_agree(bias_checkpoint: Path, tmp_path: Path) -> None:
    biases = sorted(name for name in load_file(str(bias_checkpoint / "model.safetensors"))
                    if name.endswith(".bias") and not name.endswith("conv1d.bias"))
    model = _copy(bias_checkpoint, tmp_path / "flags-off")
    edit_config(model, lambda c: c.update(mlp_bias=False, use_bias=False))
    assert_one_line_error(_build(model, tmp_path / "engine"), *biases)
    # the other way round: the flag asks for biases the checkpoint does not hold
    model = _copy(bias_checkpoint, tmp_path / "tensors-off")
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if k not in biases}, str(path), metadata={"format": "pt"})
    assert_one_line_error(_build(model, tmp_path / "engine"), *(f"{name} is missing" for name in biases[:3]))


def test_known_unused_tensors_are_skipped_and_named_in_the_report(checkpoint: Path, tmp_path: Path) -> None:
    model = _copy(checkpoint, tmp_path / "kv-scales")
    scales = {"backbone.layers.1.mixer.k_proj.k_scale": torch.tensor(0.5),
              "backbone.layers.1.mixer.v_proj.v_scale": torch.tensor(0.25)}
    assert all(any(name.endswith(p.lstrip("*")) for p in UNUSED_AT_INFERENCE) for name in scales)
    _add_tensors(model, {**scales, "mtp.layers.0.enorm.weight": torch.ones(32)})
    imported = import_checkpoint(model)
    assert imported.skipped_tensors == tuple(sorted(scales))
    assert not any(w.name in scales for w in imported.graph.weights)
    assert any(w.name == "mtp.layers.0.enorm.weight" for w in imported.graph.weights)  # MTP still carried
    imported.checkpoint.close()
    out = tmp_path / "engine"
    result = _build(model, out)
    assert result.exit_code == 0, result.stderr
    report = (out / "report.md").read_text()
    for name in scales:
        assert f"`{name}`: a ModelOpt FP8 KV-cache scale, but the quantization config declares no" in report


# ---------------------------------------------------------------- bias parameters are counted


@pytest.mark.parametrize("case", list(BIAS_FLAGS))
def test_plan_counts_every_parameter_transformers_holds(case: str, tmp_path: Path) -> None:
    config = transformers.NemotronHConfig(**{**TINY, **BIAS_FLAGS[case]})
    model = transformers.NemotronHForCausalLM(config)
    # the router's e_score_correction_bias is a buffer in transformers, a weight here
    expected = sum(t.numel() for t in model.state_dict().values())
    config.save_pretrained(tmp_path)
    stats = plan_model(tmp_path / "config.json").stats
    assert stats.params_total == expected
    bias_params = sum(p.numel() for name, p in model.named_parameters()
                      if name.endswith(".bias") and "conv1d" not in name)
    without = transformers.NemotronHConfig(**TINY)
    (tmp_path / "plain").mkdir()
    without.save_pretrained(tmp_path / "plain")
    assert stats.params_total - plan_model(tmp_path / "plain" / "config.json").stats.params_total == bias_params > 0
