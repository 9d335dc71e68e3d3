"""The CPU parts of bench/gpu_tune.py (the GPU sweep itself needs a lent GPU): Nano's expert GEMMs
and their candidates, the selection that rejects a config whose output differs from the default's,
failures scored infinitely slow, and the measured path (synthetic inputs, the launch, the timer)
run once in the interpreter on tiny shapes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton", reason="the tuning bench sweeps Triton kernels (the [triton] extra)")

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.codegen.tuning import space
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.targets import load_target
from nemocompile.tune_measure import MeasuredTimer, kernel_files, synthetic_call

ROOT = Path(__file__).resolve().parents[1]
NANO = {"hidden_size": 2688, "moe_intermediate_size": 1856, "n_routed_experts": 128, "num_experts_per_tok": 6}


def _gpu_tune():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_tune", ROOT / "bench" / "gpu_tune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_tune"] = module
    spec.loader.exec_module(module)
    return module


def test_nano_expert_gemms_and_their_candidates() -> None:
    gpu_tune = _gpu_tune()
    up, down = gpu_tune.expert_gemms(NANO, "bf16")
    assert dict(up.constexprs)["K"] == 2688 and dict(down.constexprs)["N"] == 2688 and dict(down.constexprs)["COMBINE"]
    h100 = load_target("h100")
    for tokens in (1, 256):
        chosen = gpu_tune.candidates(up, tokens, h100, 8)
        assert len(chosen) == len(set(chosen)) == 8 and space.config_of(up) in chosen
        assert all(space.why_pruned(up, c, "sm_90") is None for c in chosen)
        assert any(dict(c)["SPLIT_K"] > 1 for c in chosen)  # measured whatever the model thinks of it


def test_selection_rejects_a_config_that_differs_from_the_default() -> None:
    gpu_tune = _gpu_tune()
    up, _ = gpu_tune.expert_gemms(NANO, "bf16")
    configs = gpu_tune.candidates(up, 8, load_target("h100"), 4)
    default = space.config_of(up)
    fast_but_wrong, broken, right = (c for c in configs if c != default)
    good = torch.linspace(-1, 1, 64)

    def run(instance: KernelInstance, config: space.Config, tokens: int) -> tuple[float, torch.Tensor]:
        if config == broken:
            raise RuntimeError("does not compile")
        seconds = {fast_but_wrong: 1e-6, right: 2e-6, default: 3e-6}[config]
        return seconds, good + (1.0 if config == fast_but_wrong else 0.0)

    row = gpu_tune.tune_one(up, 8, configs, run, deadline=math.inf)
    assert row.config == right and row.tuned == 2e-6 and row.default == 3e-6 and row.failed == 1
    assert row.tried == 4 and row.check.startswith("matches the default")


def test_measured_path_runs_in_the_interpreter(tmp_path: Path) -> None:
    """The timed call on synthetic inputs, for three configs of one kernel (another BLOCK_K, and
    split-K with its reduce kernel): all write the same numbers up to the fp32 sum's order (tiles
    do not change what a GEMM computes), and the timer times one of each."""
    tiny = catalog.moe_gemm("up", "moe_expert_up", n=64, k=128, experts=4, top_k=2, act_format="bf16", gather=True,
                            activation="relu2", block_m=16, block_n=64, block_k=32)
    default = space.config_of(tiny)
    split = tuple(sorted({**dict(default), "SPLIT_K": 2}.items()))
    outputs = []
    for config in (default, tuple(sorted({**dict(default), "BLOCK_K": 64}.items())), split):
        configured = catalog.with_split_k_reduces([space.apply(tiny, config)])
        kernels = TritonKernels.from_files(kernel_files(configured, "sm_90", tmp_path, torch.device("cpu")), "cpu")
        call, out = synthetic_call(kernels, configured[0], 4, torch.device("cpu"),
                                   configured[1].name if len(configured) > 1 else None)
        out.fill_(float("nan"))
        call()
        outputs.append(out.clone())
    assert not torch.isnan(outputs[0]).any() and float(outputs[0].float().abs().max()) > 0
    torch.testing.assert_close(outputs[1], outputs[0], rtol=2**-7, atol=0.0)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=2**-7, atol=0.0)
    timer = MeasuredTimer("sm_90", tmp_path, torch.device("cpu"), repeats=1, warmup=0)
    assert timer(tiny, default, 4) > 0 and timer(tiny, split, 4) > 0


def _timed_outputs(instances: list[KernelInstance], arch: str, tmp_path: Path,
                   handed: list[Any], pick: Any) -> list[torch.Tensor]:
    """Each instance's synthetic timed call run once in the interpreter on a NaN-filled output: the
    outputs, and `pick(arguments)` of each launch appended to `handed`."""
    outputs = []
    for kernel in instances:
        kernels = TritonKernels.from_files(kernel_files([kernel], arch, tmp_path, torch.device("cpu")), "cpu")
        launch = kernels.launch

        def spy(name: str, grid: Any, launch: Any = launch, **arguments: Any) -> Any:
            handed.append(pick(arguments))
            return launch(name, grid, **arguments)

        kernels.launch = spy  # type: ignore[method-assign]
        call, out = synthetic_call(kernels, kernel, 3, torch.device("cpu"))
        out.fill_(float("nan"))
        call()
        outputs.append(out.clone())
    assert not torch.isnan(outputs[1]).any() and float(outputs[1].float().abs().max()) > 0
    return outputs


def test_measured_fp8_linear_on_norm_codes_reads_codes(tmp_path: Path) -> None:
    """An FP8 GEMM fed by a fused norm takes E4M3 codes: the timed call hands it codes (the bf16
    activations quantized with the input scale; its compiled binary reads 1-byte codes, while the
    interpreter would take bf16 too), so it computes what the kernel that quantizes the same
    activations on load computes."""
    handed: list[Any] = []
    instances = [catalog.fp8_linear(f"fp8_{x_dtype}", "quant_linear", n=32, k=64, quant_act=True, x_dtype=x_dtype,
                                    block_k=32) for x_dtype in ("bf16", "fp8e4nv")]
    outputs = _timed_outputs(instances, "sm_90", tmp_path, handed, lambda arguments: arguments["x_ptr"].dtype)
    assert handed == [torch.bfloat16, torch.float8_e4m3fn]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0.0, atol=0.0)


def test_measured_w4a4_linear_on_nvfp4_norm_codes_reads_codes(tmp_path: Path) -> None:
    """A dense W4A4 GEMM fed by a fused NVFP4 norm takes packed codes and block scales: the timed call
    hands it codes (its compiled binary reads 0.5-byte codes and an E4M3 scale per 16, where bf16
    activations would be read out of bounds), so it computes what the kernel that quantizes the same
    activations on load computes."""
    handed: list[Any] = []
    instances = [catalog.nvfp4_linear(f"w4a4_{x_dtype}", "quant_linear", n=32, k=64, act_format="nvfp4",
                                      x_dtype=x_dtype, block_k=64) for x_dtype in ("bf16", "u8")]
    outputs = _timed_outputs(instances, "sm_100", tmp_path, handed,
                             lambda arguments: (arguments["x_ptr"].dtype, arguments["x_scale_ptr"].shape))
    assert handed[1] == (torch.uint8, (3, 4)) and handed[0][0] == torch.bfloat16
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0.0, atol=0.0)
