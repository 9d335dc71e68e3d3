"""Finite, valid and bounded (issue 7, items 4-5 and two of item 8's gaps).

- Every tensor the engine stores is checked after its final conversion: ModelOpt scales taken bit
  for bit (NaN/Inf/non-positive `weight_scale_2` and `input_scale`, the E4M3 NaN bytes 0x7F and
  0xFF and negative block scales in `weight_scale`, NaN bytes in FP8 weights), and finite fp32
  values that overflow bf16.
- Nonsense numerics in config.json (a negative or zero epsilon) are refused.
- FP8 and NVFP4 share one zero/denormal rule: a zero amax quantizes to exact zeros, an amax whose
  scale would be a denormal float32 is refused by both.
- Config sizes are bounded (the limits are named in the message), plan mode never builds per-expert
  name lists, calibration batches are made lazily and bounded, and prefill attention takes its
  queries in chunks so its scores never need prompt x prompt memory.
"""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

import nemocompile
from nemocompile.base.errors import CheckpointError, ConfigError, UsageError
from nemocompile.base.settings import override
from nemocompile.calibration import MAX_CALIBRATION_BATCHES, calibration_batches
from nemocompile.cli import main
from nemocompile.graph.config import MAX_EXPERTS, MAX_LAYERS, MAX_MTP_LAYERS, config_from_dict
from nemocompile.graph.nemotron_h import ExpertTensorNames, model_weights
from nemocompile.planner import plan_model
from nemocompile.runtime.formats import (
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8,
    quantize_fp8_stacked,
    quantize_nvfp4,
    quantize_nvfp4_stacked,
)
from nemocompile.runtime.reference import attention as attention_module
from nemocompile.runtime.reference.attention import attention_gqa, attention_gqa_cached
from tests.test_bad_input_precision import store_as_nvfp4, variant

EXPERTS = 4
CONFIG: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    chunk_size=4, conv_kernel=4, n_routed_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, dtype="float32",
)
EXPERT = "backbone.layers.2.mixer.experts.{}.up_proj"
SHARED = "backbone.layers.2.mixer.shared_experts.up_proj"
NORM = "backbone.layers.0.norm.weight"
ROUTED_EXPERTS = [f"backbone.layers.2.mixer.experts.{e}.{p}" for e in range(EXPERTS) for p in ("up_proj", "down_proj")]
# weight-only everywhere but the ModelOpt experts (which bring their input_scale): no calibration
NO_CALIBRATION = ("shared_experts=bf16", "mamba_linears=bf16")


def raw_config(**changes: Any) -> dict[str, Any]:
    return {"model_type": "nemotron_h", **CONFIG, **changes}


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers", reason="the checkpoint is saved by NemotronHForCausalLM")
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG))
    with torch.no_grad():  # non-trivial routing: the default router weights are zeros
        model.model.layers[2].mixer.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    directory = tmp_path_factory.mktemp("numeric") / "tiny"
    model.save_pretrained(directory)
    return directory


def nvfp4_experts(tensors: dict[str, torch.Tensor]) -> None:
    """The routed experts as ModelOpt's NVFP4 export stores them."""
    store_as_nvfp4(tensors, ROUTED_EXPERTS)


def fp8_shared_expert(tensors: dict[str, torch.Tensor]) -> None:
    """The shared expert's up projection as ModelOpt's FP8 export stores it."""
    fp8 = quantize_fp8(tensors.pop(f"{SHARED}.weight").clone())
    tensors[f"{SHARED}.weight"] = fp8.data
    tensors[f"{SHARED}.weight_scale"] = fp8.scale
    tensors[f"{SHARED}.input_scale"] = torch.tensor(0.01)


NVFP4_CONFIG = {"quant_algo": "NVFP4", "group_size": 16,
                "exclude_modules": ["lm_head", "backbone.layers.0.*", "backbone.layers.1.*", "backbone.layers.3.*",
                                    "backbone.layers.2.mixer.shared_experts*"]}
FP8_CONFIG = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {SHARED: {"quant_algo": "FP8"}}}


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def one_line_error(result: Result, *names: str) -> str:
    assert result.exit_code != 0, f"expected a refusal, got exit 0: {result.output[:300]}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for name in names:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    return errors[0]


def refused(model: Path, out: Path, error: type[Exception], *names: str, **options: Any) -> str:
    options.setdefault("target", "h100")
    options.setdefault("overrides", NO_CALIBRATION)
    with pytest.raises(error) as caught:
        nemocompile.build(model, out, **options)
    message = str(caught.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    assert not out.exists()
    return message


# ---------------------------------------------------------------------------------------------
# finite and valid after the final conversion


def test_the_untouched_quantized_checkpoints_build(checkpoint: Path, tmp_path: Path) -> None:
    """The refusals below are caused by the one thing each test breaks."""
    for name, edit, quant in (("nvfp4", nvfp4_experts, NVFP4_CONFIG), ("fp8", fp8_shared_expert, FP8_CONFIG)):
        model = variant(checkpoint, tmp_path / name, edit, quant)
        nemocompile.build(model, tmp_path / f"{name}-engine", target="h100", overrides=NO_CALIBRATION)
        assert (tmp_path / f"{name}-engine" / "manifest.json").is_file()


def _set(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        nvfp4_experts(tensors)
        tensors[name] = torch.tensor(value, dtype=torch.float32)
    return edit


@pytest.mark.parametrize(("value", "said"), [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"),
                                             (0.0, "must be positive"), (-0.5, "must be positive"),
                                             (1e-40, "normal float32")],
                         ids=["nan", "inf", "zero", "negative", "denormal"])
@pytest.mark.parametrize("component", ["weight_scale_2", "input_scale"])
def test_bad_modelopt_fp32_scale_is_refused(component: str, value: float, said: str, checkpoint: Path,
                                            tmp_path: Path) -> None:
    tensor = f"{EXPERT.format(2)}.{component}"
    model = variant(checkpoint, tmp_path / "bad", _set(tensor, value), NVFP4_CONFIG)
    refused(model, tmp_path / "out", CheckpointError, tensor, said)


@pytest.mark.parametrize(("byte", "said"), [(0x7F, "NaN bytes"), (0xFF, "NaN bytes"), (0xB8, "negative block")],
                         ids=["0x7F", "0xFF", "negative"])
def test_bad_modelopt_block_scale_byte_is_refused(byte: int, said: str, checkpoint: Path, tmp_path: Path) -> None:
    tensor = f"{EXPERT.format(1)}.weight_scale"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        nvfp4_experts(tensors)
        tensors[tensor].view(torch.uint8)[3, 1] = byte

    model = variant(checkpoint, tmp_path / "bad", edit, NVFP4_CONFIG)
    refused(model, tmp_path / "out", CheckpointError, tensor, said)


def test_zero_block_scale_is_accepted(checkpoint: Path, tmp_path: Path) -> None:
    """A block scale of 0 (an all-zero block, as older exports write it) dequantizes to zeros."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        nvfp4_experts(tensors)
        tensors[f"{EXPERT.format(1)}.weight_scale"][3, 1] = 0.0

    model = variant(checkpoint, tmp_path / "zero-block", edit, NVFP4_CONFIG)
    nemocompile.build(model, tmp_path / "out", target="h100", overrides=NO_CALIBRATION)


@pytest.mark.parametrize("byte", [0x7F, 0xFF])
def test_fp8_weight_nan_byte_is_refused(byte: int, checkpoint: Path, tmp_path: Path) -> None:
    tensor = f"{SHARED}.weight"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        fp8_shared_expert(tensors)
        tensors[tensor].view(torch.uint8)[5, 7] = byte

    model = variant(checkpoint, tmp_path / "bad", edit, FP8_CONFIG)
    refused(model, tmp_path / "out", CheckpointError, tensor, "NaN bytes (0x7F or 0xFF)")


def test_fp8_weight_scale_nan_is_refused_by_the_cli(checkpoint: Path, tmp_path: Path) -> None:
    tensor = f"{SHARED}.weight_scale"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        fp8_shared_expert(tensors)
        tensors[tensor] = torch.tensor(float("nan"))

    model = variant(checkpoint, tmp_path / "bad", edit, FP8_CONFIG)
    result = invoke("build", model, "--target", "h100", "-o", tmp_path / "out",
                    *(arg for o in NO_CALIBRATION for arg in ("--override", o)))
    one_line_error(result, tensor, "NaN or Inf")
    assert not (tmp_path / "out").exists()


def test_finite_fp32_weight_that_overflows_bf16_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    """3.4e38 is a finite float32 but past bf16's largest value: the conversion would make it Inf."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[NORM][3] = 3.4e38

    model = variant(checkpoint, tmp_path / "overflow", edit)
    assert torch.isfinite(load_file(str(model / "model.safetensors"))[NORM]).all()
    refused(model, tmp_path / "out", CheckpointError, NORM, "beyond the range of bfloat16", precision="bf16")
    # fp32 keeps the value as it is
    nemocompile.build(model, tmp_path / "fp32", target="h100", precision="fp32")


def test_every_stored_tensor_of_a_built_engine_is_finite(checkpoint: Path, tmp_path: Path) -> None:
    """What the checks promise, seen from the engine: no NaN or Inf anywhere, no NaN E4M3 byte."""
    model = variant(checkpoint, tmp_path / "nvfp4", nvfp4_experts, NVFP4_CONFIG)
    nemocompile.build(model, tmp_path / "engine", target="b200")
    for name, tensor in load_file(str(tmp_path / "engine" / "weights" / "rank0.safetensors")).items():
        if tensor.dtype == torch.float8_e4m3fn:
            assert not bool(((tensor.view(torch.uint8) & 0x7F) == 0x7F).any()), name
        elif tensor.is_floating_point():
            assert bool(torch.isfinite(tensor).all()), name


# ---------------------------------------------------------------------------------------------
# config numerics and size limits


@pytest.mark.parametrize(("field", "value", "said"), [
    ("layer_norm_epsilon", -1, "positive number below 1"),
    ("layer_norm_epsilon", 0.0, "positive number below 1"),
    ("layer_norm_epsilon", 2.0, "positive number below 1"),
    ("routed_scaling_factor", -2.5, "positive number"),
    ("time_step_min", -0.01, "non-negative number"),
])
def test_nonsense_numerics_are_refused(field: str, value: float, said: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}' must be a {said}"):
        config_from_dict(raw_config(**{field: value}))


def test_negative_epsilon_is_one_line_from_plan(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(layer_norm_epsilon=-1)))
    one_line_error(invoke("plan", path), "layer_norm_epsilon", "positive")


def test_negative_epsilon_checkpoint_is_refused_before_building(checkpoint: Path, tmp_path: Path) -> None:
    model = shutil.copytree(checkpoint, tmp_path / "eps")
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "layer_norm_epsilon": -1}))
    refused(model, tmp_path / "out", ConfigError, "layer_norm_epsilon")


@pytest.mark.parametrize(("changes", "said"), [
    ({"n_routed_experts": 10**9}, f"{MAX_EXPERTS:,}"),
    ({"hybrid_override_pattern": "M" * 10**6}, f"{MAX_LAYERS:,}"),
    ({"hybrid_override_pattern": None, "layers_block_type": ["mamba"] * (MAX_LAYERS + 1)}, f"{MAX_LAYERS:,}"),
    ({"num_nextn_predict_layers": 10**9}, f"{MAX_MTP_LAYERS:,}"),
    ({"num_nextn_predict_layers": 1, "mtp_hybrid_override_pattern": "*" * (MAX_LAYERS + 1)}, f"{MAX_LAYERS:,}"),
    ({"hidden_size": 10**40}, "2,147,483,647"),
])
def test_config_sizes_past_the_limits_are_refused_at_once(changes: dict[str, Any], said: str,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(**changes)))
    start = time.perf_counter()
    line = one_line_error(invoke("plan", path), said, "limit")
    assert time.perf_counter() - start < 5
    assert len(line) < 300  # a huge value is not echoed


def test_plan_at_the_expert_limit_builds_no_name_lists(tmp_path: Path) -> None:
    """A million experts are planned in well under a second, in kilobytes: the checkpoint names of
    stacked experts are made on demand, not as tuples of a million strings per layer."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(n_routed_experts=MAX_EXPERTS, num_nextn_predict_layers=MAX_MTP_LAYERS)))
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = plan_model(path)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"plan of {MAX_EXPERTS:,} experts and {MAX_MTP_LAYERS} MTP layers: {seconds:.2f} s, "
          f"peak {peak / 2**20:.1f} MiB traced")
    assert peak < 20 * 2**20, peak
    assert seconds < 10
    assert result.stats.params_mtp > 0


def test_expert_tensor_names_are_made_on_demand() -> None:
    config = config_from_dict(raw_config(n_routed_experts=MAX_EXPERTS))
    (spec,) = [s for s in model_weights(config) if s.name == "layers.2.mixer.experts_up"]
    assert isinstance(spec.tensors, ExpertTensorNames)
    assert len(spec.tensors) == MAX_EXPERTS
    assert spec.tensors[7] == "backbone.layers.2.mixer.experts.7.up_proj.weight"
    assert spec.tensors[-1] == f"backbone.layers.2.mixer.experts.{MAX_EXPERTS - 1}.up_proj.weight"
    assert list(spec.tensors[:2]) == [spec.tensors[0], spec.tensors[1]]
    small = config_from_dict(raw_config())
    (few,) = [s for s in model_weights(small) if s.name == "layers.2.mixer.experts_down"]
    assert list(few.tensors) == [f"backbone.layers.2.mixer.experts.{e}.down_proj.weight" for e in range(EXPERTS)]
    with pytest.raises(IndexError):
        few.tensors[EXPERTS]


@pytest.mark.slow
def test_plan_at_the_layer_limit_is_linear(tmp_path: Path) -> None:
    """10,000 layers plan in seconds (verifying each op once looked the state slots up per op)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw_config(hybrid_override_pattern="M*E-" * (MAX_LAYERS // 4))))
    start = time.perf_counter()
    plan_model(path)
    seconds = time.perf_counter() - start
    print(f"plan of {MAX_LAYERS:,} layers: {seconds:.1f} s")
    assert seconds < 120


# ---------------------------------------------------------------------------------------------
# one zero/denormal rule for FP8 and NVFP4

QUANTIZERS = {"fp8": (quantize_fp8, dequantize_fp8), "nvfp4": (quantize_nvfp4, dequantize_nvfp4)}


@pytest.mark.parametrize("fmt", sorted(QUANTIZERS))
@pytest.mark.parametrize("value", [1e-43, 1e-40, 1e-37], ids=["scale-underflows", "denormal", "tiny-normal"])
def test_a_weight_too_small_for_a_normal_scale_is_refused_alike(fmt: str, value: float) -> None:
    """1e-43 once gave FP8 a scale of exactly 0 while NVFP4 refused it; 1e-40 passed both with a
    denormal scale; now both refuse each the same way."""
    quantize, _ = QUANTIZERS[fmt]
    with pytest.raises(ValueError, match="denormal float32"):
        quantize(torch.full((4, 16), value))


@pytest.mark.parametrize("fmt", sorted(QUANTIZERS))
def test_all_zero_and_smallest_accepted_weights_alike(fmt: str) -> None:
    quantize, dequantize = QUANTIZERS[fmt]
    zero = dequantize(quantize(torch.zeros(4, 16)))  # type: ignore[operator]
    assert torch.equal(zero, torch.zeros(4, 16))
    smallest = 6 * 448 * torch.finfo(torch.float32).tiny  # NVFP4's least amax (FP8's is smaller)
    weight = torch.full((4, 16), smallest)
    assert torch.allclose(dequantize(quantize(weight)), weight, rtol=0.2)  # type: ignore[operator]


def test_stacked_quantizers_follow_the_rule() -> None:
    experts = torch.randn(3, 4, 16)
    experts[1] = 1e-40
    for quantize in (quantize_fp8_stacked, quantize_nvfp4_stacked):
        with pytest.raises(ValueError, match="denormal float32"):
            quantize(experts)
    experts[1] = 0.0  # an all-zero expert is fine
    assert torch.equal(dequantize_fp8(quantize_fp8_stacked(experts))[1], torch.zeros(4, 16))
    assert torch.equal(dequantize_nvfp4(quantize_nvfp4_stacked(experts))[1], torch.zeros(4, 16))


@pytest.mark.parametrize(("tensor", "fmt"), [(SHARED + ".weight", "FP8"), (EXPERT.format(0) + ".weight", "NVFP4")])
def test_a_denormal_weight_is_refused_by_either_format_in_a_build(tensor: str, fmt: str, checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[tensor].fill_(1e-43)

    model = variant(checkpoint, tmp_path / "denormal", edit)
    refused(model, tmp_path / "out", CheckpointError, tensor, f"{fmt} scale would be a denormal", overrides=())


# ---------------------------------------------------------------------------------------------
# lazy, bounded calibration


def test_calibration_batches_are_made_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real = torch.randint

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", counting)
    batches = calibration_batches(MAX_CALIBRATION_BATCHES, 50, 64)
    assert len(batches) == MAX_CALIBRATION_BATCHES
    assert batches.tokens == MAX_CALIBRATION_BATCHES * 64
    assert made == []
    first_two = [batch for _, batch in zip(range(2), batches, strict=False)]
    assert len(made) == 2
    generator = torch.Generator().manual_seed(0)  # the same stream as before: batch i is the i-th draw
    assert torch.equal(first_two[1], [real(0, 50, (1, 64), generator=generator) for _ in range(2)][1])


def test_calibration_count_is_bounded() -> None:
    with pytest.raises(UsageError, match="100,000"):
        calibration_batches(10**9, 50, 64)
    with pytest.raises(UsageError, match="--calibrate"):
        calibration_batches(0, 50, 64)
    from_data = calibration_batches(1000, 50, 64, data=[[1, 2, 3], [4]])
    assert len(from_data) == 2 and from_data.tokens == 4  # bounded by the data
    assert [b.tolist() for b in from_data] == [[[1, 2, 3]], [[4]]]


def test_a_huge_calibrate_count_is_refused_in_a_build(checkpoint: Path, tmp_path: Path) -> None:
    result = invoke("build", checkpoint, "--target", "b200", "-o", tmp_path / "out", "--calibrate", "1000000000")
    one_line_error(result, "--calibrate", "100,000")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# prefill attention memory


def _qkv(batch: int, length: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    return (torch.randn(batch, length, heads * head_dim, generator=generator).to(dtype),
            torch.randn(batch, length, kv_heads * head_dim, generator=generator).to(dtype),
            torch.randn(batch, length, kv_heads * head_dim, generator=generator).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_equals_one_chunk(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(2, 37, dtype=dtype)
    shape = dict(num_heads=4, num_kv_heads=2, head_dim=8, scale=8**-0.5)
    past = _qkv(2, 5, dtype=dtype)[1].reshape(2, 5, 2, 8).transpose(1, 2)
    lens = torch.tensor([5, 2])

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        k_cache = torch.zeros(2, 2, 64, 8, dtype=dtype)
        v_cache = torch.zeros(2, 2, 64, 8, dtype=dtype)
        k_cache[:, :, :5], v_cache[:, :, :5] = past, past
        cached, _, _ = attention_gqa_cached(q, k, v, k_cache, v_cache, lens, **shape)  # type: ignore[arg-type]
        plain, _, _ = attention_gqa(q, k, v, past_k=past, past_v=past, **shape)  # type: ignore[arg-type]
        return cached, plain

    monkeypatch.setattr(attention_module, "SCORE_BUDGET", 10**12)
    whole = run()
    for budget in (1, 3 * 4 * 42, 1000):  # one query per chunk, a few, uneven chunks
        monkeypatch.setattr(attention_module, "SCORE_BUDGET", budget)
        for chunked, one in zip(run(), whole, strict=True):
            # the same formula per row; the products' blocking may move float32 by an ulp or so
            torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)


def test_prefill_scores_stay_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest score tensor a 512-token prefill makes is one chunk, not [B, H, T, T]."""
    monkeypatch.setattr(attention_module, "SCORE_BUDGET", 4096)
    seen: list[int] = []
    real = torch.softmax

    def recording(scores: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(scores.numel())
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", recording)
    q, k, v = _qkv(1, 512)
    caches = torch.zeros(1, 2, 512, 8), torch.zeros(1, 2, 512, 8)
    attention_gqa_cached(q, k, v, *caches, torch.tensor([0]), num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3)
    assert seen and max(seen) <= 4096 < 4 * 512 * 512
