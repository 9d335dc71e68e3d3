"""The reference ops against transformers' own Nemotron-H code, on small random inputs.

Tolerances: float32 results must agree to 1e-5 of the expected tensor's largest magnitude
(``RTOL_FP32``), or exactly where both sides run the same torch calls. bfloat16 results must
agree to 1e-2 of the largest magnitude (``RTOL_BF16``, about two bfloat16 ulps), which allows
an intermediate float32 value to round to a neighbouring bfloat16.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from nemocompile.runtime.reference import (
    add,
    attention_gqa,
    causal_conv1d,
    gated_rms_norm,
    grouped_gemm,
    linear,
    moe_combine,
    moe_dispatch,
    moe_router,
    relu2,
    rms_norm,
    silu,
    ssd_chunk_scan,
    ssd_state_update,
)

RTOL_FP32 = 1e-5
RTOL_BF16 = 1e-2
DTYPES = [torch.float32, torch.bfloat16]
INF = float("inf")

HEADS, HEAD_DIM, GROUPS, STATE = 4, 8, 2, 16
CHUNK = 8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rtol(dtype: torch.dtype) -> float:
    return RTOL_FP32 if dtype == torch.float32 else RTOL_BF16


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Same dtype and shape, and max|actual - expected| <= rel * max|expected| (rel=0: bit-equal)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rel * scale, f"max|diff| = {err:.3g} > {rel:g} * max|expected| = {rel * scale:.3g}"


def tiny_config(**overrides: Any) -> transformers.NemotronHConfig:
    settings: dict[str, Any] = {
        "hidden_size": 32,
        "mamba_num_heads": HEADS,
        "mamba_head_dim": HEAD_DIM,
        "n_groups": GROUPS,
        "ssm_state_size": STATE,
        "conv_kernel": 4,
        "chunk_size": CHUNK,
        "time_step_min": 0.001,
        "layer_norm_epsilon": 1e-5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "moe_intermediate_size": 24,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    }
    settings.update(overrides)
    config = transformers.NemotronHConfig(**settings)
    config._experts_implementation = "eager"
    config._attn_implementation = "eager"
    return config


# ---------------------------------------------------------------- norms and pointwise ops


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_nemotron_h_rms_norm(dtype: torch.dtype) -> None:
    module = hf.NemotronHRMSNorm(32, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.normal_()
    x = (3 * torch.randn(3, 5, 32)).to(dtype)
    assert_close(rms_norm(x, module.weight, 1e-5), module(x).detach(), rel=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rms_norm_matches_nemotron_h_gated_norm(dtype: torch.dtype) -> None:
    width, groups = 32, 4
    module = hf.NemotronHRMSNormGated(width, group_size=width // groups, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.normal_()
    x, gate = torch.randn(3, 5, width).to(dtype), torch.randn(3, 5, width).to(dtype)
    expected = module(x, gate).detach()
    assert_close(gated_rms_norm(x, gate, module.weight, width // groups, 1e-5), expected, rel=0)
    # Per-group statistics: scaling one group must leave the other groups' outputs unchanged.
    x_scaled = x.clone()
    x_scaled[..., :8] *= 7
    changed = gated_rms_norm(x_scaled, gate, module.weight, width // groups, 1e-5)
    assert torch.equal(changed[..., 8:], expected[..., 8:])


def test_gated_rms_norm_float32_weight_on_bfloat16_input_promotes() -> None:
    module = hf.NemotronHRMSNormGated(16, group_size=8)
    with torch.no_grad():
        module.weight.normal_()
    x, gate = torch.randn(2, 16).bfloat16(), torch.randn(2, 16).bfloat16()
    assert_close(gated_rms_norm(x, gate, module.weight, 8, 1e-6), module(x, gate).detach(), rel=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_ops_match_transformers_activations(dtype: torch.dtype) -> None:
    x = (4 * torch.randn(3, 7, 16)).to(dtype)
    assert_close(relu2(x), ACT2FN["relu2"](x), rel=0)
    assert_close(silu(x), ACT2FN["silu"](x), rel=0)
    assert bool((relu2(x) >= 0).all()) and bool((relu2(-x.abs()) == 0).all())
    layer = torch.nn.Linear(16, 12, bias=True).to(dtype)
    assert_close(linear(x, layer.weight, layer.bias), layer(x).detach(), rel=0)
    assert_close(linear(x, layer.weight), (x @ layer.weight.T).detach(), rel=_rtol(dtype))
    assert_close(add(x, x), 2 * x, rel=0)


# ---------------------------------------------------------------- causal convolution

CONV_CHANNELS, CONV_K = 12, 4


def _conv_weights(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(CONV_CHANNELS, 1, CONV_K).to(dtype), torch.randn(CONV_CHANNELS).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 3, 10])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_prefill_matches_causal_conv1d_fn(
    dtype: torch.dtype, length: int, activation: str | None
) -> None:
    weight, bias = _conv_weights(dtype)
    x = torch.randn(3, length, CONV_CHANNELS).to(dtype)
    expected = hf.causal_conv1d_fn(x.transpose(1, 2), weight.squeeze(1), bias, activation=activation)
    y, state = causal_conv1d(x, weight, bias, activation, None)
    assert_close(y, expected.transpose(1, 2), rel=_rtol(dtype))
    padded = torch.cat([torch.zeros(3, CONV_K - 1, CONV_CHANNELS, dtype=dtype), x], dim=1)
    assert torch.equal(state, padded[:, -(CONV_K - 1) :].transpose(1, 2))
    # The [C, K] layout gives the same result as the checkpoint's [C, 1, K].
    assert torch.equal(causal_conv1d(x, weight.squeeze(1), bias, activation, None)[0], y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_decode_matches_causal_conv1d_update(dtype: torch.dtype) -> None:
    weight, bias = _conv_weights(dtype)
    state = torch.randn(3, CONV_CHANNELS, CONV_K - 1).to(dtype)
    x = torch.randn(3, 1, CONV_CHANNELS).to(dtype)
    hf_state = state.clone()
    expected = hf.causal_conv1d_update(
        x.transpose(1, 2), hf_state, weight.squeeze(1), bias, activation="silu"
    )
    y, new_state = causal_conv1d(x, weight, bias, "silu", state)
    # One window per channel is summed directly, not through F.conv1d (a tenth of the time at
    # decode), so the products are added in another order: equal to rounding, not bit for bit.
    assert_close(y, expected.transpose(1, 2), rel=RTOL_FP32 if dtype == torch.float32 else RTOL_BF16)
    assert torch.equal(new_state, hf_state)


def test_causal_conv1d_prefill_then_decode_equals_full_sequence() -> None:
    weight, bias = _conv_weights(torch.float32)
    x = torch.randn(3, 11, CONV_CHANNELS)
    full, full_state = causal_conv1d(x, weight, bias, "silu", None)
    pieces, state = [], None
    for begin, end in [(0, 2), (2, 7), *((t, t + 1) for t in range(7, 11))]:
        y, state = causal_conv1d(x[:, begin:end], weight, bias, "silu", state)
        pieces.append(y)
    assert state is not None
    assert_close(torch.cat(pieces, dim=1), full, rel=RTOL_FP32)
    assert torch.equal(state, full_state)


# ---------------------------------------------------------------- Mamba2 SSD


def _ssd_inputs(
    batch: int, length: int, dtype: torch.dtype, n_groups: int = GROUPS
) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(batch, length, HEADS * HEAD_DIM).to(dtype),
        # Wide spread so that softplus(dt + dt_bias) falls below time_step_min for some steps.
        "dt": (torch.randn(batch, length, HEADS) * 3 - 2).to(dtype),
        "A_log": torch.log(torch.linspace(0.5, 8.0, HEADS)).to(dtype),
        "B": torch.randn(batch, length, n_groups * STATE).to(dtype),
        "C": torch.randn(batch, length, n_groups * STATE).to(dtype),
        "D": torch.randn(HEADS).to(dtype),
        "dt_bias": torch.randn(HEADS).to(dtype),
    }


def _sizes(n_groups: int = GROUPS) -> dict[str, int]:
    return {"num_heads": HEADS, "head_dim": HEAD_DIM, "n_groups": n_groups, "state_size": STATE}


def _slice(inputs: dict[str, torch.Tensor], begin: int, end: int) -> dict[str, torch.Tensor]:
    per_token = ("x", "dt", "B", "C")
    return {name: (t[:, begin:end] if name in per_token else t) for name, t in inputs.items()}


def _hf_chunk_scan(
    inputs: dict[str, torch.Tensor],
    n_groups: int,
    dt_min: float,
    initial_state: torch.Tensor | None,
    chunk_size: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, _ = inputs["x"].shape
    y, state = hf.mamba2_chunk_scan(
        inputs["x"].view(batch, length, HEADS, HEAD_DIM),
        inputs["dt"],
        -torch.exp(inputs["A_log"].float()),
        inputs["B"].view(batch, length, n_groups, STATE),
        inputs["C"].view(batch, length, n_groups, STATE),
        chunk_size=chunk_size,
        D=inputs["D"],
        dt_bias=inputs["dt_bias"],
        initial_states=initial_state,
        dt_softplus=True,
        dt_limit=(dt_min, INF),
        return_final_states=True,
    )
    return y.reshape(batch, length, -1), state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "length", "n_groups", "chunk_size"),
    [
        (3, 1, GROUPS, CHUNK),
        (3, 13, GROUPS, CHUNK),
        (2, 16, 1, CHUNK),
        (1, 21, 4, CHUNK),
        (2, 300, GROUPS, 128),
    ],
)
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_ssd_chunk_scan_matches_mamba2_chunk_scan(
    dtype: torch.dtype, batch: int, length: int, n_groups: int, chunk_size: int, with_initial_state: bool
) -> None:
    inputs = _ssd_inputs(batch, length, dtype, n_groups)
    initial = torch.randn(batch, HEADS, HEAD_DIM, STATE) if with_initial_state else None
    expected_y, expected_state = _hf_chunk_scan(inputs, n_groups, 0.001, initial, chunk_size)
    y, state = ssd_chunk_scan(
        **inputs, **_sizes(n_groups), chunk_size=chunk_size, dt_min=0.001, dt_max=INF, initial_state=initial
    )
    # Both sides compute in float32 after the step size, so bfloat16 inputs keep the float32 tolerance.
    assert y.dtype == torch.float32 and state.dtype == torch.float32
    assert_close(y, expected_y, rel=RTOL_FP32)
    assert_close(state, expected_state, rel=RTOL_FP32)


def test_ssd_chunk_scan_clamps_dt() -> None:
    inputs = _ssd_inputs(2, 12, torch.float32)
    kwargs = {**_sizes(), "chunk_size": CHUNK, "initial_state": None}
    clamped, _ = ssd_chunk_scan(**inputs, **kwargs, dt_min=0.001, dt_max=0.5)
    unclamped, _ = ssd_chunk_scan(**inputs, **kwargs, dt_min=0.0, dt_max=INF)
    assert not torch.allclose(clamped, unclamped)
    expected, _ = _hf_chunk_scan(inputs, GROUPS, 0.0, None)
    assert_close(unclamped, expected, rel=RTOL_FP32)


@pytest.mark.parametrize("split", [1, 5, 8, 11])
def test_ssd_chunk_scan_continues_from_initial_state(split: int) -> None:
    inputs = _ssd_inputs(3, 19, torch.float32)
    kwargs = {**_sizes(), "chunk_size": CHUNK, "dt_min": 0.001, "dt_max": INF}
    full_y, full_state = ssd_chunk_scan(**inputs, **kwargs, initial_state=None)
    head_y, head_state = ssd_chunk_scan(**_slice(inputs, 0, split), **kwargs, initial_state=None)
    tail_y, tail_state = ssd_chunk_scan(**_slice(inputs, split, 19), **kwargs, initial_state=head_state)
    assert_close(torch.cat([head_y, tail_y], dim=1), full_y, rel=RTOL_FP32)
    assert_close(tail_state, full_state, rel=RTOL_FP32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ssd_state_update_matches_mamba2_selective_state_update(dtype: torch.dtype) -> None:
    batch = 3
    inputs = _ssd_inputs(batch, 1, dtype)
    state = torch.randn(batch, HEADS, HEAD_DIM, STATE)
    state_before, hf_state = state.clone(), state.clone()
    # Arguments shaped exactly as NemotronHMamba2Mixer passes them on its decode path.
    expected = hf.mamba2_selective_state_update(
        hf_state,
        inputs["x"].view(batch, HEADS, HEAD_DIM),
        inputs["dt"].transpose(1, 2).expand(-1, -1, HEAD_DIM),
        (-torch.exp(inputs["A_log"].float()))[:, None, None].expand(-1, HEAD_DIM, STATE),
        inputs["B"].view(batch, GROUPS, STATE),
        inputs["C"].view(batch, GROUPS, STATE),
        inputs["D"][:, None].expand(-1, HEAD_DIM),
        z=None,
        dt_bias=inputs["dt_bias"][:, None].expand(-1, HEAD_DIM),
        dt_softplus=True,
    )
    y, new_state = ssd_state_update(**inputs, **_sizes(), dt_min=0.0, dt_max=INF, state=state)
    assert_close(y, expected.reshape(batch, 1, -1), rel=0)
    assert_close(new_state, hf_state, rel=0)
    assert torch.equal(state, state_before)  # unlike transformers, ours leaves its input state untouched


@pytest.mark.parametrize("dt_min", [0.0, 0.001])
def test_ssd_state_update_token_by_token_equals_chunk_scan(dt_min: float) -> None:
    length = 13
    inputs = _ssd_inputs(3, length, torch.float32)
    initial = torch.randn(3, HEADS, HEAD_DIM, STATE)
    full_y, full_state = ssd_chunk_scan(
        **inputs, **_sizes(), chunk_size=CHUNK, dt_min=dt_min, dt_max=INF, initial_state=initial
    )
    state, ys = initial, []
    for t in range(length):
        y, state = ssd_state_update(
            **_slice(inputs, t, t + 1), **_sizes(), dt_min=dt_min, dt_max=INF, state=state
        )
        ys.append(y)
    assert_close(torch.cat(ys, dim=1), full_y, rel=RTOL_FP32)
    assert_close(state, full_state, rel=RTOL_FP32)


def test_ssd_state_update_applies_a_given_clamp() -> None:
    inputs = _ssd_inputs(3, 1, torch.float32)
    inputs["dt"] = torch.full_like(inputs["dt"], -12.0)  # softplus(dt + bias) far below 0.01
    state = torch.randn(3, HEADS, HEAD_DIM, STATE)
    unclamped, _ = ssd_state_update(**inputs, **_sizes(), dt_min=0.0, dt_max=INF, state=state)
    clamped, _ = ssd_state_update(**inputs, **_sizes(), dt_min=0.01, dt_max=INF, state=state)
    # Choose a raw dt whose softplus is exactly 0.01: the unclamped update must then agree.
    inverse_softplus = torch.log(torch.expm1(torch.tensor(0.01)))
    at_floor = {**inputs, "dt": (inverse_softplus - inputs["dt_bias"]).expand_as(inputs["dt"])}
    reference, _ = ssd_state_update(**at_floor, **_sizes(), dt_min=0.0, dt_max=INF, state=state)
    assert not torch.allclose(clamped, unclamped)
    assert_close(clamped, reference, rel=RTOL_FP32)


# ---------------------------------------------------------------- Mamba2 mixer, assembled from the ops


def _mixer(dtype: torch.dtype) -> tuple[transformers.NemotronHConfig, hf.NemotronHMamba2Mixer]:
    config = tiny_config()
    mixer = hf.NemotronHMamba2Mixer(config, layer_idx=0)
    with torch.no_grad():
        mixer.A_log.copy_(torch.log(torch.linspace(0.5, 8.0, HEADS)))
        mixer.D.normal_()
        mixer.dt_bias.normal_(mean=-1.0, std=2.0)
        mixer.norm.weight.normal_()
    return config, mixer.to(dtype).eval()


def _our_mixer(
    mixer: hf.NemotronHMamba2Mixer,
    hidden: torch.Tensor,
    conv_state: torch.Tensor | None,
    ssm_state: torch.Tensor | None,
    dt_min: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inner, bc = HEADS * HEAD_DIM, GROUPS * STATE
    projected = linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias)
    gate, xbc, dt = projected.split([inner, inner + 2 * bc, HEADS], dim=-1)
    xbc, conv_state = causal_conv1d(xbc, mixer.conv1d.weight, mixer.conv1d.bias, "silu", conv_state)
    x, B, C = xbc.split([inner, bc, bc], dim=-1)
    params = {"A_log": mixer.A_log, "D": mixer.D, "dt_bias": mixer.dt_bias}
    if ssm_state is not None and hidden.shape[1] == 1:
        y, ssm_state = ssd_state_update(
            x, dt, B=B, C=C, **params, **_sizes(), dt_min=dt_min, dt_max=INF, state=ssm_state
        )
    else:
        y, ssm_state = ssd_chunk_scan(
            x,
            dt,
            B=B,
            C=C,
            **params,
            **_sizes(),
            chunk_size=CHUNK,
            dt_min=dt_min,
            dt_max=INF,
            initial_state=ssm_state,
        )
    y = gated_rms_norm(y, gate, mixer.norm.weight, inner // GROUPS, mixer.norm.variance_epsilon)
    return linear(y.to(hidden.dtype), mixer.out_proj.weight, mixer.out_proj.bias), conv_state, ssm_state


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_mixer_prefill_then_decode_matches_nemotron_h_mamba2_mixer(dtype: torch.dtype) -> None:
    config, mixer = _mixer(dtype)
    cache = DynamicCache(config=config)
    hidden = torch.randn(3, 11, config.hidden_size).to(dtype)
    expected = mixer(hidden, cache=cache)
    ours, conv_state, ssm_state = _our_mixer(mixer, hidden, None, None, config.time_step_min)
    assert_close(ours, expected, rel=_rtol(dtype))
    for _ in range(3):
        token = torch.randn(3, 1, config.hidden_size).to(dtype)
        expected = mixer(token, cache=cache)
        # transformers' decode path does not clamp dt (see the ssd module docstring).
        ours, conv_state, ssm_state = _our_mixer(mixer, token, conv_state, ssm_state, 0.0)
        assert_close(ours, expected, rel=_rtol(dtype))
    hf_ssm_state, hf_conv_state = cache.get_recurrent_state(0), cache.get_conv_state(0)
    assert hf_ssm_state is not None and hf_conv_state is not None
    assert_close(ssm_state, hf_ssm_state.float(), rel=RTOL_FP32)
    # transformers keeps K conv inputs; the oldest is never read, ours keeps the last K-1.
    assert torch.equal(conv_state, hf_conv_state[:, :, 1:])


# ---------------------------------------------------------------- attention


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """transformers' eager attention on [B, H, T, Dh] tensors with its additive causal mask."""
    length, total = q.shape[2], k.shape[2]
    visible = torch.arange(total)[None, :] <= torch.arange(length)[:, None] + past
    mask = torch.zeros(length, total, dtype=q.dtype).masked_fill(~visible, torch.finfo(q.dtype).min)
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    out, _ = hf.eager_attention_forward(module, q, k, v, mask[None, None], scaling=scale)
    return out.reshape(q.shape[0], length, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("past", "length"), [(0, 7), (5, 1), (6, 4)])
def test_attention_gqa_matches_eager_attention_forward(dtype: torch.dtype, past: int, length: int) -> None:
    batch, hq, hkv, dh = 3, 4, 2, 8
    scale = dh**-0.5
    q = torch.randn(batch, length, hq * dh).to(dtype)
    k, v = (torch.randn(batch, length, hkv * dh).to(dtype) for _ in range(2))
    past_k = torch.randn(batch, hkv, past, dh).to(dtype) if past else None
    past_v = torch.randn(batch, hkv, past, dh).to(dtype) if past else None
    out, k_all, v_all = attention_gqa(
        q, k, v, num_heads=hq, num_kv_heads=hkv, head_dim=dh, scale=scale, past_k=past_k, past_v=past_v
    )
    assert k_all.shape == (batch, hkv, past + length, dh)
    assert torch.equal(k_all[:, :, past:], k.view(batch, length, hkv, dh).transpose(1, 2))
    assert torch.equal(v_all[:, :, past:], v.view(batch, length, hkv, dh).transpose(1, 2))
    heads = q.view(batch, length, hq, dh).transpose(1, 2)
    assert_close(out, _eager(heads, k_all, v_all, past, scale), rel=_rtol(dtype))


def test_attention_with_past_equals_full_causal_attention() -> None:
    batch, hq, hkv, dh, length = 3, 6, 2, 8, 9
    q = torch.randn(batch, length, hq * dh)
    k, v = torch.randn(batch, length, hkv * dh), torch.randn(batch, length, hkv * dh)
    sizes = {"num_heads": hq, "num_kv_heads": hkv, "head_dim": dh, "scale": 0.3}
    full, _, _ = attention_gqa(q, k, v, **sizes, past_k=None, past_v=None)
    head, k_all, v_all = attention_gqa(q[:, :4], k[:, :4], v[:, :4], **sizes, past_k=None, past_v=None)
    pieces = [head]
    for t in range(4, length):
        out, k_all, v_all = attention_gqa(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], **sizes, past_k=k_all, past_v=v_all
        )
        pieces.append(out)
    assert_close(torch.cat(pieces, dim=1), full, rel=RTOL_FP32)
    # Causality: changing the last key changes only the last query's output.
    k_changed = k.clone()
    k_changed[:, -1] += 5
    changed, _, _ = attention_gqa(q, k_changed, v, **sizes, past_k=None, past_v=None)
    assert torch.equal(changed[:, :-1], full[:, :-1]) and not torch.equal(changed[:, -1], full[:, -1])


# ---------------------------------------------------------------- MoE


def _router(config: transformers.NemotronHConfig) -> hf.NemotronHTopkRouter:
    router = hf.NemotronHTopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(std=0.3)
        router.e_score_correction_bias.normal_(std=0.5)
    return router


def _route(router: hf.NemotronHTopkRouter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return moe_router(
        x,
        router.weight,
        router.e_score_correction_bias,
        top_k=router.top_k,
        n_group=router.num_group,
        topk_group=router.topk_group,
        norm_topk_prob=router.norm_topk_prob,
        routed_scaling_factor=router.routed_scaling_factor,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize(("n_group", "topk_group"), [(4, 2), (1, 1), (8, 3)])
def test_moe_router_matches_nemotron_h_topk_router(
    dtype: torch.dtype, norm_topk_prob: bool, n_group: int, topk_group: int
) -> None:
    config = tiny_config(n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob)
    router = _router(config)
    x = torch.randn(40, config.hidden_size).to(dtype)
    _, expected_weights, expected_ids = router(x)
    weights, ids = _route(router, x)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, expected_ids)
    assert_close(weights, expected_weights.detach(), rel=0)
    if norm_topk_prob:
        assert torch.allclose(weights.sum(-1), torch.full((40,), 2.5))
    # Group limiting: every token's experts come from at most topk_group groups.
    groups_used = F.one_hot(ids // (16 // n_group), n_group).amax(dim=1).sum(-1)
    assert int(groups_used.max()) <= topk_group


def test_moe_router_group_limit_changes_the_choice() -> None:
    router = _router(tiny_config(n_group=4, topk_group=1))
    x = torch.randn(64, 32)
    _, limited_ids = _route(router, x)
    unlimited = torch.topk(torch.sigmoid(x @ router.weight.T) + router.e_score_correction_bias, 4).indices
    assert not torch.equal(limited_ids.sort(-1).values, unlimited.sort(-1).values)


def test_moe_dispatch_groups_pairs_by_expert() -> None:
    num_tokens, top_k, num_experts = 9, 3, 6
    x = torch.randn(num_tokens, 5)
    ids = torch.stack([torch.randperm(num_experts - 1)[:top_k] for _ in range(num_tokens)])  # expert 5 unused
    x_sorted, offsets, order = moe_dispatch(x, ids, num_experts)
    assert offsets.dtype == torch.int64 and order.dtype == torch.int64
    assert offsets.tolist() == [0, *torch.bincount(ids.flatten(), minlength=num_experts).cumsum(0).tolist()]
    assert offsets[-1] == offsets[-2]
    assert torch.equal(x_sorted, x[order // top_k])
    for expert in range(num_experts):
        pairs = order[offsets[expert] : offsets[expert + 1]]
        assert torch.equal(pairs, (ids.flatten() == expert).nonzero().flatten())  # stable: ascending pairs


def test_grouped_gemm_multiplies_each_row_by_its_experts_weight() -> None:
    offsets = torch.tensor([0, 3, 3, 7, 8])
    weight = torch.randn(4, 6, 5)
    x_sorted = torch.randn(8, 5)
    row_expert = torch.repeat_interleave(torch.arange(4), offsets.diff())
    expected = torch.einsum("mk,mnk->mn", x_sorted, weight[row_expert])
    assert_close(grouped_gemm(x_sorted, offsets, weight), expected, rel=RTOL_FP32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_pipeline_matches_nemotron_h_experts(dtype: torch.dtype) -> None:
    config = tiny_config()
    router = _router(config)
    experts = hf.NemotronHExperts(config)
    with torch.no_grad():
        experts.up_proj.normal_(std=0.3)
        experts.down_proj.normal_(std=0.3)
    experts = experts.to(dtype)
    num_tokens = 7  # few tokens, 16 experts: some experts get no rows
    x = torch.randn(num_tokens, config.hidden_size).to(dtype)
    weights, ids = _route(router, x)
    expected = experts(x, ids, weights).detach()

    x_sorted, offsets, order = moe_dispatch(x, ids, config.n_routed_experts)
    assert bool((offsets.diff() == 0).any())
    hidden = relu2(grouped_gemm(x_sorted, offsets, experts.up_proj))
    y_sorted = grouped_gemm(hidden, offsets, experts.down_proj)
    out = moe_combine(y_sorted, order, weights, num_tokens).detach()
    assert_close(out, expected, rel=RTOL_FP32 if dtype == torch.float32 else RTOL_BF16)


def test_moe_combine_weights_and_sums_in_float32() -> None:
    num_tokens, top_k = 5, 2
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])
    weights = torch.rand(num_tokens, top_k)
    _, _, order = moe_dispatch(torch.zeros(num_tokens, 1), ids, 3)
    y_sorted = torch.randn(num_tokens * top_k, 4).bfloat16()
    out = moe_combine(y_sorted, order, weights, num_tokens)
    assert out.dtype == torch.bfloat16
    per_pair = torch.empty(num_tokens * top_k, 4)
    per_pair[order] = y_sorted.float()
    expected = (per_pair.view(num_tokens, top_k, 4) * weights[..., None]).sum(1)
    assert_close(out, expected.bfloat16(), rel=RTOL_BF16)
