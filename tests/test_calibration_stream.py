"""Layer-streamed calibration equals whole-model calibration bit for bit, on random tiny
checkpoints saved by transformers' NemotronHForCausalLM (float32 and sharded bfloat16, one with
experts that no token reaches), holds one block's weights at a time, names the unreached experts
in report.md with the scale they took, and calibrates models past the reference-check size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import nemocompile
from nemocompile.base.errors import UsageError
from nemocompile.base.settings import override
from nemocompile.calibration import calibrate, calibration_batches, scales_needed
from nemocompile.calibration_stream import StreamedCalibration, calibration_device, segments
from nemocompile.driver import BuildContext
from nemocompile.graph.importer import ImportedModel, import_checkpoint
from nemocompile.graph.ir import Graph
from nemocompile.options import BuildOptions
from nemocompile.pipeline import FLOAT, PREFILL, Calibrate, PassStep, Phases, PlanMemory, run_pass_step
from nemocompile.weight_stream import read_weights

transformers = pytest.importorskip("transformers", reason="the checkpoints are saved by NemotronHForCausalLM")

BASE: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=32,
    mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=4, conv_kernel=4,
    num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32, n_group=1,
    topk_group=1)
# (pattern, routed experts, torch dtype, experts of each MoE layer that the router never picks)
MODELS = {
    "f32": ("M*E-", 4, torch.float32, ()),
    "bf16-unreached": ("ME*E", 8, torch.bfloat16, (2, 5)),
}
UNREACHABLE_BIAS = -100.0  # sigmoid scores lie in (0, 1): such an expert is never in the top k


def save_checkpoint(directory: Path, name: str) -> Path:
    pattern, experts, dtype, unreached = MODELS[name]
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(**BASE, hybrid_override_pattern=pattern, n_routed_experts=experts,
                                          dtype="float32")
    model = transformers.NemotronHForCausalLM(config)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for index, kind in enumerate(pattern):
            if kind == "E":  # non-trivial routing: the default router weights are zeros
                gate = model.model.layers[index].mixer.gate
                gate.weight.normal_(0, 0.3, generator=generator)
                for expert in unreached:
                    gate.e_score_correction_bias[expert] = UNREACHABLE_BIAS
    model.to(dtype).save_pretrained(directory / name, max_shard_size="40KB")  # sharded, as released
    return directory / name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streamed")
    return {name: save_checkpoint(root, name) for name in MODELS}


def float_and_prefill(checkpoint: Path, target: str) -> tuple[ImportedModel, Graph, Graph]:
    imported = import_checkpoint(checkpoint, (256, 1024))
    context = BuildContext(BuildOptions(target=target), imported, checkpoint, None, Phases())
    for step in context.steps:
        if isinstance(step, Calibrate):
            break
        if isinstance(step, PlanMemory):
            continue  # checks the memory plan; changes no graph
        assert isinstance(step, PassStep)
        run_pass_step(step, context.graphs)
    return imported, context.graphs[FLOAT], context.graphs[PREFILL]


@pytest.mark.parametrize("target", ["h100", "b200"])
@pytest.mark.parametrize("model", list(MODELS))
def test_streamed_scales_equal_whole_model_scales_bit_for_bit(checkpoints: dict[str, Path], model: str,
                                                               target: str) -> None:
    imported, float_graph, prefill = float_and_prefill(checkpoints[model], target)
    needed = scales_needed(prefill)
    assert needed
    batches = calibration_batches(3, 64, length=12, seed=5)
    whole = calibrate(float_graph, read_weights(imported.checkpoint, float_graph), needed, batches)
    streamed = StreamedCalibration(imported.checkpoint, float_graph, needed)
    result = streamed.run(batches)
    assert result.values.keys() == whole.keys() == needed.keys()
    for scale, value in whole.items():
        assert result.values[scale].dtype == value.dtype == torch.float32
        assert torch.equal(result.values[scale], value), scale
    # only one block's weights were ever held, well below the whole model's
    whole_bytes = sum(t.numel() * t.element_size() for t in read_weights(imported.checkpoint, float_graph).values()
                      if isinstance(t, torch.Tensor))
    assert 0 < streamed.peak_weight_bytes < whole_bytes / 2
    print(f"{model} {target}: {len(whole)} scales equal; peak block weights {streamed.peak_weight_bytes:,} B "
          f"of {whole_bytes:,} B")
    _, experts, _, unreached = MODELS[model]
    if target == "b200":  # W4A4 experts: one scale per expert, unreached ones named
        moe_layers = MODELS[model][0].count("E")
        assert len(result.unreached) == 2 * moe_layers * len(unreached)  # up and down of each MoE layer
        for expert in unreached:
            assert any(name.endswith(f"experts_up expert {expert}") for name in result.unreached)
        for scale, (weight, _) in needed.items():
            if "experts" in weight:
                value = result.values[scale]
                assert value.shape == (experts,)
                reached = [e for e in range(experts) if e not in unreached]
                for expert in unreached:  # the rule: the largest scale of the reached experts
                    assert value[expert] == value[reached].max()
    else:
        assert result.unreached == ()


def test_blocks_are_the_layers_and_stop_after_the_last_scaled_gemm(checkpoints: dict[str, Path]) -> None:
    imported, float_graph, prefill = float_and_prefill(checkpoints["f32"], "b200")
    assert [s.block for s in segments(float_graph)] == ["embeddings", "layers.0", "layers.1", "layers.2",
                                                       "layers.3", "norm_f", "lm_head"]
    streamed = StreamedCalibration(imported.checkpoint, float_graph, scales_needed(prefill))
    # layer 3 (the MLP, bf16 in the policy) and lm_head quantize no activation: never run, never read
    assert [s.block for s in streamed.segments] == ["embeddings", "layers.0", "layers.1", "layers.2"]


def test_build_names_the_unreached_experts_in_the_report(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    result = nemocompile.build(checkpoints["bf16-unreached"], tmp_path / "engine", target="b200")
    assert result.calibration is not None
    assert len(result.calibration.unreached) == 8
    report = (tmp_path / "engine" / "report.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("- experts no sample reached:"))
    assert line.startswith("- experts no sample reached: 8; each takes the largest amax the other experts")
    assert "layers.1.mixer.experts_up expert 2" in line and "layers.3.mixer.experts_down expert 5" in line
    # the engine holds those scales
    with safe_open(str(tmp_path / "engine" / "weights" / "rank0.safetensors"), framework="pt") as engine:
        scales = {name: engine.get_tensor(name) for name in engine.keys() if name.endswith("experts_up.input_scale")}
    assert scales
    for value in scales.values():
        assert value[2] == value[5] == max(value[e] for e in (0, 1, 3, 4, 6, 7))


def test_models_past_the_reference_check_size_calibrate(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Calibration streams, so it has no size limit; only the agreement check is skipped."""
    with override(reference_check_max_params=1000):
        result = nemocompile.build(checkpoints["f32"], tmp_path / "engine", target="b200")
    assert result.calibration is not None and result.calibration.scales > 0
    assert result.agreement is None
    with override(reference_check_max_params=10**9):
        nemocompile.build(checkpoints["f32"], tmp_path / "again", target="b200")
    for name in ("weights/rank0.safetensors", "graph.txt"):
        assert (tmp_path / "engine" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_calibration_device_must_exist() -> None:
    assert calibration_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="--calibration-device must be cpu or cuda, got 'tpu'"):
        calibration_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--calibration-device cuda needs a CUDA GPU"):
            calibration_device("cuda")
