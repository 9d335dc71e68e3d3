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


def test_every_kernel_passes_its_check_in_the_interpreter(kernels: TritonKernels) -> None:
    assert gpu_check.check(kernels, HIDDEN, INTER, EXPERTS, TOP_K, "bf16", device="cpu", token_counts=(1, 9))
    assert ops_check.check(kernels, ops_check.TINY, "cpu", prompt=37)


def test_a_wrong_kernel_fails_the_check(kernels: TritonKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    real = triton_gemm.moe_expert_up

    def off_by_a_few_ulps(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        return out.mul_(1 + 2.0**-4)  # 8 to 16 bf16 ulps

    monkeypatch.setattr(triton_gemm, "moe_expert_up", off_by_a_few_ulps)
    assert not gpu_check.check(kernels, HIDDEN, INTER, EXPERTS, TOP_K, "bf16", device="cpu", token_counts=(9,))


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
