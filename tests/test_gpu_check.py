"""The CPU-importable parts of the prepared GPU check (bench/gpu_check.py with bench/ops_check.py):
its kernel set emits and runs, its correctness checks pass on right kernels and fail on a wrong one,
the roofline's byte count is the one its docstring states, and without a GPU it refuses with exit
status 2. The checks run here in Triton's interpreter at tiny shapes; on a lent GPU the same
functions run the compiled binaries at the model's shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton.emit import emit
from nemocompile.runtime.kernels import triton_gemm
from nemocompile.runtime.kernels.triton_loader import TritonKernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check
import ops_check

HIDDEN, INTER, EXPERTS, TOP_K = 64, 128, 4, 2


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> TritonKernels:
    root = tmp_path_factory.mktemp("gpu-check")
    instances = gpu_check.kernel_set(HIDDEN, INTER, EXPERTS, TOP_K, "bf16") + ops_check.kernel_set(ops_check.TINY)
    emit(instances, root, "sm_90", root / "cache", compile_binaries=False)
    return TritonKernels.from_directory(root, "cpu")


def _dry_run(arch: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert gpu_check.main(["--dry-run", "--arch", arch, "--iters", "1"]) == 0
    return capsys.readouterr().out


def test_the_dry_run_goes_through_the_whole_script(capsys: pytest.CaptureFixture[str]) -> None:
    """main() end to end in the interpreter (H200 flavour, W4A16): every kernel of the set is checked
    against its reference and passes, and the MoE decode table has a row per batch, against the
    unfused torch reference and the HBM roofline."""
    out = _dry_run("sm_90", capsys)
    for name in ("moe_expert_up", "moe_expert_down", "fp8_linear ", "fp8_linear codes", "dense_w4a16 in_proj",
                 "dense_w4a16 out_proj", "add_rms_norm fp8",
                 "add_rms_norm nvfp4", "gated_rms_norm", "causal_conv1d", "ssd_state_update", "ssd_chunk_scan",
                 "attention_gqa", "moe_route"):
        assert f"  {name}" in out, name
    assert "FAIL" not in out and "correctness ok" in out and "W4A16" in out and "(h200)" in out
    table = out.split("fused MoE experts at decode")[1].splitlines()
    assert "roofline us" in table[1] and "unfused us" in table[1]
    assert [int(line.split()[0]) for line in table[2:2 + len(gpu_check.DRY_RUN_BATCHES)]] == \
        list(gpu_check.DRY_RUN_BATCHES)
    dense = out.split("dense NVFP4 GEMMs at decode")[1].splitlines()
    assert "roofline us" in dense[1] and "torch us" in dense[1]
    rows = [line.split() for line in dense[2:2 + 2 * len(gpu_check.DRY_RUN_BATCHES)]]
    assert [(row[0], int(row[1])) for row in rows] == [(f"dense_{name}", batch) for name in ("in_proj", "out_proj")
                                                      for batch in gpu_check.DRY_RUN_BATCHES]


@pytest.mark.slow
def test_the_dry_run_of_the_b200_flavour(capsys: pytest.CaptureFixture[str]) -> None:
    out = _dry_run("sm_100", capsys)
    assert "correctness ok" in out and "W4A4" in out and "(b200)" in out


def test_a_wrong_kernel_fails_the_check(kernels: TritonKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    real = triton_gemm.moe_expert_up

    def off_by_a_few_ulps(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        return out.mul_(1 + 2.0**-4)  # 8 to 16 bf16 ulps

    monkeypatch.setattr(triton_gemm, "moe_expert_up", off_by_a_few_ulps)
    assert not gpu_check.check(kernels, HIDDEN, INTER, EXPERTS, TOP_K, "bf16", device="cpu", token_counts=(9,))


def test_a_wrong_dense_kernel_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    instances = gpu_check.dense_kernel_set({"out_proj": (HIDDEN, INTER)}, "bf16", sm_count=132)
    emit(instances, tmp_path, "sm_90", tmp_path / "cache", compile_binaries=False)
    kernels = TritonKernels.from_directory(tmp_path, "cpu")
    assert gpu_check.check_dense(kernels, "bf16", device="cpu", token_counts=(3,))
    real = triton_gemm.nvfp4_linear

    def off_by_a_few_ulps(*args: object, **kwargs: object) -> torch.Tensor:
        return real(*args, **kwargs).mul_(1 + 2.0**-4)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_gemm, "nvfp4_linear", off_by_a_few_ulps)
    assert not gpu_check.check_dense(kernels, "bf16", device="cpu", token_counts=(3,))


def test_dense_split_k_only_where_programs_leave_sms_idle() -> None:
    # Nano's out_proj at decode: N 2688 / 64 = 42 programs on 132 SMs; 32 K steps of 128
    assert gpu_check._dense_split(2688, 4096, 64, 128, 132) == 4
    assert gpu_check._dense_split(10304, 2688, 64, 128, 132) == 1  # in_proj: 161 programs already
    assert gpu_check._dense_split(64, 64, 64, 64, 132) == 1  # one K step: nothing to split
    dense = gpu_check.dense_kernel_set({"out_proj": (2688, 4096)}, "bf16", sm_count=132)
    assert [k.name for k in dense] == ["dense_out_proj", "dense_out_proj_splitk4",
                                       "dense_out_proj_splitk4" + "_splitk_reduce"]


def test_dense_roofline_bytes() -> None:
    n, k, batch = 256, 512, 3
    assert gpu_check.dense_hbm_bytes(n, k, batch) == n * k // 2 + n * k // 16 + 4 + batch * k * 2 + batch * n * 2


def test_roofline_bytes_count_weights_scales_and_activations() -> None:
    d, i, top_k, touched, batch = 256, 512, 4, 3, 2
    weights = 2 * (i * d // 2)  # up and down, two E2M1 codes per byte
    block_scales = 2 * (i * d // 16)  # one E4M3 byte per 16 weights
    global_scales = 2 * 4
    activations = batch * d * 2 * 2 + batch * top_k * i * 2 * 2  # bf16 in and out; hidden written and read
    assert gpu_check.hbm_bytes(touched, batch, d, i, top_k) == touched * (weights + block_scales + global_scales) \
        + activations


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
