"""The grouped FP8 expert GEMMs (templates/moe_fp8_gemm.py) in Triton's interpreter against the fused
ops' reference implementations (runtime/reference/fused.moe_expert_up / moe_expert_down with an
FP8 weight and act_format fp8: gather, `quantize` with the per-expert input_scale, the dequantized
weight in fp32, ReLU², routing-weighted combine).

Every case uses fresh random inputs and NaN-poisoned outputs (and a NaN-poisoned pair buffer for
the down-GEMM); the routings include ragged expert loads, an expert with no tokens, more rows than
one BLOCK_M tile, and batch-1 decode; K values BLOCK_K does not divide run a masked last step.

Tolerance (bf16 outputs), as tests/test_triton_gemm.py states it for the NVFP4 expert GEMMs: 2 bf16
ulps of max(|reference|, 2**-8 times the output's largest magnitude) per element; the up-GEMM 3 (a
GEMM output that rounds the other way before relu2 moves the square by 2 of its ulps); the
down-GEMM adds one bf16 ulp of each of the token's expert rows times its routing weight
(row_rounding_bound). Kernel and reference multiply the same exact values (E4M3 codes; the
activation rounding is bit-exact, checked by the identity-weight test with fp32 output) and differ
only in fp32 summation order and in where the scales multiply (the reference scales the weight
before the dot, the kernel the accumulator: ~1e-7 relative).
The interpreter path: its fp32 -> fp8 cast and bf16 dot are wrong (Triton issue 11584), so in
interpreter mode the kernel upcasts both operands to fp32 (fp8_gemm.fp8_k_sum, INTERPRET); the
compiled fp8 x fp8 dot is checked on a GPU by bench/gpu_check.py and its instructions in the PTX by
test_moe_fp8_ptx_uses_fp8_tensor_cores.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

import nemocompile
from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.runtime.formats import FP8Tensor, quantize_fp8, quantize_fp8_stacked
from nemocompile.runtime.kernels import triton_gemm
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.quantized_ops import quant_grouped_gemm, quantize
from nemocompile.runtime.reference.fused import moe_expert_down, moe_expert_up
from nemocompile.runtime.reference.moe import moe_dispatch
from tests.test_triton_gemm import EMPTY_EXPERT, EXPERTS, TOP_K, _routing, _scale_floor
from tests.triton_kernels import assert_within_bf16_ulps, interpreted, poisoned, row_rounding_bound

# the NVFP4 GEMM tests' routing: 6 experts, top-2, skewed towards expert 0, expert 4 never chosen
HIDDEN, INTER = 64, 128
ROUTINGS = {"decode-1": 1, "ragged-13": 13, "multi-tile-40": 40}
PADDED_K = (16, 48, 80)  # BLOCK_K 32 or 64 does not divide them: a masked last K step
PADDED_N = 48
SCALES = ("per-expert", "per-tensor", "per-channel")


def _kernels() -> list[catalog.KernelInstance]:
    common = {"experts": EXPERTS, "top_k": TOP_K, "block_k": 64}
    up = {"n": INTER, "k": HIDDEN, "activation": "relu2", "gather": True, **common}
    down = {"n": HIDDEN, "k": INTER, "combine": True, **common}
    padded = [kernel for k in PADDED_K for kernel in (
        catalog.moe_fp8_gemm(f"up_k{k}", "moe_expert_up", n=PADDED_N, k=k, experts=EXPERTS, top_k=TOP_K,
                             activation="relu2", gather=True, block_k=32 if k < 64 else 64),
        catalog.moe_fp8_gemm(f"down_k{k}", "moe_expert_down", n=PADDED_N, k=k, experts=EXPERTS, top_k=TOP_K,
                             combine=True, block_k=32 if k < 64 else 64))]
    return [
        catalog.moe_fp8_gemm("up_swap", "moe_expert_up", block_m=16, **up),
        catalog.moe_fp8_gemm("up_tile64", "moe_expert_up", block_m=64, **up),
        catalog.moe_fp8_gemm("up_w8a16", "moe_expert_up", block_m=16, quant_act=False, **up),
        catalog.moe_fp8_gemm("down_swap", "moe_expert_down", block_m=16, **down),
        catalog.moe_fp8_gemm("down_tile64", "moe_expert_down", block_m=64, **down),
        catalog.moe_fp8_gemm("up_exact", "moe_expert_up", n=HIDDEN, k=HIDDEN, experts=EXPERTS, top_k=TOP_K,
                             gather=True, out_dtype="fp32", block_k=64),
        catalog.moe_combine("combine", "moe_expert_down", n=HIDDEN, top_k=TOP_K, block_n=32),
        catalog.moe_combine("combine_padded", "moe_expert_down", n=PADDED_N, top_k=TOP_K, block_n=64),
        *padded,
    ]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> TritonKernels:
    return interpreted(_kernels(), tmp_path_factory.mktemp("engine"))


def _weight(experts: int, n: int, k: int, scale: str, generator: torch.Generator) -> FP8Tensor:
    """Experts of different magnitudes, FP8 with the scale layout named (ModelOpt exports per-expert)."""
    w = torch.randn(experts, n, k, generator=generator) * torch.logspace(-1, 1, experts)[:, None, None]
    if scale == "per-expert":
        return quantize_fp8_stacked(w)
    return quantize_fp8(w, per_channel=scale == "per-channel")


def _input_scales(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-expert static FP8 input scales near amax / 448, some smaller (so some values saturate)."""
    return float(x.float().abs().max()) / 448 * (0.5 + torch.rand(EXPERTS, generator=generator))


def _check_up(kernels: TritonKernels, kernel: str, x: torch.Tensor, ids: torch.Tensor, weight: FP8Tensor,
              input_scale: torch.Tensor | None) -> torch.Tensor:
    _, offsets, order = moe_dispatch(x, ids, EXPERTS)
    assert offsets[EMPTY_EXPERT] == offsets[EMPTY_EXPERT + 1]
    out = triton_gemm.moe_expert_up(kernels, kernel, x, order, offsets, weight, input_scale,
                                    out=poisoned(order.numel(), weight.shape[1]))
    expected = moe_expert_up(x, order, offsets, weight, input_scale, top_k=TOP_K, activation_kind="relu2",
                             act_format=None if input_scale is None else "fp8", out_dtype=torch.bfloat16)
    assert_within_bf16_ulps(out, expected, 3, _scale_floor(expected))
    return expected


def _check_down(kernels: TritonKernels, kernel: str, combine: str, hidden: torch.Tensor, ids: torch.Tensor,
                routing: torch.Tensor, weight: FP8Tensor, input_scale: torch.Tensor) -> None:
    tokens, d = ids.shape[0], weight.shape[1]
    _, offsets, order = moe_dispatch(torch.zeros(tokens, 1), ids, EXPERTS)
    out = triton_gemm.moe_expert_down(kernels, kernel, combine, hidden, order, offsets, weight, routing, input_scale,
                                      out=poisoned(tokens, d), pairs=poisoned(tokens * TOP_K, d, dtype=torch.float32))
    expected = moe_expert_down(hidden, order, offsets, weight, routing, input_scale, act_format="fp8",
                               out_dtype=torch.bfloat16)
    rows = quant_grouped_gemm(quantize(hidden, "fp8", input_scale, offsets), offsets, weight, torch.bfloat16)
    assert_within_bf16_ulps(out, expected, 2, _scale_floor(expected), row_rounding_bound(rows, order, routing))


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("kernels_pair", [("up_swap", "down_swap"), ("up_tile64", "down_tile64")])
def test_w8a8_expert_up_then_down(kernels: TritonKernels, kernels_pair: tuple[str, str], routing: str) -> None:
    """The up-GEMM's output fed to the down-GEMM, as an engine chains them (per-expert scales, as
    ModelOpt's FP8_DEFAULT_CFG exports them)."""
    up, down = kernels_pair
    g = torch.Generator().manual_seed(hash((up, routing)) % 2**31)
    tokens = ROUTINGS[routing]
    ids, routing_weights = _routing(tokens, g)
    x = (torch.randn(tokens, HIDDEN, generator=g) * 2).bfloat16()
    hidden = _check_up(kernels, up, x, ids, _weight(EXPERTS, INTER, HIDDEN, "per-expert", g), _input_scales(x, g))
    _check_down(kernels, down, "combine", hidden, ids, routing_weights,
                _weight(EXPERTS, HIDDEN, INTER, "per-expert", g), _input_scales(hidden, g))


@pytest.mark.parametrize("scale", SCALES)
def test_w8a8_weight_scale_layouts(kernels: TritonKernels, scale: str) -> None:
    """A per-tensor, per-expert or per-channel weight scale, read in place through its strides."""
    g = torch.Generator().manual_seed(hash(("scales", scale)) % 2**31)
    tokens = 13
    ids, routing_weights = _routing(tokens, g)
    x = torch.randn(tokens, HIDDEN, generator=g).bfloat16()
    hidden = _check_up(kernels, "up_swap", x, ids, _weight(EXPERTS, INTER, HIDDEN, scale, g), _input_scales(x, g))
    _check_down(kernels, "down_swap", "combine", hidden, ids, routing_weights,
                _weight(EXPERTS, HIDDEN, INTER, scale, g), _input_scales(hidden, g))


@pytest.mark.parametrize("routing", ["decode-1", "ragged-13"])
def test_w8a16_expert_up(kernels: TritonKernels, routing: str) -> None:
    """No act_format: bf16 activations, the E4M3 weight upcast (the reference multiplies x as it is)."""
    g = torch.Generator().manual_seed(hash(("w8a16", routing)) % 2**31)
    tokens = ROUTINGS[routing]
    ids, _ = _routing(tokens, g)
    x = torch.randn(tokens, HIDDEN, generator=g).bfloat16()
    _check_up(kernels, "up_w8a16", x, ids, _weight(EXPERTS, INTER, HIDDEN, "per-expert", g), None)


@pytest.mark.parametrize("k", PADDED_K)
def test_k_that_block_k_does_not_divide(kernels: TritonKernels, k: int) -> None:
    """The masked last K step (the tiny exports' expert K is 16 and 32): up and down."""
    g = torch.Generator().manual_seed(2000 + k)
    tokens = 13
    ids, routing_weights = _routing(tokens, g)
    x = torch.randn(tokens, k, generator=g).bfloat16()
    _check_up(kernels, f"up_k{k}", x, ids, _weight(EXPERTS, PADDED_N, k, "per-expert", g), _input_scales(x, g))
    hidden = torch.randn(tokens * TOP_K, k, generator=g).bfloat16()
    _check_down(kernels, f"down_k{k}", "combine_padded", hidden, ids, routing_weights,
                _weight(EXPERTS, PADDED_N, k, "per-expert", g), _input_scales(hidden, g))


def test_w8a8_rounds_activations_bit_exactly(kernels: TritonKernels) -> None:
    """Identity FP8 weights with scale 1: the fp32 output is the kernel's quantized activation, which
    must equal the `quantize` op's (with offsets: each expert's own input scale) for every element,
    over seven decades of magnitude (subnormal E4M3 codes, saturation at 448, ties)."""
    g = torch.Generator().manual_seed(17)
    tokens = 9
    ids, _ = _routing(tokens, g)
    x = (torch.randn(tokens, HIDDEN, generator=g) * torch.logspace(-4, 3, HIDDEN)).bfloat16()
    weight = quantize_fp8(torch.eye(HIDDEN).expand(EXPERTS, HIDDEN, HIDDEN).contiguous(), scale=torch.tensor(1.0))
    x_sorted, offsets, order = moe_dispatch(x, ids, EXPERTS)
    scale = _input_scales(x, g) / 64
    out = triton_gemm.moe_expert_up(kernels, "up_exact", x, order, offsets, weight, scale,
                                    out=poisoned(tokens * TOP_K, HIDDEN, dtype=torch.float32))
    expected = quantize(x_sorted, "fp8", scale, offsets)
    row_scale = scale.repeat_interleave(offsets.diff())[:, None]
    assert bool((x_sorted.float().abs() / row_scale > 448).any())  # some values saturate
    torch.testing.assert_close(out, expected, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("act_format", ["fp8", None])
def test_builder_and_launcher_run_the_ir_ops(tmp_path: Path, act_format: str | None) -> None:
    """moe_expert_up / moe_expert_down as fuse_experts writes them (3-D x, routing [1, N, k]) with an
    FP8 weight, W8A8 (act_format fp8) or W8A16 (none): specialised by plan.py's builder, emitted,
    bound and run through the runtime's Triton backend (tests/test_triton_fused_ops._run), against
    the fused ops' references."""
    from nemocompile.graph.types import TensorType, dtype_named
    from tests.test_triton_fused_ops import _run

    def t(dtype: str, *shape: int) -> TensorType:
        return TensorType(dtype_named(dtype), shape)

    g = torch.Generator().manual_seed(29)
    tokens, d, i = 5, 64, 96
    ids, routing_weights = _routing(tokens, g)
    x = torch.randn(1, tokens, d, generator=g).bfloat16()
    _, offsets, order = moe_dispatch(x[0], ids, EXPERTS)
    up_w, down_w = _weight(EXPERTS, i, d, "per-expert", g), _weight(EXPERTS, d, i, "per-channel", g)
    up_scale = _input_scales(x, g) if act_format else None
    scale_type = t("f32", EXPERTS) if act_format else None
    attrs: dict[str, object] = {"top_k": TOP_K, "out_dtype": "bf16", **({"act_format": act_format} if act_format else {})}
    index = t("i64", tokens * TOP_K)
    hidden = _run(tmp_path / "up", "triton_moe_up_fp8", "moe_expert_up",
                  [t("bf16", 1, tokens, d), index, t("i64", EXPERTS + 1), t("fp8", EXPERTS, i, d), scale_type],
                  t("bf16", tokens * TOP_K, i), {**attrs, "activation": "relu2"},
                  [x, order, offsets, up_w, up_scale])
    expected_hidden = moe_expert_up(x, order, offsets, up_w, up_scale, top_k=TOP_K, activation_kind="relu2",
                                    act_format=act_format, out_dtype=torch.bfloat16)
    assert_within_bf16_ulps(hidden, expected_hidden, 3, _scale_floor(expected_hidden))
    down_scale = _input_scales(expected_hidden, g) if act_format else None
    out = _run(tmp_path / "down", "triton_moe_down_fp8", "moe_expert_down",
               [t("bf16", tokens * TOP_K, i), index, t("i64", EXPERTS + 1), t("fp8", EXPERTS, d, i),
                t("f32", 1, tokens, TOP_K), scale_type], t("bf16", 1, tokens, d), attrs,
               [expected_hidden, order, offsets, down_w, routing_weights.view(1, tokens, TOP_K), down_scale])
    expected = moe_expert_down(expected_hidden, order, offsets, down_w, routing_weights.view(1, tokens, TOP_K),
                               down_scale, act_format=act_format, out_dtype=torch.bfloat16)
    rows_in = quantize(expected_hidden, "fp8", down_scale, offsets) if down_scale is not None else expected_hidden
    rows = quant_grouped_gemm(rows_in, offsets, down_w, torch.bfloat16)
    assert out.shape == (1, tokens, d)
    assert_within_bf16_ulps(out[0], expected[0], 2, _scale_floor(expected), row_rounding_bound(rows, order, routing_weights))


# ---- ahead-of-time compile: the fp8 x fp8 tensor-core MMA of each arch ------------------------------

AOT_UP = catalog.moe_fp8_gemm("up_aot", "moe_expert_up", n=256, k=256, experts=8, top_k=2, activation="relu2",
                              gather=True, block_m=16)
AOT_DOWN = catalog.moe_fp8_gemm("down_aot", "moe_expert_down", n=256, k=256, experts=8, top_k=2, combine=True,
                                block_m=64)
# the tiny exports' down-GEMM: K = 16 under the 32 an FP8 step takes, one padded step
AOT_PADDED = catalog.moe_fp8_gemm("down_k16_aot", "moe_expert_down", n=32, k=16, experts=4, top_k=2, combine=True,
                                  block_m=16, block_k=32)
AOT_CASES = [(kernel, arch, instruction) for kernel in (AOT_UP, AOT_DOWN, AOT_PADDED)
             for arch, instruction in (("sm_90", "e4m3.e4m3"), ("sm_100", "tcgen05.mma.cta_group::1.kind::f8f6f4"))]


@pytest.mark.parametrize(("kernel", "arch", "instruction"), AOT_CASES, ids=[f"{k.name}-{a}" for k, a, _ in AOT_CASES])
def test_moe_fp8_ptx_uses_fp8_tensor_cores(tmp_path: Path, kernel: catalog.KernelInstance, arch: str,
                                           instruction: str) -> None:
    """wgmma ... e4m3.e4m3 on sm_90a (the swapped decode tile: m64n16k32), tcgen05 kind::f8f6f4 on
    sm_100a; never mma.sync."""
    from nemocompile.codegen.triton.aot import compile_instance

    compiled = compile_instance(kernel, arch, tmp_path)
    assert f".target {arch}a" in compiled.file("ptx").read_text()
    found = [i for i in compiled.tensor_cores if instruction in i]
    assert found and (arch != "sm_90" or all(i.startswith("wgmma.mma_async") for i in found)), compiled.tensor_cores
    assert not any(i.startswith("mma.sync") for i in compiled.tensor_cores)
    print(f"{kernel.name} {arch}: {compiled.tensor_cores}, {compiled.registers} registers, {compiled.spills} B stack, "
          f"{compiled.shared_bytes} B shared, {compiled.seconds:.2f} s")


# ---- whole engines: ModelOpt's FP8 exports on the triton backend, in the interpreter ----------------

ENGINE_CASES = [("fp8", "h100"), ("fp8", "b200"), ("fp8_kv", "h100"), ("fp8_kv", "b200")]
MIXED = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def fp8_engines(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """A real ModelOpt export (mtq.quantize + export_hf_checkpoint, tests/modelopt_exports.py) of a
    recipe, made once, built for a target at bf16 (the precision the Triton kernels take)."""
    from modelopt_exports import export_maker

    exports = export_maker(tmp_path_factory)
    built: dict[tuple[str, str], Path] = {}

    def get(recipe: str, target: str) -> Path:
        if (recipe, target) not in built:
            out = tmp_path_factory.mktemp(f"fp8moe-{recipe}-{target}") / "engine"
            nemocompile.build(exports(recipe).directory, out, target=target, precision="bf16")
            built[recipe, target] = out
        return built[recipe, target]
    return get


@pytest.mark.parametrize(("recipe", "target"), ENGINE_CASES)
def test_modelopt_fp8_export_runs_its_experts_on_the_fp8_kernels(fp8_engines: Callable[[str, str], Path],
                                                                 recipe: str, target: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every routed expert GEMM of an FP8 export (act_format fp8, FP8 weights) runs the grouped FP8
    kernel (its launches are counted), no op falls back, and the engine matches backend="reference":
    logits within 2% of the largest logit (printed), the same 8 greedy tokens for a mixed-length batch."""
    engine_dir = fp8_engines(recipe, target)  # built first: the build's numerics gate runs the kernels too
    launches: list[str] = []
    launch = triton_gemm.moe_fp8_gemm

    def counted(kernels: TritonKernels, name: str, *args: object) -> torch.Tensor:
        launches.append(name)
        return launch(kernels, name, *args)  # type: ignore[arg-type]
    monkeypatch.setattr(triton_gemm, "moe_fp8_gemm", counted)
    graph = (engine_dir / "graph.txt").read_text()
    assert 'kernel = "triton_moe_up_fp8"' in graph and 'kernel = "triton_moe_down_fp8"' in graph
    assert json.loads((engine_dir / "kernels" / "kernels.json").read_text())["fallbacks"] == []
    triton = nemocompile.load(engine_dir, backend="triton")
    experts = [r for r in triton.kernels() if r.op in ("moe_expert_up", "moe_expert_down")]
    assert experts and all(r.kernel in ("triton_moe_up_fp8", "triton_moe_down_fp8") and r.fallback is None
                           for r in experts)
    reference = nemocompile.load(engine_dir, backend="reference")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    expected, actual = reference.forward(prompts), triton.forward(prompts)
    error, scale = float((expected - actual).abs().max()), float(expected.abs().max())
    print(f"{recipe} {target}: logits max |triton - reference| = {error:.2e} (max |logit| {scale:.3f}), "
          f"{len(launches)} grouped FP8 GEMM launches")
    assert error <= 0.02 * scale
    assert {n.rsplit("_", 1)[0] for n in launches} == {"triton_moe_up_fp8", "triton_moe_down_fp8"}
    assert reference.complete(MIXED, 8) == triton.complete(MIXED, 8)
