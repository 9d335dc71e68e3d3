"""A whole engine on the triton backend: the h100 demo build selects the NVFP4 W4A16 Triton kernel
for its routed-expert GEMMs, compiles it ahead of time for sm_90a into kernels/ (hashed in the
manifest), and `load(backend="triton")` on this CPU runs those kernels in Triton's interpreter.
Against backend="reference": the logits error is stated (bf16 engine: the kernels accumulate in
fp32 and round their bf16 outputs once, where the reference also rounds intermediate GEMM
outputs to bf16; those one-ulp differences travel through the layers), and greedy decoding gives
the same 8 tokens."""

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

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton-engine") / "demo-h100"
    with override(kernel_cache_dir=str(tmp_path_factory.mktemp("kernel-cache"))):
        build(None, out, target="h100")
    return out


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
    assert on_triton and len(index["bindings"]["decode"]) == len(on_triton)  # the routed-expert GEMMs
    report = (engine / "report.md").read_text()
    assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16" in report and "## Kernel compile times" in report


def test_triton_backend_matches_reference(engine: Path) -> None:
    reference = load(engine, backend="reference")
    triton = load(engine, backend="triton")
    assert load(engine).backend == "reference"  # the default on a CPU
    used = {r.kernel for r in triton.kernels()}
    assert any(name.startswith("triton_") for name in used)
    expected, actual = reference.forward(PROMPTS), triton.forward(PROMPTS)
    error = float((expected - actual).abs().max())
    scale = float(expected.abs().max())
    print(f"logits max |triton - reference| = {error:.4f} (max |logit| {scale:.2f})")
    assert error <= 0.05 * scale
    greedy_reference = reference.generate(PROMPTS, 8)
    greedy_triton = triton.generate(PROMPTS, 8)
    assert greedy_reference.tolist() == greedy_triton.tolist()


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
