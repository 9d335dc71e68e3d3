"""Real ModelOpt 0.47 exports, made in the test by `mtq.quantize` + `export_hf_checkpoint` on
random tiny transformers NemotronH models (tests/modelopt_exports.py), built unmodified and run
with ModelOpt's own numerics: the reference is ModelOpt's fake-quantized model's logits.

NVFP4 fake quantization is CUDA-only in ModelOpt 0.47: while these exports are made, an exact CPU
equivalent built on ModelOpt's own NVFP4QTensor stands in for its Triton kernel (see
tests/modelopt_exports.py); `test_cpu_nvfp4_stand_in_is_what_modelopt_exports` checks it against
the weights ModelOpt's export itself writes."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import nemocompile
from nemocompile.base.errors import CheckpointError
from nemocompile.cli import main
from nemocompile.driver import BuildResult
from nemocompile.graph.modelopt import QUANT_CONFIG_FILE
from nemocompile.runtime.formats import NVFP4Tensor, dequantize_nvfp4

pytest.importorskip("modelopt", reason="the exports are made by NVIDIA ModelOpt")
from modelopt_exports import Export, cpu_nvfp4_fake_quantization, export_maker, random_model, relative_error

# fp32 engines run ModelOpt's numerics; what they may differ by is float summation order
RELATIVE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Built:
    export: Export
    result: BuildResult
    logits: torch.Tensor  # the engine's, on the export's prompt

    @property
    def report(self) -> str:
        return (self.result.out / "report.md").read_text()



@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Export]:
    return export_maker(tmp_path_factory)


@pytest.fixture(scope="session")
def built(exports: Callable[[str], Export], tmp_path_factory: pytest.TempPathFactory
          ) -> Callable[[str, str, str], Built]:
    engines: dict[tuple[str, str, str], Built] = {}

    def get(recipe: str, target: str, precision: str = "fp32") -> Built:
        key = (recipe, target, precision)
        if key not in engines:
            export = exports(recipe)
            out = tmp_path_factory.mktemp(f"engine-{recipe}-{target}-{precision}") / "engine"
            result = nemocompile.build(export.directory, out, target=target, precision=precision)
            logits = nemocompile.load(out).forward(export.prompt.tolist())
            engines[key] = Built(export, result, logits)
        return engines[key]
    return get


def graph_text(built: Built) -> str:
    return (built.result.out / "graph.txt").read_text()


@pytest.mark.parametrize(("recipe", "target"), [("fp8", "h100"), ("fp8", "b200"), ("nvfp4", "b200"),
                                                ("mixed", "b200")])
def test_export_runs_modelopts_numerics(built: Callable[[str, str, str], Built], recipe: str, target: str) -> None:
    engine = built(recipe, target, "fp32")
    error = relative_error(engine.logits, engine.export.logits)
    print(f"\n{recipe} on {target}, fp32: max |engine - ModelOpt| / max |ModelOpt| = {error:.3g}")
    assert error < RELATIVE_TOLERANCE
    assert torch.equal(engine.logits.argmax(-1), engine.export.logits.argmax(-1))


@pytest.mark.parametrize("recipe", ["nvfp4", "mixed"])
def test_nvfp4_on_hopper_builds_and_reports_its_deviation(built: Callable[[str, str, str], Built],
                                                          recipe: str) -> None:
    engine = built(recipe, "h100", "fp32")
    error = relative_error(engine.logits, engine.export.logits)
    deviation = engine.result.deviation
    assert deviation is not None
    print(f"\n{recipe} on h100 (NVFP4 runs W4A16): max relative logit error {error:.3g}; report: top-1 "
          f"{deviation.top1:.4f}, mean KL {deviation.mean_kl:.3g}, relative logit error {deviation.rel_error:.3g}")
    assert error > RELATIVE_TOLERANCE  # the activations are not quantized: it is measurably not the export
    assert deviation.rel_error > RELATIVE_TOLERANCE and deviation.mean_kl > 0
    report = engine.report
    assert "## Deviation from the checkpoint's own numerics" in report
    assert f"- top-1 agreement: {deviation.top1:.4f}" in report
    assert f"- relative logit error: {deviation.rel_error:.6f}" in report
    assert "which this target cannot compute in: it runs weight-only" in report
    # the FP8 GEMMs of the mixed recipe still quantize their activations on Hopper
    if recipe == "mixed":
        # (the fusions fold each quantize into its GEMM or the norm before it: act_format = "fp8")
        assert 'act_format = "fp8"' in graph_text(engine)
        assert 'format = "nvfp4"' not in graph_text(engine)


@pytest.mark.parametrize(("recipe", "target"), [("fp8", "b200"), ("nvfp4", "b200"), ("mixed", "b200")])
def test_engine_on_its_exported_numerics_reports_no_deviation(built: Callable[[str, str, str], Built],
                                                              recipe: str, target: str) -> None:
    engine = built(recipe, target, "fp32")
    assert engine.result.deviation is None
    assert "- none: every GEMM runs as exported" in engine.report


def test_every_input_scale_quantizes_its_gemm_whatever_the_float_base(built: Callable[[str, str, str], Built]
                                                                      ) -> None:
    """The float base applies to the float parts only: bf16 and fp32 engines of the FP8 export
    quantize the same activations, with the checkpoint's own input_scale."""
    tensors = load_file(str(built("fp8", "h100", "fp32").export.directory / "model.safetensors"))
    # one input_scale per linear, one per stack of experts
    scales = sum(name.endswith(".input_scale") and (".experts." not in name or ".experts.0." in name)
                 for name in tensors)
    for precision in ("fp32", "bf16"):
        text = graph_text(built("fp8", "h100", precision))
        # each quantization once: a quantize op, or a fused GEMM / norm's act_format (the quant_linear
        # reading a fused norm's E4M3 codes repeats the norm's act_format: it quantizes nothing)
        norm_codes = len(re.findall(r'= add_rms_norm\([^)]*\) \{act_format = "fp8"', text))
        assert text.count('format = "fp8"') - norm_codes == scales, precision
        assert built("fp8", "h100", precision).result.calibration is None  # every scale is the checkpoint's
    bf16 = built("fp8", "h100", "bf16")
    error = relative_error(bf16.logits, bf16.export.logits)
    print(f"\nfp8 on h100, bf16 base: max relative logit error {error:.3g}")
    assert error < 0.05


def test_nul_suffixed_module_names_are_tolerated_and_noted(built: Callable[[str, str, str], Built]) -> None:
    engine = built("nvfp4", "b200", "fp32")
    config = json.loads((engine.export.directory / QUANT_CONFIG_FILE).read_text())
    assert any("\x00" in name for name in config["quantization"]["exclude_modules"])  # the quirk is real
    assert "lm_head | f32 | f32 |" in engine.report  # excluded: kept float
    assert "## Checkpoint quirks tolerated" in engine.report
    assert "NUL-separated suffix" in engine.report


def test_cpu_nvfp4_stand_in_is_what_modelopt_exports(exports: Callable[[str], Export]) -> None:
    """The stand-in's fake-quantized weights equal, bit for bit, the weights ModelOpt's export
    wrote (NVFP4QTensor), where a module's global scale is its own (q/k/v share theirs)."""
    export = exports("nvfp4")
    tensors = load_file(str(export.directory / "model.safetensors"))
    source = random_model(0).state_dict()
    checked = 0
    for name in ("layers.0.mixer.in_proj", "layers.0.mixer.out_proj", "layers.1.mixer.o_proj",
                 "layers.3.mixer.up_proj", "layers.3.mixer.down_proj"):
        stored = f"backbone.{name}"
        exported = dequantize_nvfp4(NVFP4Tensor(tensors[f"{stored}.weight"], tensors[f"{stored}.weight_scale"],
                                                tensors[f"{stored}.weight_scale_2"]))
        weight = source[f"model.{name}.weight"]
        assert torch.equal(cpu_nvfp4_fake_quantization(weight, weight.abs().max()), exported), name
        checked += 1
    assert checked == 5


def _edited_copy(export: Export, directory: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    shutil.copytree(export.directory, directory)
    path = directory / QUANT_CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config["quantization"])
    path.write_text(json.dumps(config))
    return directory


def test_config_disagreeing_with_the_tensors_is_refused_naming_every_disagreement(
        exports: Callable[[str], Export], tmp_path: Path) -> None:
    def edit(section: dict[str, Any]) -> None:
        layers = section["quantized_layers"]
        # the config claims FP8 for attention (float in the tensors) and NVFP4 for the Mamba in_proj (FP8)
        layers["backbone.layers.1.mixer.q_proj"] = {"quant_algo": "FP8"}
        in_proj = next(name for name in layers if name.startswith("backbone.layers.0.mixer.in_proj"))
        layers[in_proj] = {"quant_algo": "NVFP4", "group_size": 16}
        # and forgets the dense MLP's down projection (FP8 in the tensors)
        del layers[next(name for name in layers if name.startswith("backbone.layers.3.mixer.down_proj"))]

    model = _edited_copy(exports("mixed"), tmp_path / "edited", edit)
    with pytest.raises(CheckpointError) as caught:
        nemocompile.build(model, tmp_path / "engine", target="b200")
    message = str(caught.value)
    assert "\n" not in message and "\x00" not in message
    for named in ("backbone.layers.1.mixer.q_proj holds unquantized tensors", "but is FP8",
                  "backbone.layers.0.mixer.in_proj holds FP8 tensors", "but is NVFP4",
                  "backbone.layers.3.mixer.down_proj holds FP8 tensors", "but is unquantized"):
        assert named in message, f"{named!r} not in: {message}"
    assert not (tmp_path / "engine").exists()


def test_quantized_tensors_without_any_quantization_config_are_refused(exports: Callable[[str], Export],
                                                                       tmp_path: Path) -> None:
    model = tmp_path / "no-config"
    shutil.copytree(exports("fp8").directory, model)
    (model / QUANT_CONFIG_FILE).unlink()
    config = json.loads((model / "config.json").read_text())
    del config["quantization_config"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds FP8 tensors .* but is unquantized: the checkpoint has no quantization"):
        nemocompile.build(model, tmp_path / "engine", target="h100")


def test_a_float_weight_with_a_weight_scale_is_refused_as_ambiguous(exports: Callable[[str], Export],
                                                                    tmp_path: Path) -> None:
    model = tmp_path / "ambiguous"
    shutil.copytree(exports("mixed").directory, model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["backbone.layers.1.mixer.q_proj.weight_scale"] = torch.tensor(0.01)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.1\.mixer\.q_proj\.weight is F32 .* "
                                              r"backbone\.layers\.1\.mixer\.q_proj\.weight_scale"):
        nemocompile.build(model, tmp_path / "engine", target="b200")


def test_group_size_other_than_nvfp4s_block_is_refused(exports: Callable[[str], Export], tmp_path: Path) -> None:
    def edit(section: dict[str, Any]) -> None:
        section["group_size"] = 32

    model = _edited_copy(exports("nvfp4"), tmp_path / "group32", edit)
    with pytest.raises(CheckpointError, match="group_size 32 is not NVFP4's block of 16"):
        nemocompile.build(model, tmp_path / "engine", target="b200")


def test_build_json_carries_the_deviation(exports: Callable[[str], Export], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(exports("nvfp4").directory), "--target", "h100",
                                       "-o", str(tmp_path / "engine"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    deviation = summary["deviation"]
    assert deviation["reference"].startswith("the checkpoint's own numerics")
    assert deviation["relative_logit_error"] > RELATIVE_TOLERANCE and 0 < deviation["top1_agreement"] <= 1


def test_w4a4_norm_hands_nvfp4_codes_and_runs_on_the_triton_backend(built: Callable[[str, str, str], Built]) -> None:
    """ModelOpt's NVFP4 recipe makes every linear W4A4, so on b200 the dense MLP layer's norm quantizes
    its output for the up_proj (`%55, %9 = add_rms_norm(...) {act_format = "nvfp4"}` in a real
    export): it writes NVFP4 codes (nvfp4codes: packed E2M1 + E4M3 block scales), which a
    quant_linear with the same input_scale reads. With backend="triton" (this CPU: the interpreter)
    the norm runs its kernel and the GEMM the dense W4A4 kernel in its codes mode (the codes and block
    scales loaded as they are), and the engine matches backend="reference": logits error printed,
    8 greedy tokens identical (and with the decode step compiled)."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package (the [triton] extra)")
    engine = built("nvfp4", "b200", "fp32")
    text = graph_text(engine)
    norms = re.findall(r'%(\S+), %\S+ = add_rms_norm\(.*?(%\S+)\) \{act_format = "nvfp4".*: tensor<nvfp4codes,', text)
    assert len(norms) == 1  # the MLP layer's (the MoE layer's norm feeds the router too; layer 0 has none)
    codes, scale = norms[0]
    assert re.search(rf'= quant_linear\(%{re.escape(codes)}, %layers\.3\.mixer\.up_proj, {re.escape(scale)}, _\) '
                     r'\{act_format = "nvfp4"', text)
    reference = nemocompile.load(engine.result.out, backend="reference")
    triton = nemocompile.load(engine.result.out, backend="triton")
    norm_kernels = {r.kernel for r in triton.kernels() if r.op == "add_rms_norm"}
    assert norm_kernels == {"triton_add_rms_norm"} and all(r.fallback is None for r in triton.kernels())
    # the quant_linear reading the codes runs the dense W4A4 kernel in its codes mode (x pointer u8)
    gemm = re.search(rf'%(\S+) = quant_linear\(%{re.escape(codes)}, [^)]*\) \{{act_format = "nvfp4", '
                     r'kernel = "triton_nvfp4_quant_linear_w4a4"', text)
    assert gemm is not None
    index = json.loads((engine.result.out / "kernels" / "kernels.json").read_text())
    signatures = {k["name"]: k["signature"] for k in index["kernels"]}
    bound = index["bindings"]["prefill"][gemm.group(1)]
    assert signatures[bound[0]]["x_ptr"] == "*u8" and signatures[bound[0]]["x_scale_ptr"] == "*fp8e4nv"
    prompt = engine.export.prompt
    expected, got = reference.forward(prompt), triton.forward(prompt)
    error = relative_error(got, expected)
    print(f"\nnvfp4 on b200, triton (interpreter) vs reference: max relative logit error {error:.3g}")
    assert error < 1e-3
    tokens = reference.generate(prompt, 8)
    assert torch.equal(triton.generate(prompt, 8), tokens)
    # the compiled CPU decode step keeps the quantizing norm and its GEMM eager, and hands the codes on
    assert torch.equal(nemocompile.load(engine.result.out, compile=True).generate(prompt, 8), tokens)


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_nvfp4_export_runs_every_dense_gemm_on_a_triton_kernel(built: Callable[[str, str, str], Built],
                                                               target: str) -> None:
    """ModelOpt's NVFP4_DEFAULT_CFG export (every linear NVFP4) as a bf16 engine: on h100 each dense
    GEMM is `linear` with an NVFP4 weight (W4A16), on b200 `quant_linear {act_format nvfp4}` (W4A4).
    None may be left on its reference implementation: the b200 quant_linear that reads a fused
    norm's NVFP4 codes runs the dense W4A4 kernel in its codes mode; the triton backend (Triton's
    interpreter) matches the reference backend: logits within 2% of the largest, 8 greedy tokens
    identical."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package (the [triton] extra)")
    from nemocompile.graph.kernels import REFERENCE, kernel_of
    from nemocompile.graph.types import NVFP4, NVFP4_CODES

    engine = built("nvfp4", target, "bf16")
    index = json.loads((engine.result.out / "kernels" / "kernels.json").read_text())
    assert index["fallbacks"] == []
    triton = nemocompile.load(engine.result.out, backend="triton")
    reference = nemocompile.load(engine.result.out, backend="reference")
    dense: dict[str, int] = {}
    codes_input = 0
    for graph in (triton.graph, triton.decode_graph):
        types = graph.value_types()
        for op in graph.ops:
            weight = op.operands[1] if op.opname in ("linear", "quant_linear") else None
            if weight is None or types[weight].dtype != NVFP4:
                continue
            x = op.operands[0]
            assert x is not None
            if types[x].dtype == NVFP4_CODES:
                assert kernel_of(op) == "triton_nvfp4_quant_linear_w4a4", f"{op.opname} at {op.scope}"
                codes_input += 1
                continue
            assert kernel_of(op) != REFERENCE, f"{op.opname} at {op.scope} runs its reference"
            dense[kernel_of(op)] = dense.get(kernel_of(op), 0) + 1
    expected = {"h100": {"triton_nvfp4_linear_w4a16"}, "b200": {"triton_nvfp4_quant_linear_w4a4"}}[target]
    assert set(dense) == expected and codes_input == {"h100": 0, "b200": 2}[target], (dense, codes_input)
    resolutions = triton.kernels()
    assert all(r.kernel == r.requested for r in resolutions), [(r.op, r.fallback) for r in resolutions if r.fallback]
    prompt = [row[:12] for row in engine.export.prompt.tolist()]  # (the interpreter's time grows with tokens)
    want, got = reference.forward(prompt), triton.forward(prompt)
    error, scale = float((want - got).abs().max()), float(want.abs().max())
    print(f"\nnvfp4 export on {target} (bf16): dense NVFP4 GEMMs per kernel {dense} (and {codes_input} reading "
          f"norm codes); logits max |triton - "
          f"reference| = {error:.3g} (max |logit| {scale:.3g}, {error / scale:.2%})")
    assert error <= 0.02 * scale
    prompts = [prompt[0][:5], prompt[1]]  # a mixed-length batch: right-padded prefill, then decode
    assert reference.complete(prompts, 8) == triton.complete(prompts, 8)
