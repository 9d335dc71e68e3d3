"""Split-K GEMMs in Triton's interpreter against the reference ops they mean.

SPLIT_K 2 and 4: each program sums one K slice (whole BLOCK_K steps) into an fp32 workspace and
the reduce kernel sums the slices in order and applies the epilogue (relu2, the routing-weight
combine, scales, bias, the cast). Ragged expert loads with an expert that gets no token; K values
that neither the split nor BLOCK_K divide (a masked last step; with SPLIT_K 4 over 3 steps the last
slice is empty); outputs and the workspace poisoned with NaN, so an element the GEMM does not write
or the reduce reads unwritten fails. Tolerances as tests/test_triton_gemm.py (the slices' fp32 sums
re-associate the K sum, far below the bf16 rounding).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.runtime.formats import quantize_fp8, quantize_nvfp4_stacked
from nemocompile.runtime.kernels import triton_gemm
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.quantized_ops import quant_grouped_gemm, quant_linear, quantize
from nemocompile.runtime.reference.elementwise import relu2
from nemocompile.runtime.reference.moe import moe_combine, moe_dispatch
from tests.triton_kernels import assert_within_bf16_ulps, interpreted, poisoned, row_rounding_bound

EXPERTS, TOP_K, EMPTY_EXPERT = 6, 2, 4
TOKENS = 13
N = 48
K16 = 80  # W4A16 and FP8: 3 steps of BLOCK_K 32, the last one masked past K
K4 = 176  # W4A4: 3 steps of BLOCK_K 64, the last one masked past K
SPLITS = (2, 4)


def _kernels() -> list:
    common = {"experts": EXPERTS, "top_k": TOP_K, "block_m": 16}
    found = []
    for split in SPLITS:
        found += [
            catalog.moe_gemm(f"up{split}", "moe_expert_up", n=N, k=K16, act_format="bf16", activation="relu2",
                             gather=True, block_k=32, split_k=split, **common),
            catalog.moe_gemm(f"down{split}", "moe_expert_down", n=N, k=K16, act_format="bf16", combine=True,
                             block_k=32, split_k=split, **common),
            catalog.moe_gemm(f"up4_{split}", "moe_expert_up", n=N, k=K4, experts=EXPERTS, top_k=TOP_K,
                             act_format="nvfp4", activation="relu2", gather=True, block_m=128, block_n=128,
                             block_k=64, split_k=split),
            catalog.moe_gemm(f"down4_{split}", "moe_expert_down", n=N, k=K4, experts=EXPERTS, top_k=TOP_K,
                             act_format="nvfp4", combine=True, block_m=128, block_n=128, block_k=64, split_k=split),
            catalog.fp8_linear(f"fp8_{split}", "linear", n=N, k=K16, quant_act=True, per_channel=True,
                               has_bias=True, block_k=32, split_k=split),
        ]
    return [*catalog.with_split_k_reduces(found), catalog.moe_combine("combine", "moe_expert_down", n=N, top_k=TOP_K,
                                                                      block_n=32)]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> TritonKernels:
    return interpreted(_kernels(), tmp_path_factory.mktemp("engine"))


class PoisonedAlloc:
    """The launchers' workspace allocator: NaN-filled, and it counts what it allocated."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self.shapes.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _routing(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor([8.0, 1, 1, 1, 0, 2])  # ragged, never EMPTY_EXPERT
    ids = torch.stack([torch.multinomial(probs, TOP_K, generator=generator) for _ in range(TOKENS)])
    return ids, torch.rand(TOKENS, TOP_K, generator=generator) + 0.1


def _floor(reference: torch.Tensor) -> float:
    return float(reference.float().abs().max()) * 2.0**-8


def _reduce(name: str) -> str:
    return f"{name}{catalog.REDUCE_SUFFIX}"


def test_reduce_kernels_follow_their_gemms() -> None:
    names = [k.name for k in _kernels()]
    assert names.index("up2_splitk_reduce") == names.index("up2") + 1
    assert catalog.split_k_reduce(catalog.fp8_linear("f", "linear", n=N, k=K16, quant_act=True, block_k=32)) is None
    again = catalog.with_split_k_reduces(_kernels())  # reduces already present are replaced, not doubled
    assert [k.name for k in again] == names


@pytest.mark.parametrize("act_format", ["bf16", "nvfp4"])
@pytest.mark.parametrize("split", SPLITS)
def test_expert_gemms_up_and_down(kernels: TritonKernels, split: int, act_format: str) -> None:
    """The grouped NVFP4 up- and down-GEMMs split over K, W4A16 (bf16) and W4A4 (nvfp4: the rows
    quantized on load with the expert's input_scale), against the unsplit references."""
    w4a4 = act_format == "nvfp4"
    g = torch.Generator().manual_seed((20 if w4a4 else 10) + split)
    k, up, down = (K4, f"up4_{split}", f"down4_{split}") if w4a4 else (K16, f"up{split}", f"down{split}")
    ids, routing = _routing(g)
    x = torch.randn(TOKENS, k, generator=g).bfloat16()
    weight = quantize_nvfp4_stacked(torch.randn(EXPERTS, N, k, generator=g))
    x_sorted, offsets, order = moe_dispatch(x, ids, EXPERTS)
    assert offsets[EMPTY_EXPERT] == offsets[EMPTY_EXPERT + 1]
    scale = float(x.float().abs().max()) / (6 * 448) * (0.5 + torch.rand(EXPERTS, generator=g)) if w4a4 else None

    def gemm_input(rows: torch.Tensor) -> torch.Tensor:
        return quantize(rows, "nvfp4", scale, offsets) if w4a4 else rows

    alloc = PoisonedAlloc()
    hidden = triton_gemm.moe_expert_up(kernels, up, x, order, offsets, weight, scale,
                                       out=poisoned(TOKENS * TOP_K, N), reduce_name=_reduce(up), alloc=alloc)
    assert alloc.shapes == [(TOKENS * TOP_K, split, N)]
    expected = relu2(quant_grouped_gemm(gemm_input(x_sorted), offsets, weight, torch.bfloat16))
    assert_within_bf16_ulps(hidden, expected, 3, _floor(expected))
    rows_in = x_sorted if w4a4 else torch.randn(TOKENS * TOP_K, k, generator=g).bfloat16()
    out = triton_gemm.moe_expert_down(kernels, down, "combine", rows_in, order, offsets, weight, routing, scale,
                                      out=poisoned(TOKENS, N), pairs=poisoned(TOKENS * TOP_K, N, dtype=torch.float32),
                                      reduce_name=_reduce(down), alloc=PoisonedAlloc())
    rows = quant_grouped_gemm(gemm_input(rows_in), offsets, weight, torch.bfloat16)
    combined = moe_combine(rows, order, routing, TOKENS)
    assert_within_bf16_ulps(out, combined, 2, _floor(combined), row_rounding_bound(rows, order, routing))
    # deterministic: no atomics, the slices are added in a fixed order
    again = triton_gemm.moe_expert_up(kernels, up, x, order, offsets, weight, scale, reduce_name=_reduce(up),
                                      alloc=PoisonedAlloc())
    assert torch.equal(again, hidden)


@pytest.mark.parametrize("rows", [1, 13])
@pytest.mark.parametrize("split", SPLITS)
def test_fp8_linear(kernels: TritonKernels, split: int, rows: int) -> None:
    g = torch.Generator().manual_seed(30 + split + rows)
    x = (torch.randn(rows, K16, generator=g) * 3).bfloat16()
    weight = quantize_fp8(torch.randn(N, K16, generator=g), per_channel=True)
    bias = torch.randn(N, generator=g).bfloat16()
    input_scale = torch.tensor(float(x.float().abs().max()) / 448 * 0.8)
    alloc = PoisonedAlloc()
    out = triton_gemm.fp8_linear(kernels, f"fp8_{split}", x, weight, input_scale, bias, out=poisoned(rows, N),
                                 reduce_name=_reduce(f"fp8_{split}"), alloc=alloc)
    assert alloc.shapes == [(rows, split, N)]
    expected = quant_linear(quantize(x, "fp8", input_scale), weight, bias, torch.float32).bfloat16()
    assert_within_bf16_ulps(out, expected, 2, _floor(expected))


def test_a_split_kernel_without_its_reduce_is_refused(kernels: TritonKernels) -> None:
    x = torch.randn(2, K16).bfloat16()
    weight = quantize_fp8(torch.randn(N, K16), per_channel=True)
    with pytest.raises(ValueError, match="needs its reduce kernel"):
        triton_gemm.fp8_linear(kernels, "fp8_2", x, weight, torch.tensor(0.01), torch.zeros(N).bfloat16())


def test_split_k_1_uses_no_workspace(tmp_path: Path) -> None:
    """SPLIT_K 1 allocates no workspace (the single kernel applies the epilogue itself)."""
    single = catalog.fp8_linear("fp8_1", "linear", n=N, k=K16, quant_act=True, per_channel=True, block_k=32)
    kernels = interpreted([single], tmp_path)
    alloc = PoisonedAlloc()
    x = torch.randn(3, K16).bfloat16()
    weight = quantize_fp8(torch.randn(N, K16), per_channel=True)
    scale = torch.tensor(float(x.float().abs().max()) / 448)
    out = triton_gemm.fp8_linear(kernels, "fp8_1", x, weight, scale, alloc=alloc)
    assert alloc.shapes == []
    expected = quant_linear(quantize(x, "fp8", scale), weight, None, torch.float32).bfloat16()
    assert_within_bf16_ulps(out, expected, 2, _floor(expected))


@pytest.mark.parametrize("arch", ["sm_90", "sm_100"])
def test_split_k_gemm_and_reduce_compile(tmp_path: Path, arch: str) -> None:
    """Ahead of time for sm_90a / sm_100a: the split GEMM keeps its tensor cores, the reduce kernel
    compiles without spills."""
    from nemocompile.codegen.triton.aot import compile_instance

    gemm, reduce = catalog.with_split_k_reduces([catalog.fp8_linear("fp8", "linear", n=256, k=256, quant_act=True,
                                                                    block_k=64, split_k=2)])
    assert compile_instance(gemm, arch, tmp_path).tensor_cores
    compiled = compile_instance(reduce, arch, tmp_path)
    assert f".target {arch}a" in compiled.file("ptx").read_text() and compiled.spills == 0
