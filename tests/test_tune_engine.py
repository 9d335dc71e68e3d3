"""`nemocompile tune` on the demo engine (h100: FP8 linears and NVFP4 W4A16 expert GEMMs on Triton)
with the cost model and with a deterministic fake timer: the sweep, its plots and report, resume
after an interruption, failures scored infinitely slow, the numerics gate catching a deliberately
wrong kernel, and a build that takes its configs from the database (or names the entries it
cannot use)."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="tuning sweeps Triton kernels (the [triton] extra)")

from click.testing import CliRunner

from nemocompile.api import build
from nemocompile.base.errors import UsageError
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.codegen.triton.spec import TEMPLATE_DIR, KernelInstance
from nemocompile.codegen.tuning import space
from nemocompile.codegen.tuning.db import MODELLED, TUNED, TuningDB
from nemocompile.codegen.tuning.workload import Workload
from nemocompile.demo import write_demo_checkpoint
from nemocompile.graph.ir import Graph
from nemocompile.tune import TuneOptions, kernel_problems, tune_engine


class FakeTimer:
    """Deterministic 'measurements': wide tiles are fast (unlike the cost model, which prefers
    narrow ones on these shapes), so a build that follows the database shows it."""

    scorer = "measured"

    def __init__(self, fail: set[space.Config] | None = None, stop_after: int | None = None,
                 fastest: space.Config | None = None, compile_fail: set[space.Config] | None = None) -> None:
        self.calls: list[space.Config] = []
        self.fail = fail or set()
        self.stop_after = stop_after
        self.fastest = fastest
        self.compile_fail = compile_fail or set()

    def prepare(self, instance: KernelInstance, configs: Sequence[space.Config]) -> dict[space.Config, str]:
        return {c: "CompileError: out of registers" for c in configs if c in self.compile_fail}

    def __call__(self, instance: KernelInstance, config: space.Config, tokens: int, workload: Workload) -> float:
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(config)
        if config in self.fail:
            raise RuntimeError("out of resources: shared memory")
        if config == self.fastest:
            return 1e-7
        values = {name: int(value) for name, value in config}
        return 1e-5 / values.get("BLOCK_N", 64) + 1e-8 * (values.get("BLOCK_M", 16) + values.get("num_stages", 1) +
                                                           values["num_warps"] + values.get("BLOCK_K", 64) / 16) + \
            1e-9 * tokens


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, kernel_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("tune-engine") / "demo-h100"
    with override(kernel_cache_dir=str(kernel_cache)):
        build(None, out, target="h100")
    return out


def _cli(args: list[str], kernel_cache: Path) -> tuple[int, str, str]:
    with override(kernel_cache_dir=str(kernel_cache), progress=False):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cost_model_sweep_of_every_kernel_writes_modelled_entries_plots_and_report(
        engine: Path, kernel_cache: Path, tmp_path: Path) -> None:
    db = tmp_path / "tuning.sqlite"
    code, out, err = _cli(["tune", str(engine), "--cost-model", "--db", str(db), "--batch-sizes", "1,64", "--json"],
                          kernel_cache)
    assert code == 0, err
    summary = json.loads(out)
    kernels = {row["kernel"] for row in summary["sweeps"]}
    # every template of the engine's kernels (norms, conv, SSD, attention, router, GEMMs, the combine)
    engine_templates = {k["entry"] for k in json.loads((engine / "kernels" / "kernels.json").read_text())["kernels"]}
    assert {label.split(" ")[0] for label in kernels} == engine_templates and len(engine_templates) == 12
    problems = len(kernels)
    assert len(summary["sweeps"]) == 2 * problems
    assert all(row["check"].startswith("passed") and row["best config"] != "none" for row in summary["sweeps"])
    opened = TuningDB(db)
    entries = opened.entries()
    opened.close()
    assert len(entries) == 2 * problems and {e.source for e in entries} == {MODELLED}
    assert {e.key.kernel for e in entries} == engine_templates
    assert {e.bucket for e in entries} == {1, 64} and all(e.environment.triton for e in entries)
    plots = [Path(p) for p in summary["plots"]]
    assert len(plots) == problems and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    report = Path(summary["report"]).read_text()
    assert "| kernel | tokens | configs | pruned |" in report and report.count("moe_nvfp4_gemm N=48") == 2


def test_interrupted_sweep_resumes_without_repeating_finished_configs(engine: Path, kernel_cache: Path,
                                                                        tmp_path: Path) -> None:
    options = TuneOptions(db=tmp_path / "t.sqlite", kernels="moe_expert_down/moe_nvfp4_gemm", batch_sizes=(8,), plots=False)
    first = FakeTimer(stop_after=5)
    with override(kernel_cache_dir=str(kernel_cache)), pytest.raises(KeyboardInterrupt):
        tune_engine(engine, options, first)
    assert len(first.calls) == 5
    second = FakeTimer()
    with override(kernel_cache_dir=str(kernel_cache)):
        result = tune_engine(engine, options, second)
    (sweep,) = result.sweeps
    assert sweep.resumed == 5 and not set(first.calls) & set(second.calls)
    assert len(first.calls) + len(second.calls) == len(sweep.trials)  # every kept config scored exactly once
    assert sweep.chosen is not None and sweep.check.startswith("passed")
    third = FakeTimer()
    with override(kernel_cache_dir=str(kernel_cache)):
        tune_engine(engine, options, third)
    assert third.calls == []  # a finished sweep scores nothing again


def test_a_spent_budget_stops_the_sweep_and_the_next_run_continues(engine: Path, kernel_cache: Path,
                                                                   tmp_path: Path) -> None:
    options = TuneOptions(db=tmp_path / "t.sqlite", kernels="moe_expert_down/moe_nvfp4_gemm", batch_sizes=(8, 64), plots=False,
                          budget_seconds=1e-9)
    with override(kernel_cache_dir=str(kernel_cache)):
        stopped = tune_engine(engine, options, FakeTimer())
        assert stopped.stopped.startswith("the budget") and not stopped.sweeps[0].complete
        assert len(stopped.sweeps) == 1
        finished = tune_engine(engine, TuneOptions(db=options.db, kernels="moe_expert_down/moe_nvfp4_gemm", batch_sizes=(8, 64),
                                                   plots=False), FakeTimer())
    assert not finished.stopped and [s.complete for s in finished.sweeps] == [True, True]


def test_a_failing_config_scores_infinitely_slow_and_the_sweep_goes_on(engine: Path, kernel_cache: Path,
                                                                      tmp_path: Path) -> None:
    options = TuneOptions(db=tmp_path / "t.sqlite", kernels="moe_expert_up", batch_sizes=(1,), plots=False)
    (problem,) = kernel_problems({"prefill": _graphs(engine)[0]}, "sm_90", "moe_expert_up")
    best, second = sorted(space.prune(problem.instance, space.configs(problem.instance), "sm_90").kept,
                          key=lambda c: FakeTimer()(problem.instance, c, 1, problem.workload))[:2]
    timer = FakeTimer(fail={best}, compile_fail={second})
    with override(kernel_cache_dir=str(kernel_cache)):
        (sweep,) = tune_engine(engine, options, timer).sweeps
    assert math.isinf(sweep.seconds(best)) and "out of resources" in sweep.trials[best].error
    assert math.isinf(sweep.seconds(second)) and "out of registers" in sweep.trials[second].error
    assert second not in timer.calls  # a config that did not compile is not run
    assert sweep.chosen not in (None, best, second) and sweep.failed == 2


def _graphs(engine: Path) -> tuple[Graph, Graph]:
    from nemocompile.runtime.engine import read_engine

    contents = read_engine(engine)
    return contents.prefill, contents.decode


def _off_by_one(block_n: int) -> dict[str, bytes]:
    """moe_gemm.py with the output columns shifted by one for one BLOCK_N: a test-only wrong kernel."""
    source = (TEMPLATE_DIR / "moe_gemm.py").read_text()
    line = "    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)\n"
    assert line in source
    wrong = source.replace(line, line + f"    if BLOCK_N == {block_n}:\n        col_ids = col_ids + 1\n", 1)
    return {"moe_gemm.py": wrong.encode()}


def test_numerics_gate_rejects_a_wrong_kernel_even_when_it_is_fastest(engine: Path, kernel_cache: Path,
                                                                       tmp_path: Path) -> None:
    options = TuneOptions(db=tmp_path / "t.sqlite", kernels="moe_expert_up", batch_sizes=(1,), plots=False)
    (problem,) = kernel_problems({"prefill": _graphs(engine)[0]}, "sm_90", "moe_expert_up")
    wrong = next(c for c in space.prune(problem.instance, space.configs(problem.instance), "sm_90").kept
                 if dict(c)["BLOCK_N"] == 256)
    timer = FakeTimer(fastest=wrong)
    with override(kernel_cache_dir=str(kernel_cache)):
        result = tune_engine(engine, options, timer, sources=_off_by_one(256))
    (sweep,) = result.sweeps
    assert sweep.chosen is not None and dict(sweep.chosen)["BLOCK_N"] != 256
    assert any(space.short(wrong) in m and "numerics gate" in m and "exceeds the tolerance" in m
               for m in sweep.rejected), sweep.rejected
    assert math.isinf(sweep.seconds(wrong))
    opened = TuningDB(options.db)
    (entry,) = opened.entries()
    opened.close()
    assert entry.config == sweep.chosen and entry.source == TUNED  # the wrong config is never recorded
    assert "Rejected configs" in (options.reports / "report.md").read_text()


def _reduce_drops_the_last_slice() -> dict[str, bytes]:
    """numerics.py whose split-K partial sum (the reduce kernels') leaves out the last K slice: a
    test-only wrong kernel."""
    source = (TEMPLATE_DIR / "numerics.py").read_text()
    line = "    for s in tl.static_range(1, SPLIT_K):\n"
    assert source.count(line) == 1
    return {"numerics.py": source.replace(line, "    for s in tl.static_range(1, SPLIT_K - 1):\n").encode()}


def test_numerics_gate_checks_split_k_candidates(engine: Path, kernel_cache: Path, tmp_path: Path) -> None:
    """A split-K config made fastest is checked with its reduce kernel in the interpreter: it passes
    and becomes the entry; with a reduce that drops a slice it is rejected and a config that does
    not split is chosen instead."""
    (problem,) = kernel_problems({"decode": _graphs(engine)[1]}, "sm_90", "moe_expert_down/moe_nvfp4_gemm")
    split = next(c for c in space.prune(problem.instance, space.configs(problem.instance), "sm_90").kept
                 if dict(c)["SPLIT_K"] == 2)
    for name, sources in (("right", None), ("wrong", _reduce_drops_the_last_slice())):
        options = TuneOptions(db=tmp_path / f"{name}.sqlite", kernels="moe_expert_down/moe_nvfp4_gemm", batch_sizes=(1,),
                              plots=False)
        with override(kernel_cache_dir=str(kernel_cache)):
            (sweep,) = tune_engine(engine, options, FakeTimer(fastest=split), sources=sources).sweeps
        if sources is None:
            assert sweep.chosen == split and sweep.check.startswith("passed") and not sweep.rejected
        else:
            assert sweep.chosen is not None and dict(sweep.chosen)["SPLIT_K"] == 1
            assert any(space.short(split) in m and "exceeds the tolerance" in m for m in sweep.rejected), \
                sweep.rejected


def test_build_takes_recorded_configs_and_names_entries_of_another_triton(engine: Path, kernel_cache: Path,
                                                                           tmp_path: Path) -> None:
    db = tmp_path / "t.sqlite"
    with override(kernel_cache_dir=str(kernel_cache)):
        tune_engine(engine, TuneOptions(db=db, kernels="moe_expert_*", batch_sizes=(1, 64), plots=False), FakeTimer())
        tune_engine(engine, TuneOptions(db=db, kernels="quant_linear", batch_sizes=(64,), cost_model=True,
                                        plots=False))
    with sqlite3.connect(db) as connection:  # the linears' entries as if tuned with another Triton
        connection.execute("UPDATE entries SET triton = '3.0.0' WHERE kernel = 'fp8_linear'")
    out = tmp_path / "engine"
    with override(kernel_cache_dir=str(kernel_cache)):
        result = build(None, out, target="h100", tuning_db=db)
    manifest = json.loads((out / "manifest.json").read_text())
    configs = manifest["kernel_configs"]
    experts = [c for c in configs if c["op"].startswith("moe_expert")]
    linears = [c for c in configs if c["op"] == "quant_linear"]
    assert experts and all(c["source"] == "tuned" and str(db) in c["why"] for c in experts)
    gemms = [c for c in experts if "BLOCK_M" in json.loads(c["config"])]
    combines = [c for c in experts if c not in gemms]  # the expert combine, a non-GEMM kernel, from the database too
    assert gemms and all(json.loads(c["config"])["BLOCK_N"] == 256 for c in gemms)  # the fake timer's winner
    # the fake timer's winner among the combine's kept configs (BLOCK_N 64 covers N = 32; wider ones are pruned)
    assert combines and all(json.loads(c["config"]) == {"BLOCK_N": 64, "num_warps": 1} for c in combines)
    assert linears and all(c["source"] == "modelled" and c["why"].startswith("cost model") for c in linears)
    assert all(c["check"].startswith("passed") for c in configs)
    skipped = dict(result.skipped_tuning)
    assert skipped and all("recorded for Triton 3.0.0, this build uses" in why for why in skipped.values())
    report = (out / "report.md").read_text()
    assert "Tuning-database entries not used" in report and "## Explained plan" in report
    index = json.loads((out / "kernels" / "kernels.json").read_text())
    assert any(k["constexprs"].get("BLOCK_N") == 256 for k in index["kernels"])
    code, inspected, err = _cli(["inspect", str(out), "--json"], kernel_cache)  # the manifest reads back
    assert code == 0 and json.loads(inspected)["kernel_configs"] == configs, err


def test_build_refuses_a_missing_tuning_database_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        build(None, tmp_path / "engine", target="h100", tuning_db=tmp_path / "none.sqlite")
    assert not (tmp_path / "engine").exists()


def test_plan_explain_lists_precision_rule_kernel_config_and_check(tmp_path: Path, kernel_cache: Path) -> None:
    checkpoint = write_demo_checkpoint(tmp_path / "demo")
    code, out, err = _cli(["plan", str(checkpoint / "config.json"), "--target", "h100", "--explain", "--json"],
                          kernel_cache)
    assert code == 0, err
    rows = json.loads(out)["explained"]
    up = next(r for r in rows if r["op"] == "moe_expert_up")
    assert up["kernel"] == "triton_moe_up_w4a16" and up["why"].startswith("modelled: cost model")
    assert "policy component routed_experts = nvfp4_w4a16" in up["rule"] and "plan reads no weights" in up["check"]
    embedding = next(r for r in rows if r["op"] == "embedding")  # no compiled candidate
    assert embedding["kernel"] == "reference" and embedding["why"].startswith("fallback")
    norm = next(r for r in rows if r["op"] == "rms_norm")  # a non-GEMM kernel: its warps are tuned too
    assert norm["kernel"] == "triton_rms_norm" and norm["why"].startswith("modelled: cost model")


def test_tune_refuses_bad_options(engine: Path, kernel_cache: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "t.sqlite")
    for args, message in ((["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers"),
                          (["--budget", "soon"], "--budget must be a duration"),
                          (["--kernels", "nothing*"], "has no tunable Triton kernel matching"),
                          (["--target", "b200"], "--target b200 is sm_100")):
        code, _, err = _cli(["tune", str(engine), "--cost-model", "--db", db, *args], kernel_cache)
        assert code == 2 and message in err, err
    code, _, err = _cli(["tune", str(engine), "--db", db], kernel_cache)  # no GPU here
    assert code == 2 and "use --cost-model" in err
    shutil.rmtree(tmp_path)


class SplitKTimer(FakeTimer):
    """Fake measurements in which every split of K halves a config's time: the database then holds
    split-K configs wherever a GEMM's space keeps one (a test device: the cost model decides for
    itself, see test_tuning_space)."""

    def __call__(self, instance: KernelInstance, config: space.Config, tokens: int, workload: Workload) -> float:
        return super().__call__(instance, config, tokens, workload) / int(dict(config).get("SPLIT_K", 1))


@pytest.mark.slow  # ~50 s on 2 loaded cores: two sweeps, a build compiling the split kernels, two engines run
def test_an_engine_with_split_k_gemms_matches_the_reference(engine: Path, kernel_cache: Path, tmp_path: Path) -> None:
    """Split-K configs from the database go through the gate, into kernels.json with their reduce
    kernels bound after them, and the whole engine on the triton backend (interpreter) matches the
    reference backend, prefill and greedy decode."""
    from nemocompile.api import load

    db = tmp_path / "t.sqlite"
    with override(kernel_cache_dir=str(kernel_cache)):
        # one bucket (32 tokens, the decode design point): the nearest entry for both graphs
        for kernels in ("moe_nvfp4_gemm", "fp8_linear"):
            tune_engine(engine, TuneOptions(db=db, kernels=kernels, batch_sizes=(32,), plots=False), SplitKTimer())
        build(None, tmp_path / "engine", target="h100", tuning_db=db)
    out = tmp_path / "engine"
    configs = json.loads((out / "manifest.json").read_text())["kernel_configs"]
    split = [c for c in configs if json.loads(c["config"]).get("SPLIT_K", 1) > 1]
    assert {c["graph"] for c in split} == {"prefill", "decode"}
    # the expert up-GEMM's K (32) is two BLOCK_K 16 steps: too short to split (pruned)
    assert {c["op"] for c in split} == {"moe_expert_down", "quant_linear"}
    assert all(c["source"] == "tuned" and c["check"].startswith("passed") for c in split)
    index = json.loads((out / "kernels" / "kernels.json").read_text())
    kernels = {k["name"]: k for k in index["kernels"]}
    bound_splits = 0
    for bound in index["bindings"].values():
        for names in bound.values():
            for position, name in enumerate(names):
                if kernels[name]["entry"] in ("moe_nvfp4_gemm", "fp8_linear") and \
                        kernels[name]["constexprs"]["SPLIT_K"] > 1:  # a split GEMM: its reduce right after it
                    reduce = kernels[names[position + 1]]
                    assert reduce["entry"] == kernels[name]["entry"] + "_reduce" and reduce["binary"]["arch"] == "sm_90"
                    bound_splits += 1
    assert bound_splits >= len(split) // 2
    with override(kernel_cache_dir=str(kernel_cache)):
        reference, triton = load(out, backend="reference"), load(out, backend="triton")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    expected, actual = reference.forward(prompts), triton.forward(prompts)
    assert float((expected - actual).abs().max()) <= 0.05 * float(expected.abs().max())
    mixed = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    assert reference.complete(mixed, 4) == triton.complete(mixed, 4)
