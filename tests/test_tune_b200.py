"""The b200 demo engine (FP8 linears on Triton, the W4A4 experts on their reference: K = 32 is under
tl.dot_scaled's 64; every norm, conv, SSD, attention and
router kernel on Triton): a cost-model sweep covers every kernel with a plot and a database entry,
and a second build takes each op's config from that database, non-GEMM kernels included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="tuning sweeps Triton kernels (the [triton] extra)")

from nemocompile.api import build
from nemocompile.base.settings import override
from nemocompile.codegen.tuning import space
from nemocompile.codegen.tuning.db import MODELLED, TuningDB
from nemocompile.tune import TuneOptions, tune_engine

GEMMS = {"moe_nvfp4_gemm", "fp8_linear"}


def test_cost_model_sweep_of_the_b200_demo_and_a_build_that_takes_every_entry(tmp_path: Path) -> None:
    engine = tmp_path / "demo-b200"
    with override(progress=False):
        build(None, engine, target="b200", calibrate=1)
        # the design points of the two graphs (decode 32 tokens, prefill 512): the build finds exact buckets
        result = tune_engine(engine, TuneOptions(db=tmp_path / "t.sqlite", cost_model=True, batch_sizes=(32, 512)))
    templates = {k["entry"] for k in json.loads((engine / "kernels" / "kernels.json").read_text())["kernels"]}
    assert len(templates) >= 10 and {s.problem.instance.template.entry for s in result.sweeps} == templates
    assert all(s.chosen is not None and s.check.startswith("passed") for s in result.sweeps)
    assert len(result.plots) == result.problems and all(p.read_bytes()[:4] == b"\x89PNG" for p in result.plots)
    db = TuningDB(tmp_path / "t.sqlite")
    entries = db.entries()
    db.close()
    assert len(entries) == 2 * result.problems and {e.source for e in entries} == {MODELLED}
    recorded = {(e.key.kernel, e.key.problem, e.bucket): e.config for e in entries}

    out = tmp_path / "again"
    with override(progress=False):
        build(None, out, target="b200", calibrate=1, tuning_db=tmp_path / "t.sqlite")
    configs = json.loads((out / "manifest.json").read_text())["kernel_configs"]
    assert configs and all(str(tmp_path / "t.sqlite") in c["why"] and c["check"].startswith("passed") for c in configs)
    index = json.loads((out / "kernels" / "kernels.json").read_text())["kernels"]
    non_gemm = [c for c in configs if "BLOCK_K" not in json.loads(c["config"]) or "BLOCK_M" not in json.loads(c["config"])]
    assert len({c["op"] for c in non_gemm}) >= 7  # norms, conv, SSD scan and step, attention, router, combine
    for c in non_gemm:  # each non-GEMM op runs the config recorded for its graph's bucket (decode 32, prefill 512)
        bucket = 32 if c["graph"] == "decode" else 512
        assert f"bucket {bucket}" in c["why"]
        config = space.parse_config(c["config"])
        assert config in {v for (_, _, b), v in recorded.items() if b == bucket}
        assert any(all({**k["constexprs"], "num_warps": k["num_warps"], "num_stages": k["num_stages"]}.get(n) == v
                       for n, v in config) for k in index)  # and the engine's kernels were emitted with it
    attention = [c for c in non_gemm if c["op"] == "attention_gqa" and "BLOCK_N" in json.loads(c["config"])]
    assert attention and {c["graph"] for c in attention} == {"prefill", "decode"}
