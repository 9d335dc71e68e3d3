"""ModelOpt exports with an FP8 KV cache (`kv_cache_quant_algo: FP8`), made in the test by NVIDIA
ModelOpt 0.47's own `mtq.quantize` (its FP8_KV_CFG: the attention's k_bmm_quantizer and
v_bmm_quantizer) and `export_hf_checkpoint`, on random tiny transformers NemotronH models, on the
CPU (ModelOpt's FP8 fake quantization has an eager CPU path; no CUDA is needed). They deploy with
their own k_scale / v_scale: the engine's KV cache is FP8 by the checkpoint's declaration, nothing is
calibrated for it, and its logits are those of ModelOpt's fake-quantized model, at world size 1 and
on 2 gloo ranks. Malformed declarations and scales are refused in one sentence naming the tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import nemocompile
from nemocompile.base.errors import CheckpointError, UsageError
from nemocompile.cli import main
from nemocompile.driver import BuildResult
from nemocompile.graph.modelopt import QUANT_CONFIG_FILE
from nemocompile.options import BuildOptions
from nemocompile.planner import plan_model

pytest.importorskip("modelopt", reason="the exports are made by NVIDIA ModelOpt")
import modelopt.torch.quantization as mtq
from modelopt_exports import (
    RECIPES,
    Export,
    calibration_batches,
    export_maker,
    random_model,
    relative_error,
)
from test_distributed import ranks

E4M3_MAX = 448.0
ATTENTION = "backbone.layers.1.mixer"  # the one attention layer of the tiny model (pattern M*E-)
K_SCALE, V_SCALE = f"{ATTENTION}.k_proj.k_scale", f"{ATTENTION}.v_proj.v_scale"
VOCAB = 64
# The engine against ModelOpt's fake-quantized model, fp32: measured 1.5e-7 to 1.9e-7 of the largest
# logit (summation order), prefill and decode. The same checkpoint run with a float KV cache is off
# by 1.3e-2 to 2e-2, so the bound tells the deployed FP8 cache from a float one.
KV_TOLERANCE = 1e-5
FLOAT_KV_AT_LEAST = 1e-3



@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Export]:
    return export_maker(tmp_path_factory)


@pytest.fixture(scope="module")
def engines(exports: Callable[[str], Export], tmp_path_factory: pytest.TempPathFactory
            ) -> Callable[[str, str], tuple[Path, BuildResult]]:
    built: dict[tuple[str, str], tuple[Path, BuildResult]] = {}

    def get(recipe: str, target: str) -> tuple[Path, BuildResult]:
        if (recipe, target) not in built:
            out = tmp_path_factory.mktemp(f"engine-{recipe}-{target}") / "engine"
            built[(recipe, target)] = out, nemocompile.build(exports(recipe).directory, out, target=target,
                                                             precision="fp32")
        return built[(recipe, target)]
    return get


def test_modelopt_exports_amax_over_448_of_the_k_and_v_projections(exports: Callable[[str], Export]) -> None:
    """What ModelOpt 0.47 writes: kv_cache_quant_algo FP8 (config.json: kv_cache_scheme), and per
    attention module `k_proj.k_scale` / `v_proj.v_scale`, F32 0-d, = the amax its k/v_bmm_quantizer
    calibrated / 448. The quantizers see k_proj's and v_proj's outputs as they are (Nemotron-H's
    attention has no rotary embedding)."""
    model = random_model(0)
    seen: dict[str, list[torch.Tensor]] = {"k_proj": [], "v_proj": [], "k_bmm_quantizer": [], "v_bmm_quantizer": []}
    with torch.no_grad():
        mtq.quantize(model, RECIPES["kv_only"](), lambda m: [m(batch) for batch in calibration_batches()])
        attention = model.model.layers[1].mixer
        for name in seen:
            getattr(attention, name).register_forward_hook(
                lambda module, args, out, name=name: seen[name].append((out if "proj" in name else args[0]).detach()))
        batch = calibration_batches()[0]
        model(batch)
    for which in "kv":
        projected = seen[f"{which}_proj"][0].view(*batch.shape, -1, 8).transpose(1, 2)  # [B, Hkv, T, Dh]
        assert torch.equal(seen[f"{which}_bmm_quantizer"][0], projected)  # no rotary embedding in between
    float_model = random_model(0)
    amax = {"k": 0.0, "v": 0.0}
    for which in amax:
        getattr(float_model.model.layers[1].mixer, f"{which}_proj").register_forward_hook(
            lambda module, args, out, which=which: amax.__setitem__(which, max(amax[which], float(out.abs().max()))))
    with torch.no_grad():
        for batch in calibration_batches():
            float_model(batch)
    for recipe, quant_algo in (("fp8_kv", "FP8"), ("kv_only", None)):
        directory = exports(recipe).directory
        section = json.loads((directory / QUANT_CONFIG_FILE).read_text())["quantization"]
        assert (section["quant_algo"], section["kv_cache_quant_algo"]) == (quant_algo, "FP8")
        scheme = json.loads((directory / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
        assert scheme == {"dynamic": False, "num_bits": 8, "type": "float"}
        tensors = load_file(str(directory / "model.safetensors"))
        assert sorted(n for n in tensors if n.endswith(("k_scale", "v_scale"))) == [K_SCALE, V_SCALE]
        for name, which in ((K_SCALE, "k"), (V_SCALE, "v")):
            assert tensors[name].dtype == torch.float32 and tensors[name].shape == ()
            assert float(tensors[name]) == pytest.approx(amax[which] / E4M3_MAX, rel=1e-6), (recipe, name)
            assert float(tensors[name]) == pytest.approx(
                float(getattr(attention, f"{which}_bmm_quantizer").amax) / E4M3_MAX, rel=1e-6)


@pytest.mark.parametrize(("recipe", "target"), [("fp8_kv", "h100"), ("fp8_kv", "b200"), ("kv_only", "h100"),
                                                ("mixed_kv", "b200")])
def test_export_deploys_with_its_own_kv_scales_and_modelopts_numerics(
        exports: Callable[[str], Export], engines: Callable[[str, str], tuple[Path, BuildResult]], recipe: str,
        target: str) -> None:
    export = exports(recipe)
    out, result = engines(recipe, target)
    assert result.calibration is None  # nothing calibrated: the KV scales (and input scales) are the checkpoint's
    engine = nemocompile.load(out)
    slots = [slot for slot in engine.graph.states if slot.kind == "kv"]
    assert [slot.type.dtype.name for slot in slots] == ["fp8e4m3", "fp8e4m3"]
    stored = load_file(str(out / "weights" / "rank0.safetensors"))
    source = load_file(str(export.directory / "model.safetensors"))
    for name, tensor in ((("layers.1.mixer.k_scale"), K_SCALE), ("layers.1.mixer.v_scale", V_SCALE)):
        assert torch.equal(stored[name], source[tensor])  # bit for bit
    report = (out / "report.md").read_text()
    assert "- kv_cache: fp8_e4m3" in report
    assert "2 of the 2 KV-cache scales (k_scale, v_scale) are the checkpoint's own" in report
    assert f"`{K_SCALE}`" not in report  # used, not skipped

    prefill = engine.forward(export.prompt.tolist())
    cache = engine.new_cache(export.prompt.shape[0])
    steps = [engine.forward(export.prompt[:, :16].tolist(), cache)]
    steps += [engine.forward(export.prompt[:, t:t + 1].tolist(), cache) for t in range(16, export.prompt.shape[1])]
    decoded = torch.cat(steps, 1)
    errors = relative_error(prefill, export.logits), relative_error(decoded, export.logits)
    print(f"\n{recipe} on {target}, fp32, FP8 KV cache with the checkpoint's scales: max |engine - ModelOpt| / "
          f"max |ModelOpt| = {errors[0]:.3g} (prefill), {errors[1]:.3g} (prefill 16 + 8 decode steps)")
    assert max(errors) <= KV_TOLERANCE
    assert torch.equal(prefill.argmax(-1), export.logits.argmax(-1))


def _copy(export: Export, directory: Path) -> Path:
    shutil.copytree(export.directory, directory)
    return directory


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _drop_quantization(directory: Path) -> None:
    (directory / QUANT_CONFIG_FILE).unlink()
    _edit_json(directory / "config.json", lambda config: config.pop("quantization_config"))


def test_the_same_checkpoint_with_a_float_kv_cache_is_measurably_not_the_export(
        exports: Callable[[str], Export], tmp_path: Path) -> None:
    """Without the declaration the scales are skipped (and named): the engine's float KV cache is off
    by more than FLOAT_KV_AT_LEAST, which the tolerance above tells apart."""
    export = exports("kv_only")
    model = _copy(export, tmp_path / "undeclared")
    _drop_quantization(model)
    nemocompile.build(model, tmp_path / "engine", target="h100", precision="fp32")
    error = relative_error(nemocompile.load(tmp_path / "engine").forward(export.prompt.tolist()), export.logits)
    print(f"\nkv_only with an fp32 KV cache: max relative logit error against ModelOpt {error:.3g}")
    assert error >= FLOAT_KV_AT_LEAST
    report = (tmp_path / "engine" / "report.md").read_text()
    assert f"`{K_SCALE}`: a ModelOpt FP8 KV-cache scale, but the quantization config declares no" in report


def test_config_json_alone_declares_the_kv_cache(exports: Callable[[str], Export], tmp_path: Path) -> None:
    """Without hf_quant_config.json, config.json's quantization_config (kv_cache_scheme) says the same."""
    model = _copy(exports("kv_only"), tmp_path / "config-only")
    (model / QUANT_CONFIG_FILE).unlink()
    nemocompile.build(model, tmp_path / "engine", target="h100", precision="fp32")
    engine = nemocompile.load(tmp_path / "engine")
    assert {slot.type.dtype.name for slot in engine.graph.states if slot.kind == "kv"} == {"fp8e4m3"}


def test_a_consistent_override_is_accepted_and_a_conflicting_one_refused(exports: Callable[[str], Export],
                                                                           tmp_path: Path) -> None:
    export = exports("kv_only")
    result = nemocompile.build(export.directory, tmp_path / "fp8", target="h100", precision="fp32",
                               overrides=("kv_cache=fp8",))
    assert result.calibration is None  # the checkpoint's scales, not calibrated ones
    with pytest.raises(UsageError, match=r"declares an FP8 KV cache with its own k_scale and v_scale, but the "
                                         r"policy \(overrides or policy file\) asks for kv_cache=fp32"):
        nemocompile.build(export.directory, tmp_path / "engine", target="h100", precision="fp32",
                          overrides=("kv_cache=fp32",))
    assert not (tmp_path / "engine").exists()
    done = CliRunner().invoke(main, ["build", str(export.directory), "--target", "h100", "--precision", "bf16",
                                     "--override", "kv_cache=bf16", "-o", str(tmp_path / "cli")])
    assert done.exit_code == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "asks for kv_cache=bf16" in done.stderr
    assert not (tmp_path / "cli").exists()


def test_plan_of_the_checkpoint_counts_its_fp8_kv_cache(exports: Callable[[str], Export], tmp_path: Path) -> None:
    export = exports("kv_only")
    options = BuildOptions(target="h100", precision="fp32")
    declared = plan_model(export.directory, options)
    assert declared.policy.components["kv_cache"] == "fp8_e4m3"
    undeclared = _copy(export, tmp_path / "undeclared")
    _drop_quantization(undeclared)
    plain = plan_model(undeclared / "config.json", options)
    assert plain.policy.components["kv_cache"] == "fp32"
    assert declared.memory.kv_bytes_per_token * 4 == plain.memory.kv_bytes_per_token  # E4M3 bytes, not fp32
    with pytest.raises(UsageError, match="declares an FP8 KV cache"):
        plan_model(export.directory / "config.json", BuildOptions(target="h100", precision="fp32",
                                                                   overrides=("kv_cache=fp32",)))


def _config_kv(algo: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        _edit_json(model / QUANT_CONFIG_FILE, lambda config: config["quantization"].update(kv_cache_quant_algo=algo))
    return edit


def _config_json_scheme(model: Path) -> None:
    (model / QUANT_CONFIG_FILE).unlink()
    _edit_json(model / "config.json", lambda config: config["quantization_config"].update(
        kv_cache_scheme={"dynamic": False, "num_bits": 4, "type": "float"}))


def _tensor(name: str, value: torch.Tensor | None) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        _edit_tensors(model, lambda tensors: tensors.pop(name) if value is None else tensors.__setitem__(name, value))
    return edit


MALFORMED = {
    "nvfp4 kv cache": (_config_kv("NVFP4"), r"kv_cache_quant_algo 'NVFP4' is not supported; nemocompile runs a "
                                            r"quantized KV cache in FP8 only"),
    "int8 kv cache": (_config_kv("INT8"), r"kv_cache_quant_algo 'INT8' is not supported"),
    "config.json 4-bit scheme": (_config_json_scheme, r"quantization_config: kv_cache_quant_algo "
                                                      r"'\{.*\"num_bits\": 4.*\}' is not supported"),
    "missing v_scale": (_tensor(V_SCALE, None), rf"{V_SCALE} is missing \(.* declares kv_cache_quant_algo FP8, "
                                                r"which needs a k_scale and a v_scale for every attention layer\)"),
    "non-scalar k_scale": (_tensor(K_SCALE, torch.tensor([0.01, 0.01])),
                           rf"{K_SCALE} is F32 \[2\], but an FP8 KV-cache scale is an F32 scalar"),
    "bf16 k_scale": (_tensor(K_SCALE, torch.tensor(0.01, dtype=torch.bfloat16)), rf"{K_SCALE} is BF16 \[\]"),
    "zero k_scale": (_tensor(K_SCALE, torch.tensor(0.0)),
                     rf"{K_SCALE} is 0, but an FP8 KV-cache scale must be a positive, finite normal float32"),
    "negative v_scale": (_tensor(V_SCALE, torch.tensor(-0.002)), rf"{V_SCALE} is -0.002, but"),
    "infinite v_scale": (_tensor(V_SCALE, torch.tensor(float("inf"))), rf"{V_SCALE} is inf, but"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_kv_cache_declaration_is_refused_in_one_sentence(exports: Callable[[str], Export], tmp_path: Path,
                                                                   case: str) -> None:
    edit, message = MALFORMED[case]
    model = _copy(exports("fp8_kv"), tmp_path / "malformed")
    edit(model)
    with pytest.raises(CheckpointError, match=message) as caught:
        nemocompile.build(model, tmp_path / "engine", target="h100")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "engine").exists()


def test_malformed_scale_through_the_cli_exits_1_with_one_line(exports: Callable[[str], Export],
                                                               tmp_path: Path) -> None:
    model = _copy(exports("fp8_kv"), tmp_path / "zero")
    _tensor(V_SCALE, torch.tensor(0.0))(model)
    done = CliRunner().invoke(main, ["build", str(model), "--target", "h100", "-o", str(tmp_path / "engine")])
    assert done.exit_code == 1
    assert len(done.stderr.strip().splitlines()) == 1 and V_SCALE in done.stderr
    assert not (tmp_path / "engine").exists()


def test_two_gloo_ranks_replicate_the_kv_scales_and_give_the_one_rank_logits(
        exports: Callable[[str], Export], engines: Callable[[str, str], tuple[Path, BuildResult]],
        tmp_path: Path) -> None:
    export = exports("fp8_kv")
    one, _ = engines("fp8_kv", "h100")
    two = tmp_path / "engine-2"
    nemocompile.build(export.directory, two, target="h100", precision="fp32", world_size=2)
    source = load_file(str(export.directory / "model.safetensors"))
    for rank in (0, 1):  # each rank holds the whole scales
        stored = load_file(str(two / "weights" / f"rank{rank}.safetensors"))
        assert torch.equal(stored["layers.1.mixer.k_scale"], source[K_SCALE])
        assert torch.equal(stored["layers.1.mixer.v_scale"], source[V_SCALE])
    text = (two / "graph.txt").read_text()
    # the FP8 cache split by KV head (one per rank), its scales whole on each rank (no sharding)
    assert "state %layers.1.k : kv tensor<fp8e4m3, [batch, 2, ctx, 8], shard<tp=2, dim=1>>" in text
    assert "weight %layers.1.mixer.k_scale : tensor<f32, []> category" in text
    runs = {}
    for world_size, engine in ((1, one), (2, two)):
        out = tmp_path / f"run-{world_size}.pt"
        for done in ranks(world_size, str(engine), str(out), env={"RANK_WORKER_VOCAB": str(VOCAB)}):
            assert done.returncode == 0, done.stderr
        runs[world_size] = torch.load(out)
    scale = runs[1]["logits"].abs().amax(-1, keepdim=True)
    error = float(((runs[2]["logits"] - runs[1]["logits"]).abs() / scale).max())
    print(f"\nfp8_kv on 2 gloo ranks: max relative logit error against one rank {error:.2e} "
          f"over prefill + 16 decode steps")
    assert error <= 1e-5
    assert torch.equal(runs[2]["tokens"], runs[1]["tokens"])
