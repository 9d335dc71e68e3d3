"""Whole engines on the triton backend: the h100 and b200 demo builds select a Triton kernel for
every op kind that has one (norms, conv1d, SSD scan and decode step, attention, router, expert and
FP8 GEMMs), compile them ahead of time into kernels/ (hashed in the manifest), and
`load(backend="triton")` on this CPU runs them in Triton's interpreter. Each op either runs its
kernel or is listed, with the build's reason, as a fallback (kernels.json, report.md, and the
Resolution's `fallback`). Neither demo engine has a fallback: the b200 demo's expert GEMMs have K = 32
and 48, below tl.dot_scaled's 64-element step, and run it with the last K step padded (masked loads).

Against backend="reference", the logits error is printed (the kernels round where their reference
ops round; fp32 sums in another order still move a bf16 result by an ulp here and there) and must be
within 5% of the largest logit, and greedy decoding of a mixed-length batch (right-padded prefill
with seq_lens, then decode) gives the same 8 tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton backend needs the triton package (the [triton] extra)")

from click.testing import CliRunner

from nemocompile.api import build, load
from nemocompile.base.errors import EngineError
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.graph.kernels import candidates

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
MIXED = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
# Op kinds with a Triton kernel in the demo engines, and those that have none (reference by design).
ON_TRITON = {"add_rms_norm", "attention_gqa", "causal_conv1d", "gated_rms_norm", "moe_expert_down",
             "moe_expert_up", "moe_route", "quant_linear", "rms_norm", "ssd_chunk_scan", "ssd_state_update"}
NO_TRITON_KERNEL = {"activation", "add", "cast", "embedding", "split"}
# A `linear` has a Triton kernel for an FP8 weight with bf16 input (W8A16); the demo engines have none
# (the FP8 Mamba in_proj after a norm that quantized its output is a quant_linear reading the norm's
# E4M3 codes), so every `linear` there has a float weight (attention, latent projections, lm_head) and
# runs its reference, by design.
NO_MATCHING_KERNEL = {"linear"}
GEMMS = {"linear", "quant_linear", "grouped_gemm", "quant_grouped_gemm", "moe_expert_up", "moe_expert_down"}
# (engine, op kind) -> the reason its Triton kernel was not built, where the demo shapes miss one: none.
EXPECTED_FALLBACKS: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model built for h100 and b200, sharing one kernel compile cache."""
    root = tmp_path_factory.mktemp("triton-engines")
    built = {}
    with override(kernel_cache_dir=str(root / "kernel-cache")):
        for target in ("h100", "b200"):
            build(None, root / target, target=target)
            built[target] = root / target
    return built


@pytest.fixture(scope="module")
def engine(engines: dict[str, Path]) -> Path:
    return engines["h100"]


def test_build_writes_hashed_kernels_and_reports_them(engine: Path) -> None:
    manifest = json.loads((engine / "manifest.json").read_text())
    index = json.loads((engine / "kernels" / "kernels.json").read_text())
    assert "kernels/kernels.json" in manifest["files"] and "kernels/src/moe_gemm.py" in manifest["files"]
    kernels = {k["name"]: k for k in index["kernels"]}
    assert kernels and all(k["binary"]["arch"] == "sm_90" for k in kernels.values())
    for k in kernels.values():
        assert f"kernels/bin/{k['binary']['key']}.cubin" in manifest["files"]
    bound = {name for ops in index["bindings"].values() for names in ops.values() for name in names}
    assert bound == set(kernels)
    graph = (engine / "graph.decode.txt").read_text()
    on_triton = [line for line in graph.splitlines() if 'kernel = "triton_' in line]
    assert on_triton and len(index["bindings"]["decode"]) == len(on_triton) and index["fallbacks"] == []
    report = (engine / "report.md").read_text()
    assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16" in report and "## Kernel compile times" in report


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_every_op_runs_its_kernel_or_is_listed_with_a_reason(engines: dict[str, Path], target: str) -> None:
    """Every op kind with a Triton candidate for the arch runs on one; an op that cannot is listed in
    kernels.json and report.md with its reason, and its Resolution says so. No silent fallback."""
    engine = load(engines[target], backend="triton")
    arch = engine.manifest.target.arch
    resolutions = engine.kernels()
    ran = {r.op for r in resolutions if r.kernel.startswith("triton_")}
    fell_back = {r.op: r.fallback for r in resolutions if r.requested != r.kernel}
    expected_fallbacks = {op for (t, op) in EXPECTED_FALLBACKS if t == target}
    assert ran == ON_TRITON - expected_fallbacks
    assert set(fell_back) == expected_fallbacks
    for op, why in fell_back.items():
        assert why is not None and "the build made no" in why and EXPECTED_FALLBACKS[target, op] in why
    assert {r.op for r in resolutions} == ON_TRITON | NO_TRITON_KERNEL | NO_MATCHING_KERNEL
    for op in NO_TRITON_KERNEL:  # by design, not by a miss: the catalog has no Triton candidate for them here
        assert not any(spec.backend == "triton" and spec.runs_on(arch) for spec in candidates(op))
    index = json.loads((engines[target] / "kernels" / "kernels.json").read_text())
    assert {f["op"] for f in index["fallbacks"]} == expected_fallbacks
    report = (engines[target] / "report.md").read_text()
    assert ("## Kernel fallbacks" in report) == bool(expected_fallbacks)


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_every_quantized_gemm_runs_a_triton_kernel(engines: dict[str, Path], target: str) -> None:
    """No GEMM with an FP8 or NVFP4 weight runs its reference implementation, in either graph."""
    from nemocompile.graph.text import parse_graph

    index = json.loads((engines[target] / "kernels" / "kernels.json").read_text())
    quantized = codes = 0
    for name, file in (("prefill", "graph.txt"), ("decode", "graph.decode.txt")):
        graph = parse_graph((engines[target] / file).read_text())
        types = graph.value_types()
        for op in graph.ops:
            if op.opname in GEMMS and any(v is not None and types[v].dtype.name in ("fp8", "nvfp4")
                                          for v in op.operands[1:4]):
                quantized += 1
                assert op.results[0].name in index["bindings"][name], f"{name}: {op.opname} at {op.scope}"
            x = op.operands[0] if op.operands else None
            if op.opname == "quant_linear" and x is not None and types[x].dtype.name == "fp8e4m3":
                # the W8A8 GEMM after a fused norm reads the norm's E4M3 codes
                producer = graph.producer(x)
                assert producer is not None and producer.attrs.get("act_format") == "fp8", op.scope
                codes += 1
    assert quantized > 0 and codes > 0


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_triton_backend_matches_reference(engines: dict[str, Path], target: str) -> None:
    reference = load(engines[target], backend="reference")
    triton = load(engines[target], backend="triton")
    assert load(engines[target]).backend == "reference"  # the default on a CPU
    expected, actual = reference.forward(PROMPTS), triton.forward(PROMPTS)
    error = float((expected - actual).abs().max())
    scale = float(expected.abs().max())
    print(f"{target}: logits max |triton - reference| = {error:.4f} (max |logit| {scale:.2f})")
    assert error <= 0.05 * scale
    # 8 greedy steps of a mixed-length batch: right-padded prefill (seq_lens), then decode
    assert reference.complete(MIXED, 8) == triton.complete(MIXED, 8)


def test_cli_run_takes_a_backend(engine: Path) -> None:
    args = ["run", str(engine), "--input-ids", "1,2,3", "--max-new-tokens", "2", "--json"]
    with override():
        reference = CliRunner().invoke(main, [*args, "--backend", "reference"], catch_exceptions=False)
        triton = CliRunner().invoke(main, [*args, "--backend", "triton"], catch_exceptions=False)
    assert reference.exit_code == 0 and triton.exit_code == 0, (reference.output, triton.output)
    assert json.loads(reference.stdout) == json.loads(triton.stdout)


def test_a_changed_kernel_source_is_refused(engine: Path, tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    source = copy / "kernels" / "src" / "moe_gemm.py"
    source.write_text(source.read_text() + "\nimport os  # injected\n")
    with pytest.raises(EngineError, match=r"moe_gemm\.py"):
        load(copy, backend="triton")


def test_every_triton_candidate_has_a_builder_and_a_launcher() -> None:
    from nemocompile.codegen.triton.plan import BUILDERS
    from nemocompile.graph.kernel_candidates import CANDIDATES, FUSED_CANDIDATES
    from nemocompile.runtime.kernels.triton_backend import LAUNCHERS

    triton = {spec.name for spec in CANDIDATES if spec.backend == "triton"} | {c.name for c in FUSED_CANDIDATES}
    assert triton and triton == set(BUILDERS) == set(LAUNCHERS)
