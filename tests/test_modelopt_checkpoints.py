"""NVIDIA ModelOpt checkpoints as input: NVFP4, FP8 and MIXED_PRECISION exports of a tiny
transformers NemotronH, with `hf_quant_config.json` or `quantization_config` in config.json.
Their quantized tensors reach the engine bit for bit (stacked over experts), never re-quantized;
excluded modules stay float; the engine runs close to the fp32 model; the report says what it took.

The checkpoints are written the way ModelOpt's export lays them out: per quantized linear M,
NVFP4 `M.weight` u8 [out, in/2], `M.weight_scale` e4m3 [out, in/16], `M.weight_scale_2` and
`M.input_scale` f32 scalars; FP8 `M.weight` e4m3, `M.weight_scale` and `M.input_scale` f32
scalars. Input scales come from the activations the transformers model itself produces
(amax / (6*448) for NVFP4, amax / 448 for FP8, as ModelOpt calibrates them).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nemocompile
from nemocompile.base.errors import CheckpointError
from nemocompile.driver import BuildResult
from nemocompile.runtime.formats import NVFP4Tensor, dequantize_nvfp4, quantize_fp8, quantize_nvfp4

transformers = pytest.importorskip("transformers", reason="checkpoints are made by NemotronHForCausalLM")

WEIGHTS_FILE = "weights/rank0.safetensors"
EXPERTS = 4
CONFIG: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=32, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    chunk_size=4, conv_kernel=4, n_routed_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, dtype="float32",
)
# graph weight -> the checkpoint's linear modules it is made of (several: stacked experts)
GEMMS: dict[str, tuple[str, ...]] = {
    "layers.0.mixer.in_proj": ("backbone.layers.0.mixer.in_proj",),
    "layers.0.mixer.out_proj": ("backbone.layers.0.mixer.out_proj",),
    **{f"layers.1.mixer.{p}": (f"backbone.layers.1.mixer.{p}",) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "layers.2.mixer.experts_up": tuple(f"backbone.layers.2.mixer.experts.{e}.up_proj" for e in range(EXPERTS)),
    "layers.2.mixer.experts_down": tuple(f"backbone.layers.2.mixer.experts.{e}.down_proj" for e in range(EXPERTS)),
    "layers.2.mixer.shared_up": ("backbone.layers.2.mixer.shared_experts.up_proj",),
    "layers.2.mixer.shared_down": ("backbone.layers.2.mixer.shared_experts.down_proj",),
    "layers.3.mixer.up_proj": ("backbone.layers.3.mixer.up_proj",),
    "layers.3.mixer.down_proj": ("backbone.layers.3.mixer.down_proj",),
    "lm_head": ("lm_head",),
}
MODULES = [module for modules in GEMMS.values() for module in modules]
ATTENTION = [w for w in GEMMS if w.startswith("layers.1.")]
NVFP4_EXCLUDE = ["lm_head", "backbone.layers.1.mixer.*"]  # attention and lm_head stay float, as released
FORMAT_MAX = {"NVFP4": 6.0 * 448.0, "FP8": 448.0}
Quantizer = Callable[[torch.Tensor], NVFP4Tensor]


# ---------------------------------------------------------------------------------------------
# the source model, and ModelOpt-layout exports of it


@dataclass(frozen=True)
class Source:
    model: Any  # transformers NemotronHForCausalLM, fp32
    directory: Path
    tensors: dict[str, torch.Tensor]
    amax: dict[str, float]  # linear module -> largest |input| it saw (what ModelOpt calibrates)


def randomize_routing(model: Any) -> None:
    """Non-trivial routing (the default router weights are zeros: every token would pick experts 0 and 1)."""
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.weight.normal_(0, 0.3, generator=generator)
                layer.mixer.gate.e_score_correction_bias.normal_(0, 0.05, generator=generator)


def _input_amax(model: Any, batches: list[torch.Tensor]) -> dict[str, float]:
    """max |input| of every linear module over the batches; routed experts see only their tokens."""
    amax: dict[str, float] = {}

    def seen(module: str, x: torch.Tensor) -> None:
        if x.numel():
            amax[module] = max(amax.get(module, 0.0), float(x.abs().max()))

    def linear_hook(module: str) -> Callable[..., None]:
        return lambda _mod, args: seen(module, args[0])

    def experts_hook(prefix: str) -> Callable[..., None]:
        def hook(mod: Any, args: tuple[torch.Tensor, ...]) -> None:
            hidden, top_k_index = args[0], args[1]
            for expert in range(EXPERTS):
                rows = hidden[(top_k_index == expert).any(-1)]
                seen(f"{prefix}.{expert}.up_proj", rows)
                seen(f"{prefix}.{expert}.down_proj", mod.act_fn(rows @ mod.up_proj[expert].T))
        return hook

    handles = []
    for name, module in model.named_modules():
        public = "lm_head" if name == "lm_head" else name.replace("model.", "backbone.", 1)
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(linear_hook(public)))
        elif name.endswith("mixer.experts"):
            handles.append(module.register_forward_pre_hook(experts_hook(public)))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    assert set(MODULES) <= set(amax), sorted(set(MODULES) - set(amax))
    return amax


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG)).eval()
    randomize_routing(model)
    directory = tmp_path_factory.mktemp("modelopt") / "fp32"
    model.save_pretrained(directory)
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, CONFIG["vocab_size"], (2, 32), generator=generator) for _ in range(4)]
    tensors = load_file(str(directory / "model.safetensors"))
    return Source(model, directory, tensors, _input_amax(model, batches))


def _modelopt_nvfp4(weight: torch.Tensor) -> NVFP4Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ModelOpt warns about untested transformers versions on import
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    qtensor, block_scale, scale_2 = NVFP4QTensor.quantize(weight.clone(), 16)
    return NVFP4Tensor(qtensor._quantized_data, block_scale, scale_2)


def _ours(weight: torch.Tensor) -> NVFP4Tensor:
    return quantize_nvfp4(weight)


def export(source: Source, directory: Path, formats: Mapping[str, str | None], quant_config: dict[str, Any], *,
           in_config_json: bool = False, scalar_shape: tuple[int, ...] = (),
           quantizer: Quantizer = _ours) -> Path:
    """Rewrite the fp32 checkpoint as ModelOpt exports it: `formats` maps each linear module to
    NVFP4, FP8 or None (kept float)."""
    tensors = dict(source.tensors)
    for module, algo in formats.items():
        if algo is None:
            continue
        weight = tensors.pop(f"{module}.weight").clone()  # the quantizers must not touch the source
        if algo == "NVFP4":
            nvfp4 = quantizer(weight)
            tensors[f"{module}.weight"] = nvfp4.packed
            tensors[f"{module}.weight_scale"] = nvfp4.block_scale
            tensors[f"{module}.weight_scale_2"] = nvfp4.global_scale.reshape(scalar_shape)
        else:
            fp8 = quantize_fp8(weight)
            tensors[f"{module}.weight"] = fp8.data
            tensors[f"{module}.weight_scale"] = fp8.scale.reshape(scalar_shape)
        input_scale = torch.tensor(source.amax[module] / FORMAT_MAX[algo], dtype=torch.float32)
        tensors[f"{module}.input_scale"] = input_scale.reshape(scalar_shape)
    directory.mkdir(parents=True)
    config = json.loads((source.directory / "config.json").read_text())
    wrapped = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": quant_config}
    if in_config_json:
        config["quantization_config"] = {**quant_config, "quant_method": "modelopt"}
    else:
        (directory / "hf_quant_config.json").write_text(json.dumps(wrapped, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def nvfp4_formats() -> dict[str, str | None]:
    return {m: None if m == "lm_head" or m.startswith("backbone.layers.1.") else "NVFP4" for m in MODULES}


def nvfp4_config() -> dict[str, Any]:
    return {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": NVFP4_EXCLUDE}


# MIXED_PRECISION as the released Nemotron checkpoints: NVFP4 routed experts, FP8 Mamba and
# shared experts, the rest float.
def mixed_formats() -> dict[str, str | None]:
    formats: dict[str, str | None] = dict.fromkeys(MODULES)
    for module in MODULES:
        if ".experts." in module:
            formats[module] = "NVFP4"
        elif "shared_experts" in module or module.startswith("backbone.layers.0."):
            formats[module] = "FP8"
    return formats


def mixed_config() -> dict[str, Any]:
    layers = {m: ({"quant_algo": "NVFP4", "group_size": 16} if algo == "NVFP4" else {"quant_algo": "FP8"})
              for m, algo in mixed_formats().items() if algo is not None}
    return {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}


@dataclass(frozen=True)
class Built:
    checkpoint: Path
    engine: Path
    result: BuildResult


@pytest.fixture(scope="session")
def exports(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Built]:
    """Checkpoint variant x target -> its build, made once per session."""
    root = tmp_path_factory.mktemp("exports")
    variants: dict[str, Callable[[Path], Path]] = {
        "nvfp4": lambda d: export(source, d, nvfp4_formats(), nvfp4_config()),
        "nvfp4-modelopt": lambda d: export(source, d, nvfp4_formats(), nvfp4_config(), quantizer=_modelopt_nvfp4),
        "nvfp4-in-config": lambda d: export(source, d, nvfp4_formats(), nvfp4_config(), in_config_json=True),
        "nvfp4-shape-1": lambda d: export(source, d, nvfp4_formats(), nvfp4_config(), scalar_shape=(1,)),
        "fp8": lambda d: export(source, d, {m: None if m == "lm_head" else "FP8" for m in MODULES},
                                {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}),
        "mixed": lambda d: export(source, d, mixed_formats(), mixed_config()),
    }
    checkpoints: dict[str, Path] = {}
    builds: dict[tuple[str, str], Built] = {}

    def get(variant: str, target: str) -> Built:
        if variant not in checkpoints:
            checkpoints[variant] = variants[variant](root / variant)
        if (variant, target) not in builds:
            engine = root / f"{variant}-{target}-engine"
            result = nemocompile.build(checkpoints[variant], engine, target=target)
            builds[variant, target] = Built(checkpoints[variant], engine, result)
        return builds[variant, target]

    return get


# ---------------------------------------------------------------------------------------------
# helpers


def engine_tensors(engine: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(engine / WEIGHTS_FILE), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so equality is bit for bit (float8 and -0.0/NaN included)."""
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def expected_component(stored: Mapping[str, torch.Tensor], weight: str, component: str) -> torch.Tensor:
    """A graph weight's component as the checkpoint holds it, stacked over experts; scalars as 0-d."""
    parts = [stored[f"{module}.{component}"] for module in GEMMS[weight]]
    parts = [p.reshape(()) if p.numel() == 1 and component != "weight" else p for p in parts]
    return torch.stack(parts) if len(parts) > 1 else parts[0]


def engine_name(weight: str, component: str) -> str:
    return weight if component == "weight" else f"{weight}.{component}"


def assert_taken_bit_for_bit(built: Built, formats: Mapping[str, str | None]) -> list[str]:
    """Every quantized module's tensors are in the engine as stored; returns the weights checked."""
    stored = checkpoint_tensors(built.checkpoint)
    engine = engine_tensors(built.engine)
    checked = []
    for weight, modules in GEMMS.items():
        algo = formats[modules[0]]
        if algo is None:
            continue
        components = ["weight", "weight_scale", "input_scale"] + (["weight_scale_2"] if algo == "NVFP4" else [])
        for component in components:
            expected = expected_component(stored, weight, component)
            got = engine[engine_name(weight, component)]
            assert got.dtype == expected.dtype, f"{weight} {component}: {got.dtype} != {expected.dtype}"
            assert got.shape == expected.shape, f"{weight} {component}: {list(got.shape)} != {list(expected.shape)}"
            assert torch.equal(bits(got), bits(expected)), f"{weight} {component} differs from the checkpoint"
        checked.append(weight)
    return checked


def graph_dtypes(engine: Path) -> dict[str, str]:
    loaded = nemocompile.load(engine)
    return {w.name: w.type.dtype.name for w in loaded.graph.weights}


def prompt() -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------
# tests


def test_source_model_routes_to_every_expert(source: Source) -> None:
    """The input scales are real: every expert saw tokens, and the amaxes differ per expert."""
    ups = [source.amax[f"backbone.layers.2.mixer.experts.{e}.down_proj"] for e in range(EXPERTS)]
    assert all(a > 0 for a in ups) and len(set(ups)) == EXPERTS


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_nvfp4_checkpoint_is_taken_bit_for_bit(exports: Callable[[str, str], Built], target: str) -> None:
    built = exports("nvfp4", target)
    checked = assert_taken_bit_for_bit(built, nvfp4_formats())
    assert "layers.2.mixer.experts_up" in checked and "layers.0.mixer.in_proj" in checked
    dtypes = graph_dtypes(built.engine)
    assert all(dtypes[w] == "nvfp4" for w in checked)
    assert built.result.errors == []  # nothing was quantized by us


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_modelopt_quantized_checkpoint_is_taken_bit_for_bit(exports: Callable[[str, str], Built],
                                                            target: str) -> None:
    pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor",
                        reason="this variant's tensors are quantized by ModelOpt's NVFP4QTensor itself")
    built = exports("nvfp4-modelopt", target)
    assert len(assert_taken_bit_for_bit(built, nvfp4_formats())) == len(GEMMS) - len(ATTENTION) - 1
    # ModelOpt's own bytes and ours are the same export
    ours = engine_tensors(exports("nvfp4", target).engine)
    theirs = engine_tensors(built.engine)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(bits(ours[n]), bits(theirs[n])) for n in ours)


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_fp8_checkpoint_is_taken_bit_for_bit(exports: Callable[[str, str], Built], target: str) -> None:
    built = exports("fp8", target)
    checked = assert_taken_bit_for_bit(built, {m: None if m == "lm_head" else "FP8" for m in MODULES})
    assert set(checked) == set(GEMMS) - {"lm_head"}
    dtypes = graph_dtypes(built.engine)
    assert all(dtypes[w] == "fp8" for w in checked)
    assert dtypes["lm_head"] == "bf16"
    assert built.result.errors == []


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_mixed_precision_checkpoint_keeps_each_layers_format(exports: Callable[[str, str], Built],
                                                             target: str) -> None:
    built = exports("mixed", target)
    checked = assert_taken_bit_for_bit(built, mixed_formats())
    dtypes = graph_dtypes(built.engine)
    assert {w: dtypes[w] for w in checked} == {
        "layers.0.mixer.in_proj": "fp8", "layers.0.mixer.out_proj": "fp8",
        "layers.2.mixer.experts_up": "nvfp4", "layers.2.mixer.experts_down": "nvfp4",
        "layers.2.mixer.shared_up": "fp8", "layers.2.mixer.shared_down": "fp8",
    }
    # not listed in quantized_layers: float, whatever the target's policy would pick for a float checkpoint
    assert dtypes["layers.3.mixer.up_proj"] == dtypes["layers.1.mixer.q_proj"] == "bf16"
    assert built.result.errors == []


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_excluded_modules_stay_unquantized(exports: Callable[[str, str], Built], source: Source,
                                           target: str) -> None:
    built = exports("nvfp4", target)
    dtypes = graph_dtypes(built.engine)
    engine = engine_tensors(built.engine)
    for weight in [*ATTENTION, "lm_head"]:
        assert dtypes[weight] == "bf16", weight
        (module,) = GEMMS[weight]
        assert torch.equal(engine[weight], source.tensors[f"{module}.weight"].to(torch.bfloat16)), weight
        assert f"{weight}.weight_scale" not in engine and f"{weight}.input_scale" not in engine


def test_quantization_config_in_config_json_reads_as_hf_quant_config(exports: Callable[[str, str], Built]) -> None:
    in_file = exports("nvfp4", "b200")
    in_config = exports("nvfp4-in-config", "b200")
    assert not (in_config.checkpoint / "hf_quant_config.json").exists()
    assert (in_config.engine / WEIGHTS_FILE).read_bytes() == (in_file.engine / WEIGHTS_FILE).read_bytes()
    assert (in_config.engine / "graph.txt").read_text() == (in_file.engine / "graph.txt").read_text()


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_scalars_exported_as_shape_one_are_accepted(exports: Callable[[str, str], Built], target: str) -> None:
    built = exports("nvfp4-shape-1", target)
    stored = checkpoint_tensors(built.checkpoint)
    assert stored["backbone.layers.0.mixer.in_proj.weight_scale_2"].shape == (1,)
    assert stored["backbone.layers.0.mixer.in_proj.input_scale"].shape == (1,)
    assert_taken_bit_for_bit(built, nvfp4_formats())
    engine = engine_tensors(built.engine)
    assert engine["layers.0.mixer.in_proj.weight_scale_2"].shape == ()
    assert engine["layers.2.mixer.experts_up.weight_scale_2"].shape == (EXPERTS,)
    assert engine["layers.2.mixer.experts_up.input_scale"].shape == (EXPERTS,)
    # the same engine weights as the 0-d export
    reference = engine_tensors(exports("nvfp4", target).engine)
    assert all(torch.equal(bits(engine[n]), bits(reference[n])) for n in reference)


def test_input_scales_are_carried_as_graph_weights(exports: Callable[[str, str], Built]) -> None:
    built = exports("nvfp4", "b200")
    text = (built.engine / "graph.txt").read_text()
    # W4A4 experts on Blackwell read the checkpoint's scale, not one of our own calibration (the fused
    # up-GEMM quantizes its rows on load with it)
    assert re.search(r"= moe_expert_up\([^)]*, %layers\.2\.mixer\.experts_up\.input_scale\) "
                     r'\{act_format = "nvfp4"', text)
    weights = nemocompile.load(built.engine).graph.weight_map()
    scale = weights["layers.2.mixer.experts_up.input_scale"]
    assert scale.category == "activation_scales" and scale.type.shape == (EXPERTS,)


@pytest.mark.parametrize("variant", ["nvfp4", "fp8", "mixed"])
@pytest.mark.parametrize("target", ["b200", "h100"])
def test_engine_runs_close_to_the_fp32_model(exports: Callable[[str, str], Built], source: Source, variant: str,
                                             target: str) -> None:
    ids = prompt()
    with torch.no_grad():
        expected = source.model(ids).logits.float()
    got = nemocompile.load(exports(variant, target).engine).forward(ids)
    assert got.shape == expected.shape and bool(torch.isfinite(got).all())
    # loose: weights (and on b200 some activations) are 4 or 8 bits; logits keep their direction
    relative = float((got - expected).norm() / expected.norm())
    assert relative < (0.35 if variant != "fp8" else 0.1), relative
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert float(cosine) > 0.95


def test_nvfp4_engine_weights_dequantize_near_the_source(exports: Callable[[str, str], Built],
                                                         source: Source) -> None:
    """What the engine holds is a faithful NVFP4 copy of the fp32 weight (not, say, transposed)."""
    engine = engine_tensors(exports("nvfp4", "h100").engine)
    weight = NVFP4Tensor(engine["layers.2.mixer.experts_down"], engine["layers.2.mixer.experts_down.weight_scale"],
                         engine["layers.2.mixer.experts_down.weight_scale_2"])
    truth = torch.stack([source.tensors[f"{m}.weight"] for m in GEMMS["layers.2.mixer.experts_down"]])
    relative = float((dequantize_nvfp4(weight) - truth).norm() / truth.norm())
    assert 0.03 < relative < 0.2


@pytest.mark.parametrize("target", ["b200", "h100"])
def test_report_lists_the_weights_as_stored(exports: Callable[[str, str], Built], target: str) -> None:
    report = (exports("mixed", target).engine / "report.md").read_text()
    experts_act = "nvfp4" if target == "b200" else "bf16"
    assert f"| layers.2.mixer.experts_up | nvfp4 | {experts_act} |" in report
    assert "| layers.0.mixer.in_proj | fp8 | fp8 |" in report
    assert "| layers.3.mixer.up_proj | bf16 | bf16 |" in report
    # nothing was quantized by the build, so no weight has a quantization error of ours to show
    assert "## Quantization error per weight" not in report
    # a checkpoint stored in another format than the policy's is said so, weight by weight
    nvfp4_report = (exports("nvfp4", target).engine / "report.md").read_text()
    assert "layers.0.mixer.in_proj: kept as stored (nvfp4)" in nvfp4_report
    assert "| layers.0.mixer.in_proj | nvfp4 |" in nvfp4_report


def test_report_does_not_claim_a_float_comparison_it_did_not_make(exports: Callable[[str, str], Built]) -> None:
    """A ModelOpt checkpoint has no float weights: its "float engine" would be the same NVFP4
    weights, so an agreement of 1.0 / KL 0 "against the bf16 engine" compares it with itself."""
    result = exports("nvfp4", "h100").result
    report = (exports("nvfp4", "h100").engine / "report.md").read_text()
    claimed = result.agreement is not None and "bf16 engine" in result.agreement.reference
    assert not claimed, (f"agreement {result.agreement} is reported against a bf16 engine, but both sides ran "
                         "the checkpoint's NVFP4 weights")
    assert "against the bf16 engine" not in report


def test_build_is_refused_when_the_experts_of_a_layer_mix_formats(source: Source, tmp_path: Path) -> None:
    formats = mixed_formats()
    formats["backbone.layers.2.mixer.experts.3.up_proj"] = "FP8"
    config = mixed_config()
    config["quantized_layers"]["backbone.layers.2.mixer.experts.3.up_proj"] = {"quant_algo": "FP8"}
    checkpoint = export(source, tmp_path / "mixed-experts", formats, config)
    with pytest.raises(CheckpointError, match=r"experts of backbone\.layers\.2\.mixer mix"):
        nemocompile.build(checkpoint, tmp_path / "engine", target="b200")
    assert not (tmp_path / "engine").exists()


def _iter_names(engine: Path) -> Iterator[str]:
    with safe_open(str(engine / WEIGHTS_FILE), "pt") as handle:
        yield from handle.keys()


def test_nothing_is_requantized_or_calibrated(exports: Callable[[str, str], Built]) -> None:
    """The b200 NVFP4 engine holds exactly the checkpoint's tensors (plus float conversions):
    no extra input scale was calibrated for a weight the checkpoint quantized."""
    built = exports("nvfp4", "b200")
    names = set(_iter_names(built.engine))
    scales = {n for n in names if n.endswith(".input_scale")}
    assert scales == {f"{w}.input_scale" for w, modules in GEMMS.items() if nvfp4_formats()[modules[0]]}
