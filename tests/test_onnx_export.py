"""The ONNX export for TensorRT (`build --tensorrt`), checked by others' tools: ONNX's checker with
full_check on both forms (plugin and decomposed) of both graphs, for the demo and a random tiny
transformers checkpoint built for h100 and b200; the decomposed export run by onnxruntime (FP32,
BF16, FP8) or ONNX's reference evaluator (NVFP4) against the reference runtime, logits and 8 greedy
tokens with the state outputs fed back; TensorRT's documented parser support for every standard op
of the plugin export; and the bad inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX export needs the onnx package (the [onnx] extra)")
pytest.importorskip("onnxruntime", reason="backend='onnx' runs onnxruntime (the [onnx] extra)")

import nemocompile  # noqa: E402
from nemocompile.base.errors import EngineError, IRError, UsageError  # noqa: E402
from nemocompile.codegen.tensorrt.export import DECOMPOSED, TENSORRT, export_graph  # noqa: E402
from nemocompile.codegen.tensorrt.onnx_graph import CUSTOM_DOMAIN, OPSET, TRT_DOMAIN  # noqa: E402
from nemocompile.codegen.tensorrt.plugins import PLUGIN_OPS  # noqa: E402
from nemocompile.graph.importer import import_checkpoint  # noqa: E402
from nemocompile.runtime.onnx_backend import ORT, REFERENCE, OnnxEngine  # noqa: E402

TINY: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=32, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    chunk_size=4, conv_kernel=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, dtype="float32",
)
GREEDY_STEPS = 8
# Logits of the decomposed export against the reference runtime, as a fraction of the largest
# logit: float engines agree to float32 rounding (the export computes bf16 ops in float32 and
# rounds each result to bf16, as the reference does); in a quantized engine a one-ulp difference
# of a bf16 value (float32 summation order, e.g. in the SSD einsums) can move an activation across
# an FP8/NVFP4 rounding boundary, which changes it by one quantization step.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "auto": 5e-2}

# TensorRT's ONNX parser: the operators onnx-tensorrt's docs/operators.md lists as supported for
# TensorRT 10.15 (parser opsets 9-24), https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md,
# restricted to the ones this export can emit. Conditions that matter here: TopK needs K < 3840 and
# sorted output; CumSum a constant axis; ScatterND no reduction; DequantizeLinear/QuantizeLinear
# FP8 and FP4 (blocked) from TensorRT 10.8; Einsum and Softplus supported.
TENSORRT_PARSER_OPS = frozenset({
    "Abs", "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "CumSum", "DequantizeLinear",
    "Div", "Einsum", "Equal", "Exp", "Expand", "Gather", "GatherElements", "Greater", "GreaterOrEqual", "Identity",
    "LessOrEqual", "MatMul", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "QuantizeLinear", "Range", "Reciprocal",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "ScatterElements", "ScatterND", "Shape", "Sigmoid",
    "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where",
})
TENSORRT_CUSTOM_OPS = {(CUSTOM_DOMAIN, op) for op in PLUGIN_OPS} | {(TRT_DOMAIN, "TRT_FP4DynamicQuantize")}


@dataclass(frozen=True)
class Built:
    engine: Path
    precision: str
    skipped: str


def _build(checkpoint: Path | None, out: Path, target: str, precision: str = "auto") -> Built:
    result = nemocompile.build(checkpoint, out, target=target, precision=precision, tensorrt=True, calibrate=2,
                               max_context=256)
    return Built(out, precision, result.tensorrt_skipped)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers", reason="the checkpoint is saved by NemotronHForCausalLM")
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**TINY))
    with torch.no_grad():  # non-trivial routing: the default router weights are zeros
        model.model.layers[2].mixer.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    out = tmp_path_factory.mktemp("onnx-tiny") / "tiny"
    model.save_pretrained(out)
    return out


ENGINES = ["demo-h100", "demo-b200", "tiny-h100", "tiny-b200", "tiny-fp32", "demo-bf16"]


@pytest.fixture(scope="session")
def engines(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("onnx-engines")
    built: dict[str, Built] = {}
    for name in ENGINES:
        source, setting = name.split("-")
        checkpoint = tiny_checkpoint if source == "tiny" else None
        target, precision = (setting, "auto") if setting in ("h100", "b200") else ("h100", setting)
        built[name] = _build(checkpoint, root / name, target, precision)
    return built


def _models(engine: Path) -> dict[str, Path]:
    manifest = json.loads((engine / "manifest.json").read_text())
    return {key: engine / manifest["tensorrt"][key]
            for key in ("prefill", "decode", "prefill_decomposed", "decode_decomposed")}


@pytest.mark.parametrize("name", ENGINES)
def test_checker_full_check_passes_on_both_exports(engines: dict[str, Built], name: str) -> None:
    for key, path in _models(engines[name].engine).items():
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert model.opset_import[0].version == OPSET >= 23, key
        domains = {node.domain for node in model.graph.node}
        if key.endswith("_decomposed"):
            assert domains == {""}, f"{key} holds custom ops"
        else:
            assert CUSTOM_DOMAIN in domains, f"{key} holds no plugin op"


def test_manifest_hashes_every_onnx_file(engines: dict[str, Built]) -> None:
    engine = engines["demo-b200"].engine
    manifest = json.loads((engine / "manifest.json").read_text())
    files = manifest["tensorrt"]
    for key in ("prefill", "decode", "prefill_decomposed", "decode_decomposed", "data"):
        assert files[key] in manifest["files"], key
    assert files["opset"] == OPSET
    assert files["engine"] is None  # TensorRT is not installed here
    assert engines["demo-b200"].skipped.startswith("TensorRT is not installed: skipped")


def _plugin_model(engine: Path) -> Any:
    return onnx.load(str(_models(engine)["prefill"]), load_external_data=False)


def test_quantized_weights_are_dequantize_linear_of_fp4_and_fp8_initializers(engines: dict[str, Built]) -> None:
    model = _plugin_model(engines["demo-b200"].engine)
    types = {t.name: t.data_type for t in model.graph.initializer}
    fp4 = [name for name, kind in types.items() if kind == onnx.TensorProto.FLOAT4E2M1]
    fp8 = [name for name, kind in types.items() if kind == onnx.TensorProto.FLOAT8E4M3FN]
    assert "layers.0.mixer.in_proj" in fp8  # FP8 W8A8 Mamba projection
    assert "layers.0.mixer.in_proj.weight_scale" in types
    users = {name: [n.op_type for n in model.graph.node if name in n.input] for name in fp8}
    assert users["layers.0.mixer.in_proj"] == ["DequantizeLinear"]
    # the routed experts are NVFP4, but the MoE plugin reads their codes and scales itself
    assert fp4 and all(n.op_type == "FusedMoE" for name in fp4 for n in model.graph.node if name in n.input)
    decomposed = onnx.load(str(_models(engines["demo-b200"].engine)["prefill_decomposed"]), load_external_data=False)
    fp4_users = {n.op_type for n in decomposed.graph.node for name in fp4 if name in n.input}
    assert fp4_users == {"DequantizeLinear"}  # two-level: block scales dequantized by the global scale first
    quantize_ops = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_ops, "FP8 activation quantization is a Q/DQ pair"


def test_state_is_explicit_model_inputs_and_outputs(engines: dict[str, Built]) -> None:
    model = _plugin_model(engines["tiny-h100"].engine)
    inputs = {v.name for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    engine = nemocompile.load(engines["tiny-h100"].engine)
    for slot in engine.graph.states:
        assert slot.name in inputs and slot.update in outputs
    assert {"input_ids", "cache_lens"} <= inputs and "logits" in outputs


@pytest.mark.parametrize("name", ["demo-b200", "tiny-h100", "tiny-fp32", "demo-bf16"])
def test_decomposed_export_matches_reference_runtime(engines: dict[str, Built], name: str) -> None:
    built = engines[name]
    reference = nemocompile.load(built.engine)
    exported = nemocompile.load(built.engine, backend="onnx")
    assert isinstance(exported, OnnxEngine)
    quantized = built.precision == "auto"
    assert exported.runners == ((REFERENCE, REFERENCE) if quantized else (ORT, ORT))  # NVFP4: no ORT kernels
    ids = torch.randint(0, reference.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    expected, got = reference.forward(ids), exported.forward(ids)
    relative = float((got - expected).abs().max() / expected.abs().max())
    print(f"{name}: prefill logits max |diff| / max |logit| = {relative:.3g} (runner {exported.runners[0]})")
    assert relative <= TOLERANCE[built.precision]
    tokens, expected_tokens = exported.generate(ids, GREEDY_STEPS), reference.generate(ids, GREEDY_STEPS)
    assert torch.equal(tokens, expected_tokens), f"{name}: greedy tokens differ"


def test_plugin_free_ops_are_in_tensorrt_parser_support(engines: dict[str, Built]) -> None:
    for name in ("demo-h100", "demo-b200", "tiny-b200", "demo-bf16"):
        for key, path in _models(engines[name].engine).items():
            if key.endswith("_decomposed"):
                continue
            model = onnx.load(str(path), load_external_data=False)
            standard = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
            assert standard <= TENSORRT_PARSER_OPS, f"{name} {key}: {sorted(standard - TENSORRT_PARSER_OPS)}"
            custom = {(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")}
            assert custom <= TENSORRT_CUSTOM_OPS, sorted(custom - TENSORRT_CUSTOM_OPS)
            for node in model.graph.node:
                attrs = {a.name: a for a in node.attribute}
                if node.op_type == "TopK":
                    assert attrs["sorted"].i == 1
                if node.op_type == "TRT_FP4DynamicQuantize":
                    assert attrs["axis"].i == -1 and attrs["block_size"].i == 16
                if node.domain == CUSTOM_DOMAIN:
                    assert attrs["plugin_namespace"].s == CUSTOM_DOMAIN.encode() and attrs["plugin_version"].s == b"1"


def test_b200_export_quantizes_expert_activations_to_nvfp4_for_tensorrt(engines: dict[str, Built]) -> None:
    model = _plugin_model(engines["demo-b200"].engine)
    moe = [n for n in model.graph.node if n.op_type == "FusedMoE"]
    assert len(moe) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert attrs["weight_format"] == b"nvfp4" and attrs["act_format"] == b"nvfp4"
    hopper = _plugin_model(engines["demo-h100"].engine)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in
             next(n for n in hopper.graph.node if n.op_type == "FusedMoE").attribute}
    assert attrs["act_format"] == b"none"  # W4A16 on Hopper


# ---------------------------------------------------------------- bad input


def test_an_op_without_onnx_form_is_refused_by_name(tiny_checkpoint: Path) -> None:
    graph = import_checkpoint(tiny_checkpoint).graph  # block ops, not yet decomposed
    with pytest.raises(IRError, match=r"op 'mamba2_mixer' at layers\.0\.mixer has no ONNX form yet"):
        export_graph(graph, {}, DECOMPOSED)
    with pytest.raises(IRError, match="mode 'trt'"):
        export_graph(graph, {}, "trt")
    assert TENSORRT != DECOMPOSED


def test_altered_onnx_files_are_refused_on_load(engines: dict[str, Built], tmp_path: Path) -> None:
    import shutil

    for relative in ("tensorrt/model.decomposed.onnx", "tensorrt/weights.bin", "tensorrt/model.onnx"):
        copy = tmp_path / relative.replace("/", "_")
        shutil.copytree(engines["tiny-fp32"].engine, copy)
        target = copy / relative
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        for backend in ("onnx", "reference"):
            with pytest.raises(EngineError, match=f"engine file {relative} was changed after build"):
                nemocompile.load(copy, backend=backend)


def test_backends_refused_with_one_sentence(engines: dict[str, Built], tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="holds no TensorRT engine: TensorRT was not installed"):
        nemocompile.load(engines["tiny-fp32"].engine, backend="tensorrt")
    with pytest.raises(UsageError, match="backend must be one of reference, triton, onnx, tensorrt"):
        nemocompile.load(engines["tiny-fp32"].engine, backend="trt")
    plain = tmp_path / "plain"
    nemocompile.build(None, plain, target="h100", precision="fp32")
    with pytest.raises(EngineError, match="holds no ONNX export; build it with `nemocompile build --tensorrt`"):
        nemocompile.load(plain, backend="onnx")


def test_an_op_whose_lowering_is_missing_is_refused_before_the_engine_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nemocompile.codegen.tensorrt import export

    monkeypatch.delitem(export.STANDARD, "embedding")
    out = tmp_path / "engine"
    with pytest.raises(IRError, match=r"op 'embedding' at embeddings has no ONNX form yet"):
        nemocompile.build(None, out, target="h100", precision="fp32", tensorrt=True)
    assert not out.exists()


def test_cli_build_tensorrt_says_in_one_line_that_it_skipped_tensorrt(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nemocompile.base.settings import override
    from nemocompile.cli import main

    with override():
        result = CliRunner().invoke(main, ["build", "--target", "h100", "--precision", "fp32", "-o",
                                           str(tmp_path / "engine"), "--tensorrt"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if "TensorRT" in line]
    assert skipped == ["TensorRT is not installed: skipped building the TensorRT engine (the ONNX export is "
                       "written; install nemocompile[tensorrt] to build it)"]
    assert (tmp_path / "engine" / "tensorrt" / "model.onnx").is_file()


def test_tensorrt_export_runs_bf16_gemms_in_bf16(engines: dict[str, Built]) -> None:
    path = _models(engines["demo-bf16"].engine)["prefill"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    gemms = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert gemms and all(types.get(n.input[0]) == onnx.TensorProto.BFLOAT16 for n in gemms)


def test_export_streams_large_weights_in_chunks_and_writes_the_same_files(
        engines: dict[str, Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weight tensor is read whole: the small ones are read (below EXTERNAL_MIN_BYTES), the large
    ones are copied into the data file one chunk at a time; the files equal a default-chunk export."""
    from nemocompile import tensorrt_export
    from nemocompile.codegen.tensorrt.weights import EXTERNAL_MIN_BYTES

    chunk = 4096
    reads: list[int] = []
    real_pread = tensorrt_export.os.pread

    def spy(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(tensorrt_export, "COPY_CHUNK", chunk)
    monkeypatch.setattr(tensorrt_export.os, "pread", spy)
    streamed = _build(None, tmp_path / "streamed", "h100")
    monkeypatch.undo()
    assert reads and max(reads) <= max(chunk, EXTERNAL_MIN_BYTES - 1)
    data = (streamed.engine / "tensorrt" / "weights.bin").stat().st_size
    assert data > 10 * chunk  # the demo's large weights went through many chunks
    for relative in ("tensorrt/weights.bin", "tensorrt/model.onnx", "tensorrt/decode.decomposed.onnx"):
        assert (streamed.engine / relative).read_bytes() == (engines["demo-h100"].engine / relative).read_bytes()


def test_nvfp4_codes_a_norm_hands_its_gemm_export_as_their_values(tiny_checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    """W4A4 MLP and Mamba linears on b200: the MLP layer's norm hands its up_proj NVFP4 codes
    (nvfp4codes). ONNX has no value of packed codes with their block scales, so the export carries
    them as the values they mean (the FLOAT4E2M1 codes dequantized with their block scales and
    input_scale) and the quant_linear reads those: the decomposed export, on ONNX's reference
    evaluator, gives the reference runtime's logits and 8 greedy tokens."""
    out = tmp_path / "engine"
    nemocompile.build(tiny_checkpoint, out, target="b200", tensorrt=True, calibrate=2, max_context=256,
                      overrides=["mlp=nvfp4_w4a4", "mamba_linears=nvfp4_w4a4"])
    assert "tensor<nvfp4codes" in (out / "graph.txt").read_text()
    decomposed = onnx.load(str(_models(out)["prefill_decomposed"]))
    assert any(node.op_type == "QuantizeLinear" for node in decomposed.graph.node)
    reference, exported = nemocompile.load(out), nemocompile.load(out, backend="onnx")
    ids = torch.randint(0, reference.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    expected, got = reference.forward(ids), exported.forward(ids)
    relative = float((got - expected).abs().max() / expected.abs().max())
    print(f"W4A4 norm hand-off: prefill logits max |diff| / max |logit| = {relative:.3g}")
    assert relative <= TOLERANCE["auto"]
    assert torch.equal(exported.generate(ids, GREEDY_STEPS), reference.generate(ids, GREEDY_STEPS))
