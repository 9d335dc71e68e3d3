"""Bad inputs of the precision path: non-finite weights, quantized checkpoints whose tensors or
config do not fit, precision options and policy files that make no sense. Each is refused by the
CLI with a non-zero exit and one `error:` line naming the tensor, file or option at fault, and by
the API with the matching exception; no engine is left at OUT. An all-zero weight is not bad
input: it quantizes to exact zeros and the engine runs.

The checkpoint is a tiny transformers NemotronH whose MLP has an input dim of 40 (not a multiple
of 16), so NVFP4 cannot take it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

import nemocompile
from nemocompile.base.errors import CheckpointError, NemocompileError, UsageError
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.runtime.formats import (
    FP8Tensor,
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_nvfp4,
)

WEIGHTS_FILE = "weights/rank0.safetensors"
EXPERTS = 4
CONFIG: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=40, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    chunk_size=4, conv_kernel=4, n_routed_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, dtype="float32",
)
EXPERT_UP = "backbone.layers.2.mixer.experts.{}.up_proj"
QUANTIZED_EXPERTS = [f"backbone.layers.2.mixer.experts.{e}.{p}" for e in range(EXPERTS) for p in ("up_proj", "down_proj")]
NOT_EXPERTS = ["lm_head", "backbone.layers.0.*", "backbone.layers.1.*", "backbone.layers.3.*",
               "backbone.layers.2.mixer.shared_experts*"]


# ---------------------------------------------------------------------------------------------
# helpers


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def assert_one_line_error(result: Result, *names: str) -> str:
    assert result.exit_code != 0, f"expected a refusal, got exit 0: {result.output[:300]}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def assert_nothing_at(out: Path) -> None:
    assert not out.exists() and not out.is_symlink(), f"{out} was left behind"
    assert sorted(p.name for p in out.parent.glob(f".{out.name}.*")) == []  # no staging directory either


def refused_by_cli(model: Path | None, out: Path, *extra: str | Path, names: Sequence[str],
                   error: type[NemocompileError], target: str = "b200") -> str:
    result = invoke("build", *([model] if model else []), "--target", target, "-o", out, *extra)
    line = assert_one_line_error(result, *names)
    assert result.exit_code == error.exit_code
    assert_nothing_at(out)
    return line


def refused_by_api(model: Path | None, out: Path, names: Sequence[str], error: type[NemocompileError],
                   target: str = "b200", **options: Any) -> str:
    with pytest.raises(error) as caught:
        nemocompile.build(model, out, target=target, **options)
    message = str(caught.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    assert_nothing_at(out)
    return message


def variant(source: Path, directory: Path, edit: Callable[[dict[str, torch.Tensor]], None],
            quant_config: dict[str, Any] | None = None) -> Path:
    """A copy of `source` with its tensors edited (and an hf_quant_config.json when given)."""
    shutil.copytree(source, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if quant_config is not None:
        wrapped = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": quant_config}
        (directory / "hf_quant_config.json").write_text(json.dumps(wrapped, indent=2))
    return directory


def quantize_experts(tensors: dict[str, torch.Tensor]) -> None:
    """The routed experts as ModelOpt's NVFP4 export stores them."""
    store_as_nvfp4(tensors, QUANTIZED_EXPERTS)


def store_as_nvfp4(tensors: dict[str, torch.Tensor], modules: Sequence[str]) -> None:
    """`modules` (weight names without `.weight`) as ModelOpt's NVFP4 export stores them."""
    for module in modules:
        nvfp4 = quantize_nvfp4(tensors.pop(f"{module}.weight").clone())
        tensors[f"{module}.weight"] = nvfp4.packed
        tensors[f"{module}.weight_scale"] = nvfp4.block_scale
        tensors[f"{module}.weight_scale_2"] = nvfp4.global_scale
        tensors[f"{module}.input_scale"] = torch.tensor(0.01)


def nvfp4_experts_config(algo: str = "NVFP4") -> dict[str, Any]:
    return {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": NOT_EXPERTS}


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers", reason="the checkpoint is saved by NemotronHForCausalLM")
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG))
    with torch.no_grad():  # non-trivial routing: the default router weights are zeros
        model.model.layers[2].mixer.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    directory = tmp_path_factory.mktemp("bad-precision") / "tiny"
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def modelopt_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return variant(checkpoint, tmp_path_factory.mktemp("modelopt") / "nvfp4-experts", quantize_experts,
                   nvfp4_experts_config())


@pytest.fixture(scope="session")
def zeros(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Engines of a checkpoint with an all-zero routed expert (NVFP4) and shared expert (FP8)."""
    root = tmp_path_factory.mktemp("zeros")

    def zero(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{EXPERT_UP.format(1)}.weight"].zero_()
        tensors["backbone.layers.2.mixer.shared_experts.up_proj.weight"].zero_()

    source = variant(checkpoint, root / "zeroed", zero)
    engines = {}
    for target in ("h100", "b200"):
        nemocompile.build(source, root / target, target=target)
        engines[target] = root / target
    return engines


def test_the_untouched_checkpoints_build(checkpoint: Path, modelopt_checkpoint: Path, tmp_path: Path) -> None:
    """The refusals below are caused by the one thing each test breaks."""
    for model, target in ((checkpoint, "b200"), (modelopt_checkpoint, "b200"), (modelopt_checkpoint, "h100")):
        out = tmp_path / f"{model.name}-{target}"
        result = invoke("build", model, "--target", target, "-o", out)
        assert result.exit_code == 0, result.output
        assert (out / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------
# non-finite and all-zero weights


@pytest.mark.parametrize("value", [float("nan"), float("-inf")], ids=["nan", "-inf"])
def test_non_finite_routed_expert_is_named(value: float, checkpoint: Path, tmp_path: Path) -> None:
    """Expert 2 of 4 holds the bad value: the message names its tensor, not the stack's first one."""
    tensor = f"{EXPERT_UP.format(2)}.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[tensor][3, 5] = value

    model = variant(checkpoint, tmp_path / "poisoned", poison)
    line = refused_by_cli(model, tmp_path / "cli", names=[tensor, "NaN or Inf"], error=CheckpointError)
    assert EXPERT_UP.format(0) not in line
    refused_by_api(model, tmp_path / "api", names=[tensor], error=CheckpointError, target="h100")


@pytest.mark.parametrize("tensor", ["backbone.layers.1.mixer.q_proj.weight",             # bf16 copy
                                    "backbone.layers.2.mixer.shared_experts.down_proj.weight"])  # FP8 W8A8
def test_nan_in_a_weight_is_named(tensor: str, checkpoint: Path, tmp_path: Path) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[tensor][0, 1] = float("nan")

    model = variant(checkpoint, tmp_path / "poisoned", poison)
    refused_by_cli(model, tmp_path / "cli", names=[tensor, "NaN"], error=CheckpointError)
    refused_by_api(model, tmp_path / "api", names=[tensor], error=CheckpointError, target="h100")


def test_inf_in_a_weight_is_named(checkpoint: Path, tmp_path: Path) -> None:
    tensor = "backbone.layers.0.mixer.in_proj.weight"  # FP8 W8A8 on both targets

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[tensor][7, 3] = float("inf")

    model = variant(checkpoint, tmp_path / "poisoned", poison)
    refused_by_cli(model, tmp_path / "cli", names=[tensor, "Inf"], error=CheckpointError, target="h100")
    refused_by_api(model, tmp_path / "api", names=[tensor], error=CheckpointError)


def test_inf_in_a_weight_quantized_in_runs_of_rows_is_named(checkpoint: Path, tmp_path: Path) -> None:
    """A weight larger than io_chunk_bytes is quantized a run of rows at a time, after one pass for its
    largest magnitude: that pass finds the Inf in its last row."""
    tensor = "backbone.layers.0.mixer.in_proj.weight"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[tensor][-1, 3] = float("-inf")

    model = variant(checkpoint, tmp_path / "poisoned", poison)
    with override(io_chunk_bytes=256):
        refused_by_api(model, tmp_path / "api", names=[tensor, "NaN or Inf"], error=CheckpointError)


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_all_zero_weights_dequantize_to_exact_zeros(zeros: dict[str, Path], target: str) -> None:
    tensors = load_file(str(zeros[target] / WEIGHTS_FILE))
    experts = NVFP4Tensor(tensors["layers.2.mixer.experts_up"], tensors["layers.2.mixer.experts_up.weight_scale"],
                          tensors["layers.2.mixer.experts_up.weight_scale_2"])
    up = dequantize_nvfp4(experts)
    assert torch.equal(up[1], torch.zeros_like(up[1])) and not bool(torch.signbit(up[1]).any())
    assert bool((up[0] != 0).any())  # the other experts are untouched
    assert float(experts.global_scale[1]) > 0 and bool(torch.isfinite(experts.global_scale).all())
    shared = FP8Tensor(tensors["layers.2.mixer.shared_up"], tensors["layers.2.mixer.shared_up.weight_scale"])
    assert float(shared.scale) > 0
    assert torch.equal(dequantize_fp8(shared), torch.zeros(shared.shape))


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_engine_with_all_zero_weights_runs(zeros: dict[str, Path], target: str) -> None:
    """The zero shared expert feeds zeros to its down projection: calibration sees amax 0 there,
    which must still give a usable (positive) activation scale, as ModelOpt's export substitutes."""
    tensors = load_file(str(zeros[target] / WEIGHTS_FILE))
    scale = tensors["layers.2.mixer.shared_down.input_scale"]
    assert float(scale) > 0, f"shared_down.input_scale is {float(scale)}: the W8A8 GEMM would divide by it"
    logits = nemocompile.load(zeros[target]).forward([[1, 2, 3, 4, 5, 6]])
    assert bool(torch.isfinite(logits).all())


# ---------------------------------------------------------------------------------------------
# quantized checkpoints that do not fit


def test_weight_scale_of_the_wrong_shape_is_named(checkpoint: Path, tmp_path: Path) -> None:
    tensor = f"{EXPERT_UP.format(1)}.weight_scale"

    def misshape(tensors: dict[str, torch.Tensor]) -> None:
        quantize_experts(tensors)
        tensors[tensor] = tensors[tensor][:, :1].contiguous()  # [16, 1]: one block scale per row, not two

    model = variant(checkpoint, tmp_path / "misshapen", misshape, nvfp4_experts_config())
    line = refused_by_cli(model, tmp_path / "cli", names=[tensor, "[16, 1]", "[16, 2]"], error=CheckpointError)
    assert EXPERT_UP.format(0) not in line  # only the bad tensor
    refused_by_api(model, tmp_path / "api", names=[tensor], error=CheckpointError, target="h100")


def test_weight_scale_of_the_wrong_dtype_is_named(checkpoint: Path, tmp_path: Path) -> None:
    tensor = f"{EXPERT_UP.format(3)}.weight_scale"

    def retype(tensors: dict[str, torch.Tensor]) -> None:
        quantize_experts(tensors)
        tensors[tensor] = tensors[tensor].float()

    model = variant(checkpoint, tmp_path / "retyped", retype, nvfp4_experts_config())
    refused_by_cli(model, tmp_path / "cli", names=[tensor], error=CheckpointError)


def test_nvfp4_module_with_an_indivisible_input_dim_is_named(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint that claims NVFP4 for the MLP down projection (input dim 40)."""
    module = "backbone.layers.3.mixer.down_proj"
    config = nvfp4_experts_config()
    config["exclude_modules"] = [m for m in NOT_EXPERTS if m != "backbone.layers.3.*"] + [
        "backbone.layers.3.mixer.up_proj"]
    model = variant(checkpoint, tmp_path / "indivisible", quantize_experts, config)
    refused_by_cli(model, tmp_path / "cli", names=[module, "16"], error=CheckpointError)
    refused_by_api(model, tmp_path / "api", names=[module], error=CheckpointError)


def test_unsupported_quant_algo_lists_the_supported_ones(modelopt_checkpoint: Path, tmp_path: Path) -> None:
    model = shutil.copytree(modelopt_checkpoint, tmp_path / "awq")
    (model / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.47.0"},
         "quantization": {"quant_algo": "INT4_AWQ", "group_size": 128, "exclude_modules": ["lm_head"]}}))
    names = ["hf_quant_config.json", "INT4_AWQ", "NVFP4", "FP8", "MIXED_PRECISION"]
    refused_by_cli(model, tmp_path / "cli", names=names, error=CheckpointError)
    refused_by_api(model, tmp_path / "api", names=names, error=CheckpointError)


def test_unsupported_quant_algo_of_one_mixed_layer_is_named(modelopt_checkpoint: Path, tmp_path: Path) -> None:
    model = shutil.copytree(modelopt_checkpoint, tmp_path / "mixed")
    layers: dict[str, Any] = {m: {"quant_algo": "NVFP4", "group_size": 16} for m in QUANTIZED_EXPERTS}
    layers["backbone.layers.0.mixer.in_proj"] = {"quant_algo": "W4A8_AWQ"}
    (model / "hf_quant_config.json").write_text(json.dumps(
        {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers}}))
    refused_by_cli(model, tmp_path / "cli", names=["backbone.layers.0.mixer.in_proj", "W4A8_AWQ", "NVFP4"],
                   error=CheckpointError)


def test_quant_config_that_is_not_json_is_named(modelopt_checkpoint: Path, tmp_path: Path) -> None:
    model = shutil.copytree(modelopt_checkpoint, tmp_path / "garbled")
    (model / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "NVFP4",')
    refused_by_cli(model, tmp_path / "cli", names=["hf_quant_config.json", "JSON"], error=CheckpointError)


# ---------------------------------------------------------------------------------------------
# precision options and policy files


def test_indivisible_input_dim_is_kept_wider_and_said(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = invoke("build", checkpoint, "--target", "b200", "-o", out, "--override", "mlp=nvfp4")
    assert result.exit_code == 0, result.output
    text = (out / "graph.txt").read_text()
    assert "weight %layers.3.mixer.up_proj : tensor<nvfp4, [40, 32]>" in text
    assert "weight %layers.3.mixer.down_proj : tensor<bf16, [32, 40]>" in text
    report = (out / "report.md").read_text()
    notes = report.split("## Notes", 1)[1].split("\n## ", 1)[0]
    assert "layers.3.mixer.down_proj" in notes and "40" in notes and "16" in notes


def test_indivisible_input_dim_is_refused_when_the_policy_says_so(checkpoint: Path, tmp_path: Path) -> None:
    policy = tmp_path / "refuse.toml"
    policy.write_text('on_indivisible = "refuse"\n\n[components]\nmlp = "nvfp4"\n')
    names = ["layers.3.mixer.down_proj", "40", "16"]
    refused_by_cli(checkpoint, tmp_path / "cli", "--policy", policy, names=names, error=UsageError)
    refused_by_api(checkpoint, tmp_path / "api", names=names, error=UsageError, policy_file=policy)


def test_unknown_override_component_is_named(checkpoint: Path, tmp_path: Path) -> None:
    line = refused_by_cli(checkpoint, tmp_path / "cli", "--override", "experts=fp8",
                          names=["--override", "'experts'", "routed_experts"], error=UsageError)
    assert "unknown component" in line
    refused_by_api(checkpoint, tmp_path / "api", names=["experts"], error=UsageError, overrides=["experts=fp8"])


def test_unknown_override_precision_is_named(checkpoint: Path, tmp_path: Path) -> None:
    refused_by_cli(checkpoint, tmp_path / "cli", "--override", "routed_experts=int3",
                   names=["--override", "'int3'", "nvfp4"], error=UsageError)


@pytest.mark.parametrize("text, names", [
    ("[components\nmlp = 1\n", ["not valid TOML"]),
    ("bass = \"bf16\"\n", ["unknown key 'bass'"]),
    ("on_indivisible = \"sometimes\"\n", ["on_indivisible", "'sometimes'"]),
    ("[components]\nrouted_experts = \"int3\"\n", ["'int3'"]),
    ("[components]\nexperts = \"fp8\"\n", ["'experts'"]),
    ("base = \"fp8\"\n", ["base", "'fp8'"]),
], ids=["syntax", "unknown-key", "on-indivisible", "precision", "component", "base"])
def test_malformed_policy_file_is_named(text: str, names: list[str], checkpoint: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    refused_by_cli(checkpoint, tmp_path / "cli", "--policy", policy, names=[str(policy), *names], error=UsageError)
    refused_by_api(checkpoint, tmp_path / "api", names=[str(policy)], error=UsageError, policy_file=policy)


def test_missing_policy_file_is_named(checkpoint: Path, tmp_path: Path) -> None:
    policy = tmp_path / "nowhere.toml"
    refused_by_cli(checkpoint, tmp_path / "cli", "--policy", policy, names=[str(policy), "does not exist"],
                   error=UsageError)
