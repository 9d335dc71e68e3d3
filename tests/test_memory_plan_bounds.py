"""Bounds a build chooses when --max-batch-size or --max-context is not given
(nemocompile/memory_plan_bounds.py): on the published configurations (plan only, no weights), and
through `nemocompile build` of the demo, whose engine then refuses what lies past them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nemocompile.api import load
from nemocompile.base.errors import TargetError, UsageError
from nemocompile.base.settings import override, settings
from nemocompile.cli import main
from nemocompile.demo import write_demo_checkpoint
from nemocompile.graph.ir import DimBound
from nemocompile.graph.text import parse_graph
from nemocompile.memory_plan import check_fits
from nemocompile.options import BuildOptions
from nemocompile.planner import PlanResult, plan_model

MODELS = Path("/work/shared/models") if Path("/work/shared/models").is_dir() else \
    Path(__file__).resolve().parents[2] / "shared" / "models"
BATCH, CONTEXT = "--max-batch-size", "--max-context"


def _plan(model: str | Path, **options: Any) -> PlanResult:
    path = model if isinstance(model, Path) else MODELS / f"{model}.json"
    return plan_model(path, BuildOptions(**options))


@pytest.mark.parametrize(("model", "target", "world", "batch"),
                         [("nano", "h100", 1, 68), ("nano", "b200", 1, 185), ("ultra", "h100", 8, 34),
                          ("ultra", "b200", 8, 151)])
def test_defaults_keep_the_context_and_shrink_the_batch_to_what_fits(model: str, target: str, world: int,
                                                                      batch: int) -> None:
    chosen = _plan(model, target=target, world_size=world)
    assert (chosen.bounds.max_batch_size, chosen.bounds.max_context) == (batch, 131072)  # docs/memory-plan.md
    assert chosen.bounds.automatic == (BATCH, CONTEXT) and chosen.fits
    assert "256 x 131072 tokens do not fit" in chosen.bounds.why
    # the plan at the chosen bounds is the plan given them explicitly, and one more sequence does not fit
    given = _plan(model, target=target, world_size=world, max_batch_size=batch, max_context=131072)
    assert chosen.bytes_per_gpu == given.bytes_per_gpu <= given.target.memory_bytes
    assert given.bounds.automatic == () and given.fits
    assert not given.memory.fits_at(batch + 1, 131072)


def test_a_given_context_is_kept_and_only_the_batch_shrinks() -> None:
    chosen = _plan("nano", max_context=1 << 20)
    explicit = _plan("nano", max_batch_size=256, max_context=1 << 20)
    assert not explicit.fits
    most = explicit.memory.largest_batch(1 << 20)
    assert (chosen.bounds.max_batch_size, chosen.bounds.max_context) == (most, 1 << 20) and 0 < most < 256
    assert chosen.bounds.automatic == (BATCH,) and chosen.fits


def test_a_given_batch_is_kept_and_only_the_context_shrinks() -> None:
    chosen = _plan("nano", max_batch_size=256)
    longest = _plan("nano", max_batch_size=256, max_context=131072).memory.largest_context(256)
    assert longest is not None and 0 < longest < 131072
    assert (chosen.bounds.max_batch_size, chosen.bounds.max_context) == (256, longest)
    assert chosen.bounds.automatic == (CONTEXT,) and chosen.fits


def test_the_context_shrinks_only_once_one_sequence_does_not_fit() -> None:
    full = _plan("nano", max_batch_size=1, max_context=131072)
    # leave room for one sequence of 100000 tokens and no more
    reserve = full.target.memory_bytes - (full.memory.bytes_at(1, 100000) - settings().plan_runtime_reserve_bytes)
    with override(plan_runtime_reserve_bytes=reserve):
        chosen = _plan("nano")
    assert (chosen.bounds.max_batch_size, chosen.bounds.max_context) == (1, 100000) and chosen.fits


def test_the_models_context_limit_is_the_ceiling(tmp_path: Path) -> None:
    config = json.loads((MODELS / "nano.json").read_text())
    for limit, expected in ((4096, (256, 4096)), (1 << 20, (68, 131072))):
        path = tmp_path / f"nano-{limit}.json"
        path.write_text(json.dumps({**config, "max_position_embeddings": limit}))
        chosen = _plan(path)
        assert (chosen.bounds.max_batch_size, chosen.bounds.max_context) == expected and chosen.fits
        assert ("max_position_embeddings is 4096" in chosen.bounds.why) == (limit == 4096)
        # a context given explicitly may exceed the model's limit: the user's choice
        assert _plan(path, max_batch_size=1, max_context=1 << 20).bounds.max_context == 1 << 20


def test_bounds_given_that_do_not_fit_and_weights_that_do_not_fit_are_refused() -> None:
    given = _plan("nano", max_batch_size=256, max_context=131072)
    assert not given.fits and given.bounds.automatic == ()
    with pytest.raises(TargetError, match=r"what fits: --max-context \d+ at this batch"):
        check_fits(given.memory)
    # Super's 79 GB of weights on one 80 GB H100: no bound is small enough
    heavy = _plan("super")
    assert not heavy.fits and not heavy.bounds.fits and not heavy.bounds.shrunk
    with pytest.raises(TargetError, match="not even one sequence of one token fits"):
        check_fits(heavy.memory)


# ---------------------------------------------------------------- through `nemocompile build`


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo"))


def _reserve_leaving(demo: Path, batch: int, context: int) -> int:
    """A runtime reserve that leaves the demo's fp32 engine exactly `batch` x `context` on an H100."""
    plan = plan_model(demo, BuildOptions(precision="fp32", max_batch_size=batch, max_context=context)).memory
    return plan.target.memory_bytes - (plan.bytes_at(batch, context) - settings().plan_runtime_reserve_bytes)


def _build(demo: Path, out: Path, reserve: int, *options: str) -> Any:
    with override(plan_runtime_reserve_bytes=reserve):
        return CliRunner().invoke(main, ["build", str(demo), "--target", "h100", "--precision", "fp32", "-o",
                                         str(out), *options])


def test_build_shrinks_default_bounds_says_so_and_the_engine_holds_to_them(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = _build(demo, out, _reserve_leaving(demo, 1, 1000))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("bounds:")]
    assert lines == ["bounds: --max-batch-size 1 --max-context 1000 (--max-batch-size and --max-context not "
                     "given: chosen automatically, 256 x 131072 tokens do not fit h100 at world size 1)"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bounds"] == {"max_batch_size": 1, "max_context": 1000,
                                  "chosen_automatically": [BATCH, CONTEXT],
                                  "why": "256 x 131072 tokens do not fit h100 at world size 1"}
    report = (out / "report.md").read_text()
    assert "Run-time bounds: 1 sequences of up to 1000 tokens; --max-batch-size and --max-context chosen " \
           "automatically" in report
    assert "At --max-batch-size 1 and --max-context 1000," in report
    for name in ("graph.txt", "graph.decode.txt"):
        graph = parse_graph((out / name).read_text())
        assert (graph.dim_bound("batch"), graph.dim_bound("ctx")) == (DimBound("batch", 1, 1),
                                                                      DimBound("ctx", 0, 1000))
    engine = load(out)
    assert engine.generate([[1] * 990], max_new_tokens=10).shape == (1, 1000)
    with pytest.raises(UsageError, match="990 tokens plus 11 new ones make 1001 tokens, which exceed the engine's "
                                         "context bound of 1000"):
        engine.generate([[1] * 990], max_new_tokens=11)
    with pytest.raises(UsageError, match="1001 tokens exceed the engine's context bound of 1000"):
        engine.forward([[1] * 1001])
    with pytest.raises(UsageError, match="batch size must be at most 1, got 2"):
        engine.generate([[1], [2]], max_new_tokens=1)


def test_build_keeps_a_given_context_shrinks_the_batch_and_refuses_a_given_batch(demo: Path,
                                                                                  tmp_path: Path) -> None:
    reserve = _reserve_leaving(demo, 5, 131072)
    out = tmp_path / "engine"
    result = _build(demo, out, reserve, "--max-context", "131072", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bounds"]["max_batch_size"] == 5
    assert json.loads((out / "manifest.json").read_text())["bounds"]["chosen_automatically"] == [BATCH]
    # a given batch keeps its value: the context shrinks for it
    shorter = _build(demo, tmp_path / "shorter", reserve, "--max-batch-size", "6", "--json")
    assert shorter.exit_code == 0, shorter.output
    bounds = json.loads(shorter.stdout)["bounds"]
    assert bounds["max_batch_size"] == 6 and 0 < bounds["max_context"] < 131072
    refused = _build(demo, tmp_path / "refused", reserve, "--max-batch-size", "6", "--max-context", "131072")
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"error: {demo.name} does not fit h100 at world size 1: the memory plan at "
                                     "--max-batch-size 6 and --max-context 131072 needs")
    assert "--max-batch-size 5 at this context" in refused.stderr and refused.stderr.count("\n") == 1
    assert not (tmp_path / "refused").exists()


def test_docs_table_of_chosen_bounds_is_what_the_planner_chooses() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "memory-plan.md").read_text()
    table = text.split("| model | GPUs | bounds chosen (batch x context) |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = [[cell.strip() for cell in row.strip("|").split("|")] for row in table.splitlines()]
    assert len(rows) == 6
    for model, gpus, chosen in rows:
        world, target = gpus.split(" x ")
        result = _plan(model, target=target, world_size=int(world))
        if chosen.startswith("refused"):
            assert not result.fits and not result.bounds.fits
        else:
            assert result.fits and chosen == f"{result.bounds.max_batch_size} x {result.bounds.max_context}"
