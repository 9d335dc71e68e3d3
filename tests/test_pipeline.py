"""The build pipeline as one list of named steps per target (nemocompile/pipeline.py): its order,
the passes `plan` takes from it, and the CLI's view of it (--time-passes, --print-after, --json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.passes.precision_policy import resolve_policy
from nemocompile.pipeline import DECODE, FLOAT, PassStep, build_steps, graph_passes, step_names
from nemocompile.targets import load_target

FUSIONS = ["fuse_experts", "fuse_router", "fuse_add_rms_norm", "fuse_dequant_gemm", "fuse_mamba_chain"]
ORDER = ["set_precision", "decompose", "assign_precision", "assign_kv_cache", *FUSIONS, "plan_memory", "calibrate", "quantize_weights",
         "select_kernels", "specialize_decode", "select_kernels"]


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.mark.parametrize("name", ["h100", "b200"])
def test_each_target_has_one_ordered_list_with_the_driver_steps(name: str) -> None:
    target = load_target(name)
    steps = build_steps(target, resolve_policy(target))
    assert [s.name for s in steps] == ORDER
    assert [s.changes_graph for s in steps] == [True, True, True, True, *(True for _ in FUSIONS), False, False, False,
                                                True, True, True]
    assign = steps[2]
    assert isinstance(assign, PassStep) and assign.keep == FLOAT  # calibration runs the float graph
    decode = [s for s in steps if s.graph == DECODE]
    assert [s.describe() for s in decode] == ["specialize_decode (prefill -> decode)", "select_kernels"]
    assert [p.name for p in graph_passes(steps)] == ["set_precision", "decompose", "assign_precision",
                                                     "assign_kv_cache", *FUSIONS, "select_kernels"]
    assert step_names(steps, changing_graph=True) == ["set_precision", "decompose", "assign_precision",
                                                      "assign_kv_cache", *FUSIONS, "select_kernels", "specialize_decode"]


@pytest.fixture(scope="module")
def timed_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("pipeline") / "engine"
    result = invoke("build", "--target", "b200", "-o", out, "--time-passes", "--json")
    assert result.exit_code == 0, result.stderr
    return result, out


@pytest.fixture(scope="module")
def timed_build(timed_engine: tuple[Result, Path]) -> Result:
    return timed_engine[0]


# The demo (M*EM-E) on b200: per MoE layer one fused router and one fused expert pair; one
# add+norm per layer; the Mamba layer 3's norm quantizes its FP8 in_proj input; the other W8A8
# GEMMs quantize on load (layer 0's in_proj, both out_projs, each shared expert's up and down);
# one conv1d+SiLU per Mamba layer.
DEMO_B200_FUSIONS = {"fuse_experts": 2, "fuse_router": 2, "add_rms_norm": 6, "add_rms_norm_quantize": 1,
                     "quant_linear": 7, "quant_grouped_gemm": 0, "conv1d_silu": 2}


def test_fusion_counts_in_report_and_inspect_are_what_the_demo_implies(timed_engine: tuple[Result, Path]) -> None:
    result, out = timed_engine
    report = (out / "report.md").read_text()
    section = report.split("## Fusions", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\w+) \| (\d+) \|$", section, re.MULTILINE))
    assert {name: int(count) for name, count in rows.items()} == DEMO_B200_FUSIONS
    inspected = invoke("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["fusions"] == DEMO_B200_FUSIONS
    passes = {p["name"]: p["counts"] for p in json.loads(result.stdout)["passes"]}
    assert passes["fuse_experts"] == {"fuse_experts": 2} and passes["fuse_router"] == {"fuse_router": 2}


def test_time_passes_prints_every_step_with_its_time_and_counts(timed_build: Result) -> None:
    rows = [line for line in timed_build.stderr.splitlines() if line.strip()]
    assert rows[0].split() == ["step", "graph", "seconds", "ops", "counts"]
    steps = [row.split()[0] for row in rows[1:-1]]
    assert steps == ORDER
    assert rows[-1].split()[0] == "total"
    by_step = {row.split()[0]: row for row in rows[1:-1] if "decode" not in row}
    assert re.search(r"act_nvfp4=4", by_step["assign_precision"])  # W4A4 experts on Blackwell
    assert re.search(r"scales=12", by_step["calibrate"])
    assert re.search(r"kv_bytes_per_token=\d+", by_step["plan_memory"])
    assert re.search(r"nvfp4=4", by_step["quantize_weights"])
    seconds = [float(row.split()[2]) for row in rows[1:-1]]
    total = float(rows[-1].split()[1])
    assert all(s >= 0 for s in seconds) and abs(sum(seconds) - total) < 1e-3
    assert not re.search(r"^step\s+graph", timed_build.stdout, re.MULTILINE)  # the table goes to stderr only


def test_build_json_lists_every_step_with_its_graph_and_counts(timed_build: Result) -> None:
    passes = json.loads(timed_build.stdout)["passes"]
    assert [p["name"] for p in passes] == ORDER
    assert [p["graph"] for p in passes][-2:] == ["decode", "decode"]
    assign, calibrate = passes[2], passes[ORDER.index("calibrate")]
    assert assign["counts"]["act_nvfp4"] == 4 and assign["counts"]["act_fp8"] == 8
    assert assign["ops_after"] - assign["ops_before"] == 12  # one quantize op per W4A4 / W8A8 GEMM
    assert calibrate["counts"] == {"scales": 12}
    assert all(p["seconds"] >= 0 for p in passes)


def test_print_after_refuses_a_step_that_does_not_change_the_graph(tmp_path: Path) -> None:
    result = invoke("build", "--target", "h100", "-o", tmp_path / "e", "--print-after", "calibrate")
    assert result.exit_code != 0
    assert "'calibrate'" in result.stderr and "does not change the graph" in result.stderr
    result = invoke("build", "--target", "h100", "-o", tmp_path / "e", "--print-after", "fuse_everything")
    assert result.exit_code != 0 and "unknown step, 'fuse_everything'" in result.stderr
    assert not (tmp_path / "e").exists()
