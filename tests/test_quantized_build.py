"""Quantized engines end to end: the embedded demo and a tiny transformers checkpoint built for
h100 (NVFP4 W4A16 routed experts, FP8 W8A8 shared experts and Mamba linears) and b200 (NVFP4 W4A4
routed experts). The graph text shows the formats, the report the per-weight error and the
agreement with the float engine; the deployed numerics of each quantized GEMM are its definition
computed here by hand; calibration sets input_scale = amax / (6*448) (NVFP4) or amax / 448 (FP8)
from the data it is given; builds are reproducible; the Ultra plan matches the released mix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file

import nemocompile
from nemocompile.base.settings import override
from nemocompile.calibration import FORMAT_MAX, calibrate, scales_needed
from nemocompile.cli import main
from nemocompile.driver import BuildResult
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.types import BF16, F32, FP8_SCALED, I64, NVFP4, DType, TensorType
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.report import comparable_engine_bytes
from nemocompile.runtime.cache import Cache
from nemocompile.runtime.executor import Executor
from nemocompile.runtime.formats import FP8Tensor, NVFP4Tensor, fake_quantize_nvfp4
from nemocompile.runtime.quantized_ops import quant_grouped_gemm, quant_linear, quantize
from nemocompile.runtime.weights import WeightValue, load_weights

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
if not MODELS.exists():
    MODELS = Path("/work/shared/models")
WEIGHTS_FILE = "weights/rank0.safetensors"
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
TINY: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, intermediate_size=32, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
    chunk_size=4, conv_kernel=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, dtype="float32",
)
# (relative RMS, SQNR dB) a sane quantizer gives on gaussian-like weights
RANGES = {"nvfp4": (0.05, 0.2), "fp8": (0.01, 0.05)}


# ---------------------------------------------------------------------------------------------
# hand-written definitions (independent of runtime/formats for the weights)


def hand_dequantize(weight: WeightValue) -> torch.Tensor:
    """The stored bytes read back by the format's definition, in fp32."""
    if isinstance(weight, FP8Tensor):
        scale = weight.scale.reshape(*weight.scale.shape, *([1] * (weight.data.ndim - weight.scale.ndim)))
        fp8: torch.Tensor = weight.data.float() * scale
        return fp8
    assert isinstance(weight, NVFP4Tensor)
    packed = weight.packed
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    magnitude = E2M1[(codes & 0x7).long()]
    values = torch.where(codes >= 8, -magnitude, magnitude)
    block = weight.block_scale.float().repeat_interleave(16, dim=-1)
    global_scale = weight.global_scale.reshape(*weight.global_scale.shape, 1, 1)
    nvfp4: torch.Tensor = values * block * global_scale
    return nvfp4


def hand_fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def hand_linear(x: torch.Tensor, weight: WeightValue, act_format: str | None,
                input_scale: torch.Tensor | None) -> torch.Tensor:
    """W4A16 / W8A16: x @ W^T in fp32; W4A4: NVFP4-rounded x; W8A8: FP8-rounded x; cast to x's dtype."""
    activations = x.float()
    if act_format == "nvfp4":
        assert input_scale is not None
        activations = fake_quantize_nvfp4(activations, input_scale)
    elif act_format == "fp8":
        assert input_scale is not None
        activations = hand_fake_quantize_fp8(activations, input_scale)
    return (activations @ hand_dequantize(weight).T).to(x.dtype)


def expert(weight: WeightValue, index: int) -> WeightValue:
    if isinstance(weight, NVFP4Tensor):
        return NVFP4Tensor(weight.packed[index], weight.block_scale[index], weight.global_scale[index])
    assert isinstance(weight, FP8Tensor)
    return FP8Tensor(weight.data[index], weight.scale[index])


# ---------------------------------------------------------------------------------------------
# builds (one per session)


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@dataclass(frozen=True)
class Built:
    engine: Path
    result: BuildResult

    @property
    def text(self) -> str:
        return (self.engine / "graph.txt").read_text()

    @property
    def report(self) -> str:
        return (self.engine / "report.md").read_text()

    def weights(self) -> dict[str, WeightValue]:
        loaded = nemocompile.load(self.engine)
        files = list(loaded.manifest.weight_files(0))
        weights: dict[str, WeightValue] = load_weights(self.engine, files, loaded.graph, torch.device("cpu"))
        return weights


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture(scope="session")
def demo(root: Path) -> dict[str, Built]:
    return {target: Built(root / f"demo-{target}", nemocompile.build(None, root / f"demo-{target}", target=target))
            for target in ("h100", "b200")}


@pytest.fixture(scope="session")
def tiny_checkpoint(root: Path) -> Path:
    transformers = pytest.importorskip("transformers", reason="the checkpoint is saved by NemotronHForCausalLM")
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**TINY))
    with torch.no_grad():  # non-trivial routing: the default router weights are zeros
        model.model.layers[2].mixer.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    model.save_pretrained(root / "tiny")
    return root / "tiny"


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint: Path, root: Path) -> dict[str, Built]:
    return {target: Built(root / f"tiny-{target}", nemocompile.build(tiny_checkpoint, root / f"tiny-{target}",
                                                                     target=target))
            for target in ("h100", "b200")}


def gemm_op(graph: Graph, weight: str) -> Op:
    (op,) = [op for op in graph.ops if op.opname in ("linear", "grouped_gemm", "quant_linear") and weight in op.operands]
    return op


def error_rows(report: str) -> dict[str, tuple[str, float, float]]:
    rows = re.findall(r"^\| (\S+) \| (nvfp4|fp8) \| ([0-9.]+) \| ([0-9.]+|inf) \|$", report, flags=re.M)
    return {w: (fmt, float(rel), float(sqnr)) for w, fmt, rel, sqnr in rows}


def engine_tensor(engine: Path, name: str) -> torch.Tensor:
    with safe_open(str(engine / WEIGHTS_FILE), "pt") as handle:
        tensor: torch.Tensor = handle.get_tensor(name)
        return tensor


def engine_dtypes(engine: Path) -> set[str]:
    header = json.loads((engine / WEIGHTS_FILE).read_bytes()[8:8 + int.from_bytes(
        (engine / WEIGHTS_FILE).read_bytes()[:8], "little")])
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


# ---------------------------------------------------------------------------------------------
# the formats in the engine graph and report


def test_h100_graph_shows_w4a16_experts_and_w8a8_linears(demo: dict[str, Built]) -> None:
    text = demo["h100"].text
    assert "weight %layers.2.mixer.experts_up : tensor<nvfp4, [8, 48, 32]>" in text
    assert "weight %layers.0.mixer.in_proj : tensor<fp8, " in text
    assert "weight %layers.2.mixer.shared_up : tensor<fp8, " in text
    # W4A16: the experts' fused up-GEMM takes the bf16 activations as they are
    assert re.search(r"= moe_expert_up\(%\d+, %\d+, %\d+, %layers\.2\.mixer\.experts_up, _\) "
                     r"\{activation = \"relu2\", kernel = \"\w+\", top_k = 2\} : tensor<bf16", text)
    assert 'format = "nvfp4"' not in text and "= quantize(" not in text
    # in/out_proj of 2 Mamba layers, shared up/down of 2 MoE: layer 3's norm quantizes its in_proj input
    # (E4M3 codes, which a quant_linear reads with the same input_scale), the other 7 GEMMs quantize on load
    assert text.count('{act_format = "fp8"') == 9 and text.count("= quant_linear(") == 8
    assert re.search(r'= add_rms_norm\([^)]*\) \{act_format = "fp8"[^}]*\} : tensor<fp8e4m3, ', text)
    assert "weight %layers.1.mixer.q_proj : tensor<bf16, " in text


def test_b200_graph_shows_w4a4_experts(demo: dict[str, Built]) -> None:
    text = demo["b200"].text
    assert text.count('{act_format = "nvfp4"') == 4  # up and down of 2 MoE layers
    # the fused up-GEMM quantizes the experts' rows to NVFP4 on load, the down-GEMM its hidden rows
    assert re.search(r"= moe_expert_up\(%\d+, %\d+, %\d+, %layers\.2\.mixer\.experts_up, "
                     r'%layers\.2\.mixer\.experts_up\.input_scale\) \{act_format = "nvfp4"[^}]*out_dtype = "bf16"'
                     r"[^}]*\} : tensor<bf16, \[routed, ", text)
    assert re.search(r"= moe_expert_down\([^)]*%layers\.2\.mixer\.experts_down\.input_scale\) "
                     r'\{act_format = "nvfp4"', text)
    assert "weight %layers.2.mixer.experts_up.input_scale : tensor<f32, [8]>" in text
    assert text.count('{act_format = "fp8"') == 9  # 8 FP8 GEMMs and the norm before one of them


@pytest.mark.parametrize("model", ["demo", "tiny"])  # bf16 and fp32 source weights
@pytest.mark.parametrize("target", ["h100", "b200"])
def test_report_has_the_error_table_in_sane_ranges(request: pytest.FixtureRequest, model: str, target: str) -> None:
    built: Built = request.getfixturevalue(model)[target]
    rows = error_rows(built.report)
    assert {e.weight for e in built.result.errors} == set(rows)
    quantized = {w.name: w.type.dtype.name for w in nemocompile.load(built.engine).graph.weights
                 if w.type.dtype.quantized}
    assert {w: fmt for w, (fmt, _, _) in rows.items()} == quantized
    for weight, (fmt, rel, sqnr) in rows.items():
        low, high = RANGES[fmt]
        assert low < rel < high, (weight, fmt, rel)
        assert sqnr == pytest.approx(-20 * math.log10(rel), abs=0.02), (weight, rel, sqnr)
    for error in built.result.errors:
        assert rows[error.weight][1] == pytest.approx(error.rel_rms, abs=1e-5)


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_report_and_result_carry_the_agreement(demo: dict[str, Built], target: str) -> None:
    built = demo[target]
    agreement = built.result.agreement
    assert agreement is not None
    # the trained demo is confident, so rounding moves more probability on random prompts than it did
    # on the earlier random weights (mean KL 0.06, top-1 0.90 on h100)
    assert 0.8 <= agreement.top1 <= 1.0 and 0.0 < agreement.mean_kl < 0.15
    assert f"- top-1 agreement: {agreement.top1:.4f}" in built.report
    assert f"- mean KL(float || quantized): {agreement.mean_kl:.6f} nats" in built.report


def test_reported_error_is_the_error_of_the_stored_weight(tiny: dict[str, Built], tiny_checkpoint: Path) -> None:
    """Recompute one weight's relative RMS from the checkpoint and the engine's bytes."""
    source = load_file(str(tiny_checkpoint / "model.safetensors"))
    truth = torch.stack([source[f"backbone.layers.2.mixer.experts.{e}.up_proj.weight"] for e in range(4)])
    built = tiny["b200"]
    stored = built.weights()["layers.2.mixer.experts_up"]
    relative = float((hand_dequantize(stored) - truth).norm() / truth.norm())
    (error,) = [e for e in built.result.errors if e.weight == "layers.2.mixer.experts_up"]
    assert error.format == "nvfp4"
    assert error.rel_rms == pytest.approx(relative, rel=1e-4)
    assert error.sqnr_db == pytest.approx(-20 * math.log10(relative), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# deployed numerics: each quantized GEMM is its definition


def _rows(count: int, width: int, seed: int) -> torch.Tensor:
    return (torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 3).to(torch.bfloat16)


@pytest.mark.parametrize("target, weight, act_format", [
    ("h100", "layers.2.mixer.shared_up", "fp8"),      # W8A8
    ("h100", "layers.0.mixer.in_proj", "fp8"),        # W8A8
    ("h100", "layers.2.mixer.experts_up", None),      # W4A16, one expert's slice as a linear
    ("b200", "layers.2.mixer.experts_down", "nvfp4"),  # W4A4, one expert's slice as a linear
])
def test_quant_linear_is_the_definition(tiny: dict[str, Built], target: str, weight: str,
                                        act_format: str | None) -> None:
    weights = tiny[target].weights()
    value, scale = weights[weight], weights.get(f"{weight}.input_scale")
    assert isinstance(value, NVFP4Tensor | FP8Tensor)
    if isinstance(value, NVFP4Tensor) and value.packed.ndim == 3:
        value = expert(value, 1)
        scale = scale[1] if scale is not None else None
    assert (scale is None) == (act_format is None)
    x = _rows(5, value.shape[-1], seed=4)
    quantized = quantize(x, act_format, scale) if act_format and scale is not None else x
    got = quant_linear(quantized, value, None, torch.bfloat16)
    expected = hand_linear(x, value, act_format, scale)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    # the activation rounding is really applied (or really not)
    plain = hand_linear(x, value, None, None)
    assert torch.equal(got, plain) == (act_format is None)


@pytest.mark.parametrize("target, act_format", [("h100", None), ("b200", "nvfp4")])
def test_quant_grouped_gemm_is_the_definition_per_expert(tiny: dict[str, Built], target: str,
                                                         act_format: str | None) -> None:
    weights = tiny[target].weights()
    value = weights["layers.2.mixer.experts_up"]
    scale = weights.get("layers.2.mixer.experts_up.input_scale")
    assert isinstance(value, NVFP4Tensor) and (scale is None) == (act_format is None)
    offsets = torch.tensor([0, 3, 3, 7, 9])  # expert 1 gets no row
    x = _rows(9, 32, seed=5)
    quantized = quantize(x, act_format, scale, offsets) if act_format and scale is not None else x
    got = quant_grouped_gemm(quantized, offsets, value, torch.bfloat16)
    for e in range(4):
        rows = x[int(offsets[e]):int(offsets[e + 1])]
        expected = hand_linear(rows, expert(value, e), act_format, scale[e] if scale is not None else None)
        assert torch.equal(got[int(offsets[e]):int(offsets[e + 1])], expected), e


def _one_linear_graph(weight_type: TensorType, act_format: str | None, rows: int) -> Graph:
    builder = GraphBuilder("one_linear", origin="test")
    builder.input("x", TensorType(BF16, (rows, int(weight_type.shape[-1]))))
    builder.weight("w", weight_type, "shared_experts")
    x = "x"
    if act_format:
        scale = builder.weight("w.input_scale", TensorType(F32, ()), "activation_scales")
        x = builder.op1("quantize", [x, scale], {"format": act_format})
    out = builder.op1("linear", [x, "w"], {"out_dtype": "bf16"} if act_format else {})
    builder.output(out)
    return builder.build()


@pytest.mark.parametrize("target, weight, dtype, act_format", [
    ("h100", "layers.2.mixer.shared_down", FP8_SCALED, "fp8"),
    ("b200", "layers.2.mixer.experts_up", NVFP4, "nvfp4"),
    ("h100", "layers.2.mixer.experts_up", NVFP4, None),
])
def test_reference_dispatch_of_a_one_op_graph_is_the_definition(tiny: dict[str, Built], target: str, weight: str,
                                                                dtype: DType, act_format: str | None) -> None:
    weights = tiny[target].weights()
    value, scale = weights[weight], weights.get(f"{weight}.input_scale")
    assert isinstance(value, NVFP4Tensor | FP8Tensor)
    if len(value.shape) == 3:
        value, scale = expert(value, 2), scale[2] if scale is not None else None
    graph = _one_linear_graph(TensorType(dtype, tuple(value.shape)), act_format, rows=6)
    bound: dict[str, WeightValue] = {"w": value}
    if scale is not None:
        bound["w.input_scale"] = scale
    x = _rows(6, value.shape[-1], seed=6)
    (out,) = Executor(graph, bound).run(x, Cache.for_graph(graph, 6, torch.device("cpu"))).values()
    assert torch.equal(out, hand_linear(x, value, act_format, scale))


@pytest.mark.parametrize("target, weight", [("h100", "layers.2.mixer.shared_up"), ("b200", "layers.0.mixer.out_proj"),
                                            ("b200", "layers.0.mixer.in_proj")])
def test_engine_executor_runs_the_definition_inside_the_model(tiny: dict[str, Built], target: str,
                                                              weight: str) -> None:
    """The loaded engine's own executor, mid-model: the GEMM's output is the definition of its input."""
    engine = nemocompile.load(tiny[target].engine)
    op = gemm_op(engine.graph, weight)
    seen: dict[str, torch.Tensor] = {}

    def observe(later: Op, args: Sequence[WeightValue | None]) -> None:
        for name, value in zip(later.operands, args, strict=True):
            if name is not None and isinstance(value, torch.Tensor):
                seen[name] = value

    weights = engine._prefill.weights
    executor = Executor(engine.graph, weights, observer=observe)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    executor.run(ids, Cache.for_graph(engine.graph, 2, torch.device("cpu")))
    assert op.opname == "quant_linear"  # these GEMMs run W8A8 / W4A4, quantizing their input on load
    x, out = seen[str(op.operands[0])], seen[op.results[0].name]
    scale = weights[f"{weight}.input_scale"]
    assert isinstance(scale, torch.Tensor) and op.operands[2] == f"{weight}.input_scale"
    assert torch.equal(out, hand_linear(x, weights[weight], op.attrs.str("act_format"), scale))


# ---------------------------------------------------------------------------------------------
# calibration


def _embedding_linear_graph(table: torch.Tensor, width_out: int) -> Graph:
    builder = GraphBuilder("calib", origin="test")
    builder.input("ids", TensorType(I64, ("batch", "seq")))
    builder.weight("table", TensorType(F32, tuple(table.shape)), "embeddings")
    builder.weight("w", TensorType(F32, (width_out, int(table.shape[1]))), "mlp")
    x = builder.op1("embedding", ["ids", "table"])
    builder.output(builder.op1("linear", [x, "w"]))
    return builder.build()


@pytest.mark.parametrize("precision, act_format", [("nvfp4_w4a4", "nvfp4"), ("fp8_e4m3_w8a8", "fp8")])
def test_calibration_sets_amax_over_the_format_maximum(precision: str, act_format: str) -> None:
    table = torch.linspace(-1.0, 1.0, 16 * 32).reshape(16, 32)
    table[5, 7] = -9.5  # the largest activation, only in the second batch
    table[15, 0] = 50.0  # in the table but never looked up: must not count
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    float_graph = _embedding_linear_graph(table, 8)
    quantized = AssignPrecision(PrecisionPolicy("fp32", {"mlp": precision})).apply(float_graph).graph
    needed = scales_needed(quantized)
    assert needed == {"w.input_scale": ("w", act_format)}
    batches = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6, 7]])]
    scales = calibrate(float_graph, {"table": table, "w": w}, needed, batches)
    expected = torch.tensor(9.5) / (6 * 448 if act_format == "nvfp4" else 448)
    assert FORMAT_MAX[act_format] == (6 * 448 if act_format == "nvfp4" else 448)
    assert scales["w.input_scale"].dtype == torch.float32 and scales["w.input_scale"].shape == ()
    assert torch.equal(scales["w.input_scale"], expected)
    only_first = calibrate(float_graph, {"table": table, "w": w}, needed, batches[:1])
    assert torch.equal(only_first["w.input_scale"], table[1:4].abs().max() / FORMAT_MAX[act_format])


def test_calibrated_expert_scales_are_per_expert(demo: dict[str, Built]) -> None:
    scale = engine_tensor(demo["b200"].engine, "layers.2.mixer.experts_up.input_scale")
    assert scale.dtype == torch.float32 and scale.shape == (8,)
    assert bool((scale > 0).all()) and len(set(scale.tolist())) > 1


def _token_file(path: Path, seed: int, high: int = 64) -> Path:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, high, (24,), generator=generator).tolist() for _ in range(3)]
    path.write_text("\n".join(",".join(map(str, row)) for row in rows) + "\n")
    return path


def _scales(engine: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(engine / WEIGHTS_FILE))
    return {name: t for name, t in tensors.items() if name.endswith(".input_scale")}


def test_calibration_data_file_is_used(tiny_checkpoint: Path, tiny: dict[str, Built], tmp_path: Path) -> None:
    first, second = _token_file(tmp_path / "a.txt", 1), _token_file(tmp_path / "b.txt", 2, high=8)
    nemocompile.build(tiny_checkpoint, tmp_path / "a", target="h100", calibration_data=first)
    nemocompile.build(tiny_checkpoint, tmp_path / "a-again", target="h100", calibration_data=first)
    result = invoke("build", tiny_checkpoint, "--target", "h100", "-o", tmp_path / "b", "--calibration-data", second)
    assert result.exit_code == 0, result.output
    a, again, b = _scales(tmp_path / "a"), _scales(tmp_path / "a-again"), _scales(tmp_path / "b")
    default = _scales(tiny["h100"].engine)
    assert set(a) == set(b) == set(default) and "layers.0.mixer.in_proj.input_scale" in a
    assert all(torch.equal(a[n], again[n]) for n in a)  # the same data, the same scales
    assert any(not torch.equal(a[n], b[n]) for n in a)  # other data, other scales
    assert any(not torch.equal(a[n], default[n]) for n in a)  # and not the random default's


def test_calibrate_zero_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = invoke("build", tiny_checkpoint, "--target", "b200", "-o", out, "--calibrate", "0")
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--calibrate" in lines[0], result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# precision options


def test_bf16_precision_has_no_quantized_weight(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = nemocompile.build(tiny_checkpoint, tmp_path / "bf16", target="b200", precision="bf16")
    text = (tmp_path / "bf16" / "graph.txt").read_text()
    assert "tensor<nvfp4" not in text and "tensor<fp8" not in text and "quantize(" not in text
    assert engine_dtypes(tmp_path / "bf16") <= {"BF16", "F32"}
    assert result.errors == [] and result.agreement is None
    assert "## Quantization error per weight" not in (tmp_path / "bf16" / "report.md").read_text()


def test_override_routed_experts_fp8_on_b200(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = nemocompile.build(tiny_checkpoint, tmp_path / "fp8", target="b200", overrides=["routed_experts=fp8"])
    text = (tmp_path / "fp8" / "graph.txt").read_text()
    assert "weight %layers.2.mixer.experts_up : tensor<fp8, [4, 16, 32]>" in text
    assert re.search(r"= moe_expert_up\([^)]*, %layers\.2\.mixer\.experts_up\.input_scale\) "
                     r'\{act_format = "fp8"', text)
    assert 'format = "nvfp4"' not in text
    assert engine_tensor(tmp_path / "fp8", "layers.2.mixer.experts_up").dtype == torch.float8_e4m3fn
    assert engine_tensor(tmp_path / "fp8", "layers.2.mixer.experts_up.weight_scale").shape == (4,)
    (error,) = [e for e in result.errors if e.weight == "layers.2.mixer.experts_up"]
    assert error.format == "fp8" and RANGES["fp8"][0] < error.rel_rms < RANGES["fp8"][1]


def test_w4a4_on_h100_is_refused_naming_w4a16(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = invoke("build", "--target", "h100", "-o", out, "--override", "routed_experts=nvfp4_w4a4")
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "routed_experts=nvfp4_w4a16" in lines[0] and "W4A16" in lines[0] and "h100" in lines[0]
    assert not out.exists()


def test_builds_with_calibration_are_byte_identical(demo: dict[str, Built], root: Path) -> None:
    again = root / "demo-b200-again"
    nemocompile.build(None, again, target="b200")
    # identical but for the phase times in report.md (and report.md's hash in the manifest)
    first, second = comparable_engine_bytes(demo["b200"].engine), comparable_engine_bytes(again)
    assert first.keys() == second.keys() and WEIGHTS_FILE in first
    assert [name for name in first if first[name] != second[name]] == []


def test_plan_ultra_on_eight_b200(tmp_path: Path) -> None:
    result = invoke("plan", MODELS / "ultra.json", "--target", "b200", "--world-size", "8", "--max-batch-size", "1",
                    "--max-context", "1048576", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["fits"] is True
    assert plan["bytes_total"] == pytest.approx(352e9, rel=0.01)
    assert plan["bits_per_element"] == pytest.approx(5.03, abs=0.01)
    # the full plan: weights (at least an eighth each: routers and norms are replicated) and more
    assert plan["weights_bytes_per_gpu"] >= -(-plan["bytes_total"] // 8)
    assert plan["weights_bytes_per_gpu"] < plan["bytes_per_gpu"] < plan["gpu_memory_bytes"]
