"""The tuning stage's pure parts: config spaces and their pruning by target limits, the cost
model's ranking, and the tuning database's schema, journal and keys (no engine, no GPU)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from nemocompile.base.errors import UsageError
from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.tuning import cost_model, space
from nemocompile.codegen.tuning.db import (
    MODELLED,
    TUNED,
    Entry,
    Environment,
    KernelKey,
    Trial,
    TuningDB,
    bucket_of,
    lookup,
)
from nemocompile.targets import load_target

H100 = load_target("h100")
UP = catalog.moe_gemm("up", "moe_expert_up", n=1856, k=2688, experts=128, top_k=6, act_format="bf16", gather=True,
                      activation="relu2", block_m=16, block_n=64, block_k=128)
LINEAR = catalog.fp8_linear("lin", "quant_linear", n=4096, k=2688, quant_act=True, block_k=128)
ENV = Environment("h100", "sm_90", "", "12.8", "3.9.0")


def config(**values: object) -> space.Config:
    base = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SWAP_AB": True, "SPLIT_K": 1, "num_warps": 4,
            "num_stages": 3}
    base.update(values)
    return tuple(sorted(base.items()))  # type: ignore[arg-type]


def test_space_lists_the_default_first_and_apply_fills_it_in() -> None:
    configs = space.configs(UP)
    assert configs[0] == space.config_of(UP) == config()
    assert len(configs) == len(set(configs)) == 4 * 3 * 5 * 2 * 4 * 2 * 3
    wide = space.apply(UP, config(BLOCK_N=128, num_warps=8))
    assert dict(wide.constexprs)["BLOCK_N"] == 128 and wide.num_warps == 8
    assert space.problem_of(wide) == space.problem_of(UP)  # the config is not part of the problem
    assert space.config_of(catalog.moe_combine("c", "moe_expert_down", n=64, top_k=2)) == \
        (("BLOCK_N", 256), ("num_warps", 4))  # the expert combine's space (op_spaces): its row tile and warps
    split = space.apply(UP, config(SPLIT_K=4))
    assert dict(split.constexprs)["SPLIT_K"] == 4 and space.problem_of(split) == space.problem_of(UP)
    reduce = catalog.split_k_reduce(split)
    assert reduce is not None and dict(reduce.constexprs)["SPLIT_K"] == 4
    combine = catalog.moe_combine("c", "moe_expert_down", n=64, top_k=2)
    with pytest.raises(ValueError, match="split-K"):
        space.apply(combine, (*space.config_of(combine), ("SPLIT_K", 2)))


@pytest.mark.parametrize(("instance", "chosen", "reason"), [
    (catalog.moe_gemm("u48", "moe_expert_up", n=64, k=48, experts=8, top_k=2, act_format="bf16", gather=True,
                      activation="relu2", block_m=16, block_n=64, block_k=64),
     config(BLOCK_K=128), "as many steps over K = 48 as 64"),
    (UP, config(BLOCK_K=8), "multiple of 16"),
    (UP, config(SWAP_AB=False), "M side (BLOCK_M 16)"),
    (UP, config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=16, SWAP_AB=False, num_stages=2), "the fp32 accumulator"),
    (UP, config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, SWAP_AB=False, num_warps=8, num_stages=4),
     "shared memory"),
    (LINEAR, config(BLOCK_K=16), "an FP8 dot needs BLOCK_K >= 32"),
    (space.apply(catalog.fp8_linear("l", "quant_linear", n=64, k=96, quant_act=True, block_k=32), config(BLOCK_K=32)),
     config(BLOCK_K=32, num_warps=8), "8 warps need 128 MMA rows"),
    # 2688 / 128 = 21 K steps: 8 slices of 3 leave the last empty; 2688 / 256 = 11 steps in 8 slices of 2
    (UP, config(SPLIT_K=8), "leaves the last slice empty"),
    (UP, config(SPLIT_K=8, BLOCK_K=256), "leaves the last slice empty"),
    (LINEAR, config(SPLIT_K=8, BLOCK_K=256, BLOCK_N=128), "leaves the last slice empty"),
    (space.apply(catalog.fp8_linear("l", "quant_linear", n=64, k=96, quant_act=True, block_k=32), config(BLOCK_K=32)),
     config(BLOCK_K=32, SPLIT_K=4), "leaves slices of 1 BLOCK_K step(s) of the 3 over K = 96"),
])
def test_prune_names_the_limit(instance: catalog.KernelInstance, chosen: space.Config, reason: str) -> None:
    why = space.why_pruned(instance, chosen, "sm_90")
    assert why is not None and reason in why, why
    result = space.prune(instance, [space.config_of(instance), chosen], "sm_90")
    assert chosen in dict(result.dropped) and chosen not in result.kept


def test_w4a4_takes_only_native_tiles_on_blackwell() -> None:
    w4a4 = catalog.moe_gemm("u", "moe_expert_up", n=1856, k=2688, experts=128, top_k=6, act_format="nvfp4",
                            block_m=128, block_n=128, block_k=128)
    kept = space.prune(w4a4, space.configs(w4a4), "sm_100").kept
    assert kept and all(dict(c)["BLOCK_M"] == 128 and not dict(c)["SWAP_AB"] for c in kept)
    assert not space.prune(w4a4, space.configs(w4a4), "sm_90").kept
    # K = 48 (the b200 demo's down-GEMM), under dot_scaled's 64 step: one masked 64-wide step is kept
    short = catalog.moe_gemm("d", "moe_expert_down", n=64, k=48, experts=8, top_k=2, act_format="nvfp4",
                             block_m=128, block_n=128, block_k=64)
    kept = space.prune(short, space.configs(short), "sm_100").kept
    assert kept and {dict(c)["BLOCK_K"] for c in kept} == {64}


def test_dense_nvfp4_gemms_share_the_grouped_space_and_model() -> None:
    """The dense NVFP4 GEMMs are moe_nvfp4_gemm's DENSE mode: the same space (split-K included), W4A4
    to native tiles on sm_100 only, and a model of one weight read once; fp32 activations (an exact
    fp32 dot) cost more than bf16 ones where compute counts."""
    w4a16 = catalog.nvfp4_linear("d", "linear", n=2688, k=4096, act_format="bf16")
    w4a4 = catalog.nvfp4_linear("q", "quant_linear", n=2688, k=4096, act_format="nvfp4")
    assert space.space_of(w4a16) is space.MOE_SPACE and space.problem_of(w4a16)["DENSE"] is True
    assert {dict(c)["SPLIT_K"] for c in space.prune(w4a16, space.configs(w4a16), "sm_90").kept} == {1, 2, 4, 8}
    kept = space.prune(w4a4, space.configs(w4a4), "sm_100").kept
    assert kept and all(dict(c)["BLOCK_M"] == 128 and not dict(c)["SWAP_AB"] for c in kept)
    assert not space.prune(w4a4, space.configs(w4a4), "sm_90").kept
    problem = cost_model.gemm_problem(w4a16, 8)
    assert (problem.rows, problem.experts, problem.compute) == (8, 1, "bf16")
    fp32 = catalog.nvfp4_linear("f", "linear", n=2688, k=4096, act_format="bf16", x_dtype="fp32", out_dtype="fp32")
    assert cost_model.gemm_problem(fp32, 8).compute == "fp32"
    prefill = config(BLOCK_M=64, BLOCK_N=128, SWAP_AB=False)
    assert cost_model.seconds(fp32, prefill, 4096, H100) > cost_model.seconds(w4a16, prefill, 4096, H100)


def test_cost_model_prefers_small_moe_blocks_for_decode_and_large_ones_for_prefill() -> None:
    kept = space.prune(UP, space.configs(UP), "sm_90").kept

    def best(tokens: int) -> dict[str, object]:
        return dict(min(kept, key=lambda c: cost_model.seconds(UP, c, tokens, H100)))

    assert best(1)["BLOCK_M"] == 16  # one token per expert: a 16-row block wastes least
    assert int(best(16384)["BLOCK_M"]) >= 64  # ~768 rows per expert: big tiles re-read the weights less
    small, large = (cost_model.seconds(UP, config(), tokens, H100) for tokens in (1, 4096))
    assert 0 < small < large
    assert cost_model.seconds(UP, config(), 64, H100) == cost_model.seconds(UP, config(), 64, H100)


def test_cost_model_takes_split_k_where_few_tiles_stream_a_deep_k() -> None:
    """Decode of a narrow, deep GEMM: a handful of N tiles cannot draw the HBM bandwidth, so K slices
    on more SMs win despite the workspace and the second launch; in prefill the M x N tiles fill
    the SMs and split-K only adds the round trip."""
    deep = catalog.fp8_linear("deep", "quant_linear", n=256, k=16384, quant_act=True, block_k=128)
    kept = space.prune(deep, space.configs(deep), "sm_90").kept

    def best(tokens: int, split: int | None = None) -> tuple[space.Config, float]:
        scored = [(c, cost_model.seconds(deep, c, tokens, H100)) for c in kept
                  if split is None or dict(c)["SPLIT_K"] == split]
        return min(scored, key=lambda item: item[1])

    assert dict(best(1)[0])["SPLIT_K"] > 1 and best(1)[1] < best(1, split=1)[1]
    assert dict(best(4096)[0])["SPLIT_K"] == 1
    # the reduce is counted: the same tiles split cost more than unsplit where the tiles fill the SMs
    wide = config(BLOCK_M=128, BLOCK_N=128, SWAP_AB=False, num_warps=8, num_stages=2)
    split = tuple(sorted({**dict(wide), "SPLIT_K": 2}.items()))
    assert cost_model.seconds(LINEAR, split, 4096, H100) > cost_model.seconds(LINEAR, wide, 4096, H100)


def _key(problem: str = '{"K": 64}', template_hash: str = "abc") -> KernelKey:
    return KernelKey("fp8_linear", template_hash, problem, "x_ptr=bf16")


def test_database_journal_keeps_failures_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    db = TuningDB(path, create=True)
    db.record_trial(_key(), 64, ENV, MODELLED, Trial(config(), 1e-5, ""))
    db.record_trial(_key(), 64, ENV, MODELLED, Trial(config(BLOCK_N=128), math.inf, "CompileError: no"))
    db.close()
    again = TuningDB(path)
    trials = again.trials(_key(), 64, ENV, MODELLED)
    assert trials[config()].seconds == 1e-5
    assert math.isinf(trials[config(BLOCK_N=128)].seconds) and "CompileError" in trials[config(BLOCK_N=128)].error
    assert again.trials(_key(), 8, ENV, MODELLED) == {}  # another bucket
    assert again.trials(_key(), 64, ENV, TUNED) == {}  # another scorer


def test_database_refuses_missing_foreign_and_newer_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        TuningDB(tmp_path / "missing.sqlite")
    (tmp_path / "text.sqlite").write_text("not a database at all, just text" * 20)
    with pytest.raises(UsageError, match="not a nemocompile tuning database"):
        TuningDB(tmp_path / "text.sqlite")
    newer = tmp_path / "newer.sqlite"
    TuningDB(newer, create=True).close()
    with sqlite3.connect(newer) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(UsageError, match="schema version 99"):
        TuningDB(newer)


def _entry(bucket: int, env: Environment = ENV, template_hash: str = "abc", source: str = TUNED) -> Entry:
    return Entry(_key(template_hash=template_hash), bucket, env, source, config(BLOCK_M=bucket if bucket > 16 else 16),
                 1e-5, 2e-5, "passed")


@pytest.mark.parametrize(("recorded", "reason"), [
    (Environment("h100", "sm_90", "", "12.8", "3.0.0"), "recorded for Triton 3.0.0, this build uses 3.9.0"),
    (Environment("h200", "sm_90", "", "12.8", "3.9.0"), "recorded for GPU h200, this build uses h100"),
    (Environment("h100", "sm_90", "", "12.4", "3.9.0"), "recorded for CUDA 12.4, this build uses 12.8"),
    (Environment("h100", "sm_90", "", "12.8", "3.9.0", "4.0"), "recorded for CUTLASS 4.0, this build uses none"),
])
def test_entries_from_elsewhere_are_skipped_with_their_reason(tmp_path: Path, recorded: Environment,
                                                               reason: str) -> None:
    db = TuningDB(tmp_path / "t.sqlite", create=True)
    db.record_entry(_entry(64, recorded))
    found = lookup(db, _key(), 64, ENV)
    assert found.entry is None
    assert [why for _, why in found.skipped] == [reason]
    assert found.skipped[0][0].environment == recorded


def test_lookup_takes_the_nearest_bucket_and_skips_a_changed_template(tmp_path: Path) -> None:
    db = TuningDB(tmp_path / "t.sqlite", create=True)
    for bucket in (1, 64, 256):
        db.record_entry(_entry(bucket))
    db.record_entry(_entry(32, template_hash="old"))
    found = lookup(db, _key(), 40, ENV)
    assert found.entry is not None and found.entry.bucket == 64
    assert lookup(db, _key(), 2, ENV).entry.bucket == 1  # type: ignore[union-attr]
    assert [why for _, why in found.skipped] == ["recorded for template hash old, this build's fp8_linear template "
                                                 "hashes to abc"]
    # a driver is compared only where both sides know one
    measured = Environment("h100", "sm_90", "550.1", "12.8", "3.9.0")
    assert ENV.mismatch(measured) is None
    assert "driver 550.1" in str(Environment("h100", "sm_90", "560.0", "12.8", "3.9.0").mismatch(measured))
    assert bucket_of(1) == 1 and bucket_of(33) == 64 and bucket_of(64) == 64
