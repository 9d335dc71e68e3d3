"""Launch wrappers of the norm, Mamba, attention and router kernels (codegen/triton/templates:
norms, conv1d, ssd, attention, moe_route): they check their inputs, allocate the outputs (through
`alloc`, which tests replace with a NaN-poisoning one) and pass the kernel's arguments by name. Each
has the signature of the reference op it implements (runtime/reference/*.py), plus the engine's
kernels and the kernel names; tests/test_triton_ops.py checks them against those references."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .triton_loader import TritonKernels

# Allocates an output: (shape, dtype, device) -> tensor.
Alloc = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _placeholder(device: torch.device) -> torch.Tensor:
    """A pointer argument a specialisation does not read."""
    return torch.ones(1, dtype=torch.float32, device=device)


def add_rms_norm(kernels: TritonKernels, name: str, x: torch.Tensor, residual: torch.Tensor | None,
                 weight: torch.Tensor, eps: float, input_scale: torch.Tensor | None = None,
                 alloc: Alloc = empty) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(out, residual_out) for x, residual [..., D] (residual None: a plain rms_norm, residual_out is x).
    out is (y,) in the stream dtype, (fp8 data,) for ACT_FORMAT "fp8", (packed uint8 [..., D/2],
    block scales e4m3 [..., D/16]) for "nvfp4" (input_scale is the static global scale)."""
    width = int(kernels.constexpr(name, "WIDTH"))
    act_format = str(kernels.constexpr(name, "ACT_FORMAT"))
    if x.shape[-1] != width:
        raise ValueError(f"add_rms_norm: kernel {name} normalises rows of {width}, not {x.shape[-1]}.")
    if bool(kernels.constexpr(name, "HAS_RESIDUAL")) != (residual is not None):
        raise ValueError(f"add_rms_norm: kernel {name} was built {'with' if residual is None else 'without'} a residual.")
    if act_format != "none" and (input_scale is None or input_scale.numel() != 1):
        raise ValueError(f"add_rms_norm: kernel {name} quantizes to {act_format} and needs a scalar input_scale.")
    shape, device = tuple(x.shape), x.device
    stream = x.dtype if residual is None else torch.result_type(x, residual)
    x = x.contiguous()
    residual_out = x if residual is None else alloc(shape, stream, device)
    block_scale = _placeholder(device)
    if act_format == "none":
        outs: tuple[torch.Tensor, ...] = (alloc(shape, stream, device),)
    elif act_format == "fp8":
        outs = (alloc(shape, torch.float8_e4m3fn, device),)
    else:
        block_scale = alloc((*shape[:-1], width // 16), torch.float8_e4m3fn, device)
        outs = (alloc((*shape[:-1], width // 2), torch.uint8, device), block_scale)
    rows = x.numel() // width
    if rows:
        kernels.launch(name, (rows,), x_ptr=x, residual_ptr=x if residual is None else residual.contiguous(),
                       weight_ptr=weight.contiguous(), out_ptr=outs[0], residual_out_ptr=residual_out,
                       input_scale_ptr=_placeholder(device) if input_scale is None
                       else input_scale.reshape(1).to(torch.float32),
                       block_scale_ptr=block_scale, eps=float(eps))
    return outs, residual_out


def gated_rms_norm(kernels: TritonKernels, name: str, x: torch.Tensor, gate: torch.Tensor | None,
                   weight: torch.Tensor, eps: float, alloc: Alloc = empty) -> torch.Tensor:
    """x * silu(gate) RMS-normalised per group, times weight; x, gate [..., D]."""
    width, group = int(kernels.constexpr(name, "WIDTH")), int(kernels.constexpr(name, "GROUP_SIZE"))
    if x.shape[-1] != width:
        raise ValueError(f"gated_rms_norm: kernel {name} normalises rows of {width}, not {x.shape[-1]}.")
    out = alloc(tuple(x.shape), torch.promote_types(weight.dtype, x.dtype), x.device)
    x = x.contiguous()
    rows = x.numel() // width
    if rows:
        kernels.launch(name, (rows, width // group), x_ptr=x, gate_ptr=x if gate is None else gate.contiguous(),
                       weight_ptr=weight.contiguous(), out_ptr=out, eps=float(eps))
    return out


def _check_seq_lens(kernels: TritonKernels, name: str, seq_lens: torch.Tensor | None, batch: int) -> None:
    if bool(kernels.constexpr(name, "HAS_SEQ_LENS")) != (seq_lens is not None):
        raise ValueError(f"kernel {name} was built {'with' if seq_lens is None else 'without'} seq_lens.")
    if seq_lens is not None and tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"seq_lens must be [{batch}], got {list(seq_lens.shape)}.")


def _lens(seq_lens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """seq_lens as the kernels read it (int64), or a placeholder a kernel built without it does not read."""
    if seq_lens is None:
        return torch.zeros(1, dtype=torch.int64, device=device)
    return seq_lens.to(device=device, dtype=torch.int64).contiguous()


def causal_conv1d(kernels: TritonKernels, name: str, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None, state: torch.Tensor | None,
                  alloc: Alloc = empty, seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y [B, T, C] (x's dtype) and the new state [B, C, K-1] for x [B, T, C], weight [C, 1, K] or
    [C, K]; the activation and whether a state is read are the kernel's. seq_lens [B] (kernels built
    for it): the new state ends at each sequence's last real token."""
    taps = (weight if weight.dim() == 2 else weight.squeeze(1)).contiguous()
    channels, kernel_size = taps.shape
    batch, length, x_channels = x.shape
    if x_channels != channels or kernel_size != int(kernels.constexpr(name, "KERNEL")):
        raise ValueError(f"causal_conv1d: x has {x_channels} channels and the weight {channels} x {kernel_size} "
                         f"taps; kernel {name} takes {kernels.constexpr(name, 'KERNEL')} taps over x's channels.")
    if bool(kernels.constexpr(name, "HAS_STATE")) != (state is not None):
        raise ValueError(f"causal_conv1d: kernel {name} was built {'with' if state is None else 'without'} a state.")
    _check_seq_lens(kernels, name, seq_lens, batch)
    x = x.contiguous()
    out = alloc((batch, length, channels), x.dtype, x.device)
    new_state = alloc((batch, channels, kernel_size - 1), x.dtype if state is None else state.dtype, x.device)
    block_t, block_c = int(kernels.constexpr(name, "BLOCK_T")), int(kernels.constexpr(name, "BLOCK_C"))
    if batch and channels:
        kernels.launch(name, (batch, _cdiv(channels, block_c), max(1, _cdiv(length, block_t))),
                       x_ptr=x, weight_ptr=taps, bias_ptr=taps if bias is None else bias.contiguous(),
                       state_ptr=x if state is None else state.contiguous(), out_ptr=out, new_state_ptr=new_state,
                       seq_lens_ptr=_lens(seq_lens, x.device), length=length, channels=channels)
    return out, new_state


def _check_ssd(x: torch.Tensor, B: torch.Tensor, num_heads: int, head_dim: int, n_groups: int,
               state_size: int) -> None:
    if num_heads % n_groups != 0:
        raise ValueError(f"ssd: num_heads {num_heads} is not a multiple of n_groups {n_groups}.")
    if x.shape[-1] != num_heads * head_dim:
        raise ValueError(f"ssd: x has width {x.shape[-1]}, expected num_heads*head_dim = {num_heads * head_dim}.")
    if B.shape[-1] != n_groups * state_size:
        raise ValueError(f"ssd: B/C have width {B.shape[-1]}, expected n_groups*state_size = {n_groups * state_size}.")


def ssd_chunk_scan(kernels: TritonKernels, name: str, x: torch.Tensor, dt: torch.Tensor, A_log: torch.Tensor,
                   B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, *, num_heads: int,
                   head_dim: int, n_groups: int, state_size: int, dt_min: float, dt_max: float,
                   initial_state: torch.Tensor | None, alloc: Alloc = empty,
                   seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y [Bt, T, H*P] fp32 and the final state [Bt, H, P, N] fp32 (after each sequence's first
    seq_lens[b] tokens when the kernel takes seq_lens)."""
    _check_ssd(x, B, num_heads, head_dim, n_groups, state_size)
    _check_seq_lens(kernels, name, seq_lens, x.shape[0])
    if bool(kernels.constexpr(name, "HAS_INIT")) != (initial_state is not None):
        raise ValueError(f"ssd_chunk_scan: kernel {name} was built "
                         f"{'with' if initial_state is None else 'without'} an initial state.")
    batch, length, _ = x.shape
    y = alloc((batch, length, num_heads * head_dim), torch.float32, x.device)
    final = alloc((batch, num_heads, head_dim, state_size), torch.float32, x.device)
    block_p = int(kernels.constexpr(name, "BLOCK_P"))
    if batch:
        kernels.launch(name, (batch, num_heads, _cdiv(head_dim, block_p)), x_ptr=x.contiguous(), dt_ptr=dt.contiguous(),
                       a_log_ptr=A_log.contiguous(), b_ptr=B.contiguous(), c_ptr=C.contiguous(), d_ptr=D.contiguous(),
                       dt_bias_ptr=dt_bias.contiguous(),
                       init_ptr=final if initial_state is None else initial_state.contiguous(),
                       y_ptr=y, final_ptr=final, seq_lens_ptr=_lens(seq_lens, x.device), length=length, num_heads=num_heads, head_dim=head_dim,
                       n_groups=n_groups, state_size=state_size, dt_min=float(dt_min), dt_max=float(dt_max))
    return y, final


def ssd_state_update(kernels: TritonKernels, name: str, x: torch.Tensor, dt: torch.Tensor, A_log: torch.Tensor,
                     B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, *, num_heads: int,
                     head_dim: int, n_groups: int, state_size: int, dt_min: float, dt_max: float,
                     state: torch.Tensor, alloc: Alloc = empty,
                     seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y [Bt, 1, H*P] in x's dtype and the new state [Bt, H, P, N] fp32, one token per sequence (a
    sequence with seq_lens[b] = 0 keeps its state, when the kernel takes seq_lens)."""
    _check_ssd(x, B, num_heads, head_dim, n_groups, state_size)
    _check_seq_lens(kernels, name, seq_lens, x.shape[0])
    if x.shape[1] != 1:
        raise ValueError(f"ssd_state_update: x must hold one token, got T = {x.shape[1]}.")
    if not (x.dtype == dt.dtype == B.dtype == C.dtype):
        raise ValueError(f"ssd_state_update: x, dt, B and C must share a dtype, not {x.dtype}, {dt.dtype}, "
                         f"{B.dtype}, {C.dtype}.")
    batch = x.shape[0]
    y = alloc(tuple(x.shape), x.dtype, x.device)
    new_state = alloc((batch, num_heads, head_dim, state_size), torch.float32, x.device)
    block_p = int(kernels.constexpr(name, "BLOCK_P"))
    if batch:
        kernels.launch(name, (batch, num_heads, _cdiv(head_dim, block_p)), x_ptr=x.contiguous(), dt_ptr=dt.contiguous(),
                       a_log_ptr=A_log.contiguous(), b_ptr=B.contiguous(), c_ptr=C.contiguous(), d_ptr=D.contiguous(),
                       dt_bias_ptr=dt_bias.contiguous(), state_ptr=state.contiguous(), y_ptr=y,
                       new_state_ptr=new_state, seq_lens_ptr=_lens(seq_lens, x.device), num_heads=num_heads, head_dim=head_dim, n_groups=n_groups,
                       state_size=state_size, dt_min=float(dt_min), dt_max=float(dt_max))
    return y, new_state


def attention_gqa_cached(kernels: TritonKernels, write_name: str, name: str, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, *,
                         num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                         alloc: Alloc = empty) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out [B, T, Hq*Dh] in q's dtype, and the caches (the given tensors, written in place). An FP8
    cache (float8_e4m3fn) takes its fp32 scales k_scale and v_scale; a float cache none."""
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"attention_gqa: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}.")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("attention_gqa: the KV caches must be contiguous [B, Hkv, capacity, Dh] tensors.")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 != (k_scale is not None and v_scale is not None) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"attention_gqa: {k_cache.dtype}/{v_cache.dtype} caches take "
                         f"{'k_scale and v_scale' if fp8 else 'no scales'}.")
    scales = [s.to(device=q.device, dtype=torch.float32).reshape(1) if s is not None else _placeholder(q.device)
              for s in (k_scale, v_scale)]
    batch, length, _ = q.shape
    capacity = k_cache.shape[2]
    lens = cache_lens.to(device=q.device, dtype=torch.int64).contiguous()
    end = int(lens.max()) + length if batch else 0
    if end > capacity:
        raise ValueError(f"attention_gqa: {end} positions do not fit the cache of {capacity}.")
    out = alloc((batch, length, num_heads * head_dim), q.dtype, q.device)
    if batch == 0 or length == 0:
        return out, k_cache, v_cache
    kernels.launch(write_name, (batch, length, num_kv_heads), k_ptr=k.contiguous(), v_ptr=v.contiguous(),
                   k_cache_ptr=k_cache, v_cache_ptr=v_cache, lens_ptr=lens, k_scale_ptr=scales[0],
                   v_scale_ptr=scales[1], length=length, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   capacity=capacity)
    rows = length * (num_heads // num_kv_heads)
    kernels.launch(name, (batch, num_kv_heads, _cdiv(rows, int(kernels.constexpr(name, "BLOCK_M")))),
                   q_ptr=q.contiguous(), k_cache_ptr=k_cache, v_cache_ptr=v_cache, lens_ptr=lens, out_ptr=out,
                   k_scale_ptr=scales[0], v_scale_ptr=scales[1], length=length, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, capacity=capacity, scale=float(scale))
    return out, k_cache, v_cache


def moe_route(kernels: TritonKernels, name: str, permutation_name: str, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, *, routed_scaling_factor: float,
              alloc: Alloc = empty) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights fp32 [N, k], ids int64 [N, k], offsets int64 [E+1], order int64 [N*k]) for x [N, D]
    and the router weight [E, D]; top_k and the groups are the kernel's."""
    experts, hidden = weight.shape
    top_k = int(kernels.constexpr(name, "TOP_K"))
    if bool(kernels.constexpr(name, "HAS_BIAS")) != (bias is not None):
        raise ValueError(f"moe_route: kernel {name} was built {'with' if bias is None else 'without'} a bias.")
    x2 = x.reshape(-1, hidden).contiguous()
    tokens = x2.shape[0]
    weights = alloc((tokens, top_k), torch.float32, x.device)
    ids = alloc((tokens, top_k), torch.int64, x.device)
    offsets = alloc((experts + 1,), torch.int64, x.device)
    order = alloc((tokens * top_k,), torch.int64, x.device)
    if tokens:
        kernels.launch(name, (_cdiv(tokens, int(kernels.constexpr(name, "BLOCK_T"))),), x_ptr=x2,
                       weight_ptr=weight.contiguous(), bias_ptr=weight if bias is None else bias.contiguous(),
                       weights_out_ptr=weights, ids_out_ptr=ids, num_tokens=tokens, hidden=hidden,
                       num_experts=experts, scaling=float(routed_scaling_factor))
    kernels.launch(permutation_name, (1,), ids_ptr=ids, offsets_ptr=offsets, order_ptr=order,
                   num_pairs=tokens * top_k, num_experts=experts)
    return weights, ids, offsets, order
