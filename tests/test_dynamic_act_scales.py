"""Dynamic activation scales (`--act-scales dynamic`, policy `act_scales = "dynamic"`): the
`quantize_dynamic` op's reference is the deployed numerics, checked against a hand-written
definition (FP8: one scale per token, row amax / 448; NVFP4: one global scale per tensor,
amax / (6 * 448), then the dynamic E4M3 block scales), per expert with offsets; a build needs no
calibration, stores no input_scale, records the choice in the manifest and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nemocompile
from nemocompile.base.errors import UsageError
from nemocompile.passes.precision_policy import resolve_policy
from nemocompile.runtime.formats import fake_quantize_nvfp4
from nemocompile.runtime.quantized_ops import quantize_dynamic
from nemocompile.targets import load_target

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def hand_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax, torch.tensor(448.0)) / 448
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def hand_nvfp4_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 by its definition: global = amax / (6 * 448); per 16-block an E4M3 scale of
    block_amax / (6 * global); each value to the nearest E2M1 magnitude (ties to even code)."""
    amax = x.abs().amax()
    global_scale = (amax if amax > 0 else torch.tensor(6.0)) / (6 * 448)
    blocks = x.reshape(-1, 16)
    block_scale = (blocks.abs().amax(dim=-1) / (6 * global_scale)).clamp(max=448).to(torch.float8_e4m3fn).float()
    denominator = (block_scale * global_scale)[:, None]
    scaled = torch.where(denominator > 0, blocks / denominator, torch.zeros_like(blocks))
    distance = (scaled.abs()[..., None] - E2M1).abs()
    best = distance.min(dim=-1, keepdim=True).values
    # ties go to the even code (codes 0..7 index E2M1; even index = even mantissa bit)
    candidates = torch.where(distance == best, torch.arange(8), torch.tensor(99))
    even = torch.where(candidates % 2 == 0, candidates, torch.tensor(99)).amin(dim=-1)
    code = torch.where(even < 99, even, candidates.amin(dim=-1))
    return (torch.sign(scaled) * E2M1[code] * denominator).reshape(x.shape)


def rows_of_different_sizes(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 64, generator=generator) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0  # an all-zero token
    return x


def test_fp8_dynamic_is_one_scale_per_token() -> None:
    x = rows_of_different_sizes(0)
    out = quantize_dynamic(x, "fp8")
    assert torch.equal(out, hand_fp8_per_token(x))
    assert torch.equal(out[2], torch.zeros(64))
    # per token: a row's result does not depend on the other rows
    assert torch.equal(quantize_dynamic(x[3:4], "fp8"), out[3:4])


def test_nvfp4_dynamic_is_one_global_scale_per_tensor() -> None:
    x = rows_of_different_sizes(1)
    # the global scale is the whole tensor's (the static path's block rules, ModelOpt-tested, below it)
    assert torch.equal(quantize_dynamic(x, "nvfp4"), fake_quantize_nvfp4(x, x.abs().amax() / (6 * 448)))
    # and by the definition written out here, where no block scale underflows E4M3
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(quantize_dynamic(x, "nvfp4"), hand_nvfp4_per_tensor(x))
    assert torch.equal(quantize_dynamic(torch.zeros(2, 32), "nvfp4"), torch.zeros(2, 32))


def test_grouped_rows_take_one_tensor_per_expert() -> None:
    x = rows_of_different_sizes(2)
    offsets = torch.tensor([0, 2, 2, 6])  # expert 1 has no rows
    out = quantize_dynamic(x, "fp8", offsets)
    assert torch.equal(out[:2], hand_fp8_per_token(x[:2])) and torch.equal(out[2:], hand_fp8_per_token(x[2:]))
    out = quantize_dynamic(x, "nvfp4", offsets)
    for rows in (slice(0, 2), slice(2, 6)):
        assert torch.equal(out[rows], fake_quantize_nvfp4(x[rows], x[rows].abs().amax() / (6 * 448)))
    assert not torch.equal(out, quantize_dynamic(x, "nvfp4"))  # a different global scale per expert


def test_policy_option_and_file(tmp_path: Path) -> None:
    target = load_target("b200")
    assert resolve_policy(target).act_scales == "static"
    assert resolve_policy(target, act_scales="dynamic").act_scales == "dynamic"
    path = tmp_path / "policy.toml"
    path.write_text('act_scales = "dynamic"\n')
    assert resolve_policy(target, policy_file=path).act_scales == "dynamic"
    assert resolve_policy(target, policy_file=path, act_scales="static").act_scales == "static"
    path.write_text('act_scales = "sometimes"\n')
    with pytest.raises(UsageError, match=r"act_scales must be static or dynamic, got 'sometimes'"):
        resolve_policy(target, policy_file=path)


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_dynamic_build_needs_no_calibration_and_runs(target: str, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = nemocompile.build(None, out, target=target, act_scales="dynamic")
    assert result.calibration is None
    text = (out / "graph.txt").read_text()
    assert "quantize_dynamic" in text and "input_scale" not in text and " quantize(" not in text
    assert result.manifest.policy.act_scales == "dynamic"
    assert result.agreement is not None and result.agreement.top1 > 0.5
    print(f"{target} dynamic: top-1 {result.agreement.top1:.4f}, mean KL {result.agreement.mean_kl:.3g}")
    engine = nemocompile.load(out)
    assert engine.manifest.policy.act_scales == "dynamic"
    assert engine.generate([[1, 2, 3]], max_new_tokens=4).shape == (1, 7)
