"""The config spaces of the norm, conv, SSD, attention, router and combine templates: every template
of the catalog has one, pruning names its reason, the tuning key tells apart problems that share
constexprs, and the cost model ranks configs for the reason it states (docs/tuning.md)."""

from __future__ import annotations

import pytest

from nemocompile.base.errors import IRError
from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.codegen.tuning import cost_model, op_cost, space
from nemocompile.codegen.tuning.workload import Workload
from nemocompile.kernel_configs import kernel_key
from nemocompile.targets import load_target

H100 = load_target("h100")
CONV = catalog.causal_conv1d("conv", "causal_conv1d", kernel_size=4, state=True, decode=False)
SCAN = catalog.ssd_chunk_scan("scan", "ssd_chunk_scan", head_dim=64, state_size=128, chunk_size=128,
                              initial_state=True)
_, ATTEND = catalog.attention_gqa("attn", "attention_gqa", head_dim=128, decode=True)
ROUTER, PERMUTATION = catalog.moe_route("route", "moe_route", experts=128, top_k=6)
NORM = catalog.add_rms_norm("norm", "add_rms_norm", width=64)
SSD_DIMS = (("head_dim", 64), ("n_groups", 8), ("num_heads", 64), ("state_size", 128))
ATTENTION_DIMS = (("head_dim", 128), ("num_heads", 32), ("num_kv_heads", 2))
ROUTER_DIMS = (("experts", 128), ("hidden", 4096), ("top_k", 6))


def config(instance: KernelInstance, **changes: object) -> space.Config:
    return tuple(sorted({**dict(space.config_of(instance)), **changes}.items()))  # type: ignore[arg-type]


def modelled(instance: KernelInstance, tokens: int, workload: Workload, **changes: object) -> float:
    return cost_model.seconds(instance, config(instance, **changes), tokens, H100, workload)


def test_every_catalog_template_has_a_space_of_its_own_constexprs_and_launch_options() -> None:
    # a split-K reduce kernel takes its GEMM's config (tiles, SPLIT_K): it has no space of its own
    reduces = {template.entry for template in catalog.SPLIT_K_REDUCES.values()}
    assert set(space.SPACES) == set(catalog.TEMPLATES) - reduces
    for entry, template in catalog.TEMPLATES.items():
        if entry in reduces:
            continue
        names = space.SPACES[entry].option_names()
        assert "num_warps" in names
        assert set(names) <= {*template.constexprs, *space.LAUNCH_OPTIONS, space.SPLIT_K}, entry


def test_pruning_names_idle_threads_spilled_registers_and_tiles_wider_than_their_dimension() -> None:
    conv = Workload((("channels", 192),))
    assert "leaves threads of 4 warps (128 threads) idle" in str(space.why_pruned(NORM, config(NORM), "sm_90"))
    assert space.why_pruned(NORM, config(NORM, num_warps=2), "sm_90") is None  # 64 elements for 64 threads
    spill = space.why_pruned(ATTEND, config(ATTEND, BLOCK_M=128, BLOCK_N=128, num_warps=2), "sm_90",
                             Workload(ATTENTION_DIMS, decode=True))
    assert spill is not None and "would spill" in spill
    wide = space.why_pruned(CONV, config(CONV, BLOCK_C=512, BLOCK_T=1), "sm_90", conv)
    assert wide is not None and "BLOCK_C 256 covers it" in wide
    assert space.why_pruned(CONV, config(CONV, BLOCK_C=256, BLOCK_T=1), "sm_90", conv) is None
    kept = space.prune(SCAN, space.configs(SCAN), "sm_90", Workload(SSD_DIMS)).kept
    assert kept and all(dict(c)["CHUNK"] <= 64 for c in kept)


def test_the_key_holds_runtime_sizes_and_the_phase_where_the_template_takes_them() -> None:
    narrow, wide = Workload((("channels", 192),)), Workload((("channels", 4096),))
    assert kernel_key(CONV, narrow) != kernel_key(CONV, wide)  # same constexprs, different problems
    assert kernel_key(CONV, narrow) != kernel_key(CONV, Workload(narrow.dims, decode=True))
    assert kernel_key(NORM, Workload()) == kernel_key(NORM, Workload(decode=True))  # a row is a row in both graphs
    up = catalog.moe_gemm("up", "moe_expert_up", n=64, k=128, experts=8, top_k=2, act_format="bf16")
    assert '"phase"' not in kernel_key(up, Workload(decode=True)).problem  # GEMM keys are as before


def test_conv_time_tile_pads_decode_steps_and_re_reads_the_halo_in_prefill() -> None:
    decode, prefill = Workload((("channels", 4096),), decode=True), Workload((("channels", 4096),))
    # decode: one token per sequence, so BLOCK_T 16 computes 15 padded rows of every tile
    assert modelled(CONV, 64, decode, BLOCK_T=1) < modelled(CONV, 64, decode, BLOCK_T=16)
    # prefill: BLOCK_T 1 reads the 3 inputs before each token again, BLOCK_T 16 once per 16 tokens
    assert modelled(CONV, 4096, prefill, BLOCK_T=16) < modelled(CONV, 4096, prefill, BLOCK_T=1)


def test_attention_decode_prefers_long_key_blocks_over_a_long_cache() -> None:
    decode = Workload(ATTENTION_DIMS, decode=True)
    short, long = (op_cost.work(ATTEND, config(ATTEND, BLOCK_N=n), 8, decode) for n in (16, 128))
    assert short.steps == 8 * long.steps  # two passes over 1024 cached keys, 16 or 128 at a time
    assert modelled(ATTEND, 8, decode, BLOCK_N=128) < modelled(ATTEND, 8, decode, BLOCK_N=16)


def test_ssd_scan_trades_serial_chunks_against_their_work_and_head_blocks_against_idle_sms() -> None:
    small_state = catalog.ssd_chunk_scan("scan", "ssd_chunk_scan", head_dim=16, state_size=16, chunk_size=128,
                                         initial_state=True)
    small = Workload((("head_dim", 16), ("n_groups", 8), ("num_heads", 8), ("state_size", 16)))
    # a small state: the chunk's work is cheap, the serial chunk steps dominate (4096/64 vs 4096/16)
    assert modelled(small_state, 4096, small, CHUNK=64, num_warps=8) < modelled(small_state, 4096, small, CHUNK=16)
    short, long = (op_cost.work(small_state, config(small_state, CHUNK=c), 4096, small) for c in (16, 64))
    assert short.steps == 4 * long.steps
    # Nemotron-H's sizes: 64 heads x 64/BLOCK_P programs; BLOCK_P 32 leaves 4 of the 132 SMs idle, 16 fills them
    large = Workload(SSD_DIMS)
    assert modelled(SCAN, 4096, large, CHUNK=32, BLOCK_P=16) < modelled(SCAN, 4096, large, CHUNK=32, BLOCK_P=32)
    assert op_cost.work(SCAN, config(SCAN, BLOCK_P=16), 4096, large).programs == 256


def test_router_and_permutation_step_counts_follow_their_tiles() -> None:
    route = Workload(ROUTER_DIMS)
    assert modelled(ROUTER, 32, route, BLOCK_K=64) < modelled(ROUTER, 32, route, BLOCK_K=16)  # 64 vs 256 K steps
    assert modelled(PERMUTATION, 512, route, BLOCK_PAIRS=128) < modelled(PERMUTATION, 512, route, BLOCK_PAIRS=16)
    with pytest.raises(IRError, match="needs the size 'experts'"):
        op_cost.work(ROUTER, config(ROUTER), 32, Workload())
