"""Ahead-of-time compile of the GEMM kernels for sm_90a and sm_100a on this CPU-only machine:
the PTX targets the arch, the GEMMs use the arch's tensor cores (wgmma on sm_90a, tcgen05 on
sm_100a, and the native NVFP4 block-scaled MMA for W4A4), and a second compile is a cache hit."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton", reason="ahead-of-time compile needs the triton package (the [triton] extra)")

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.aot import CompileError, compile_instance
from nemocompile.codegen.triton.emit import emit

UP = catalog.moe_gemm("up", "moe_expert_up", n=256, k=256, experts=8, top_k=2, act_format="bf16",
                      activation="relu2", gather=True)
FP8 = catalog.fp8_linear("fp8", "linear", n=256, k=256, quant_act=True)
W4A4 = catalog.moe_gemm("w4a4", "moe_expert_up", n=256, k=256, experts=8, top_k=2, act_format="nvfp4",
                        activation="relu2", gather=True, block_m=128, block_n=128, block_k=128)
# The b200 demo's expert K (48): one 64-wide K step, padded, still the native NVFP4 MMA.
W4A4_PADDED = catalog.moe_gemm("w4a4_k48", "moe_expert_down", n=32, k=48, experts=8, top_k=2, act_format="nvfp4",
                               combine=True, block_m=128, block_n=128, block_k=64)
# quant_linear after a fused norm: the E4M3 codes it wrote loaded as they are, fp8 x fp8 tensor cores
FP8_CODES_INPUT = catalog.fp8_linear("fp8_codes_x", "quant_linear", n=256, k=256, quant_act=True, per_channel=True,
                                     x_dtype="fp8e4nv")
# The dense NVFP4 GEMMs (linear W4A16 at decode tiles, quant_linear W4A4 with a bias, K = 80 padded)
DENSE_W4A16 = catalog.nvfp4_linear("dense_w4a16", "linear", n=256, k=256, act_format="bf16")
DENSE_W4A4 = catalog.nvfp4_linear("dense_w4a4", "quant_linear", n=256, k=80, act_format="nvfp4", has_bias=True,
                                  block_k=64)
# quant_linear after a fused NVFP4 norm: the packed E2M1 codes and E4M3 block scales it wrote go to
# tl.dot_scaled as they are (CODES: x pointer u8), at the Nano in_proj K and a padded K = 80
DENSE_W4A4_CODES = catalog.nvfp4_linear("dense_w4a4_codes", "quant_linear", n=256, k=2688, act_format="nvfp4",
                                        x_dtype="u8")
DENSE_W4A4_CODES_PADDED = catalog.nvfp4_linear("dense_w4a4_codes_k80", "quant_linear", n=256, k=80,
                                               act_format="nvfp4", x_dtype="u8", has_bias=True, block_k=64)
CASES = [(UP, "sm_90", "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16"),
         (DENSE_W4A4_CODES, "sm_100", "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16"),
         (DENSE_W4A4_CODES_PADDED, "sm_100", "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16"),
         (DENSE_W4A16, "sm_90", "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16"),
         (DENSE_W4A16, "sm_100", "tcgen05.mma.cta_group::1.kind::f16"),
         (DENSE_W4A4, "sm_100", "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16"),
         (FP8, "sm_90", "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3"),
         (UP, "sm_100", "tcgen05.mma.cta_group::1.kind::f16"),
         (FP8, "sm_100", "tcgen05.mma.cta_group::1.kind::f8f6f4"),
         (W4A4, "sm_100", "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16"),
         (FP8_CODES_INPUT, "sm_90", "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3"),
         (FP8_CODES_INPUT, "sm_100", "tcgen05.mma.cta_group::1.kind::f8f6f4"),
         (W4A4_PADDED, "sm_100", "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.mark.parametrize(("kernel", "arch", "instruction"), CASES, ids=[f"{k.name}-{a}" for k, a, _ in CASES])
def test_gemm_compiles_to_tensor_cores(cache: Path, kernel: catalog.KernelInstance, arch: str,
                                       instruction: str) -> None:
    cold = compile_instance(kernel, arch, cache)
    ptx = cold.file("ptx").read_text()
    assert f".target {arch}a" in ptx
    assert instruction in cold.tensor_cores, cold.tensor_cores
    assert not any(i.startswith("mma.sync") for i in cold.tensor_cores)
    assert cold.registers > 0 and cold.file("cubin").stat().st_size > 0
    warm = compile_instance(kernel, arch, cache)
    assert warm.cached and not cold.cached and warm.key == cold.key
    print(f"{kernel.name} {arch}: {cold.registers} registers, {cold.spills} B stack, {cold.shared_bytes} B shared, "
          f"cold {cold.seconds:.2f} s, warm {warm.seconds:.3f} s")


@pytest.mark.parametrize("kernel", [W4A4, DENSE_W4A4], ids=["grouped", "dense"])
def test_w4a4_is_refused_for_hopper(cache: Path, kernel: catalog.KernelInstance) -> None:
    with pytest.raises(CompileError, match="does not compile for sm_90"):
        compile_instance(kernel, "sm_90", cache)


def test_emit_writes_content_addressed_binaries(cache: Path, tmp_path: Path) -> None:
    emitted = emit([UP], tmp_path, "sm_90", cache)
    key = emitted.compiled[0].key
    assert f"kernels/bin/{key}.cubin" in emitted.files and "kernels/src/moe_gemm.py" in emitted.files
    assert "kernels/src/quant_math.py" in emitted.files and "kernels/kernels.json" in emitted.files
    other = catalog.moe_gemm("up", "moe_expert_up", n=256, k=256, experts=8, top_k=2, act_format="bf16",
                             activation="relu2", gather=True, block_n=128)
    assert other.key("sm_90", "3.9.0") != UP.key("sm_90", "3.9.0")  # every constexpr is in the key
    assert UP.key("sm_90", "3.9.0") != UP.key("sm_100", "3.9.0")
