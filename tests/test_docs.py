"""The docs that describe the IR stay true: the op reference is what the declarations generate,
and every pass of the pipeline is described."""

from __future__ import annotations

from pathlib import Path

from nemocompile.base.formatdoc import format_reference_markdown
from nemocompile.graph.opdef import REGISTRY
from nemocompile.graph.opdoc import op_reference_markdown
from nemocompile.passes.precision_policy import resolve_policy
from nemocompile.pipeline import build_steps, step_names
from nemocompile.targets import load_target

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_op_reference_is_current() -> None:
    assert (DOCS / "ops.md").read_text() == op_reference_markdown(), \
        "docs/ops.md is stale: run python -m nemocompile.graph.opdoc > docs/ops.md"


def test_format_reference_is_current() -> None:
    assert (DOCS / "formats.md").read_text() == format_reference_markdown(), \
        "docs/formats.md is stale: run python -m nemocompile.base.formatdoc > docs/formats.md"


def test_every_op_is_documented_with_a_meaning() -> None:
    text = op_reference_markdown()
    for name, definition in REGISTRY.items():
        assert f"| `{name}` |" in text
        assert definition.doc, f"op {name} has no doc"


def test_every_pipeline_step_is_described_in_order() -> None:
    text = (DOCS / "ir.md").read_text()
    for name in ("h100", "b200"):
        target = load_target(name)
        steps = step_names(build_steps(target, resolve_policy(target)))
        assert {"calibrate", "quantize_weights", "specialize_decode"} <= set(steps)
        rows = [text.index(f"| `{step}` |") for step in steps]  # a missing row raises here
        assert rows == sorted(rows), f"docs/ir.md lists the steps of {name} out of order"
