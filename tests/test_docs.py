"""The docs that describe the IR stay true: the op reference is what the declarations generate,
and every pass of the pipeline is described."""

from __future__ import annotations

from pathlib import Path

from nemocompile.base.formatdoc import format_reference_markdown
from nemocompile.driver import pipeline
from nemocompile.graph.opdef import REGISTRY
from nemocompile.graph.opdoc import op_reference_markdown
from nemocompile.passes.precision_policy import resolve_policy
from nemocompile.passes.specialize_decode import SpecializeDecode
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


def test_every_pass_is_described() -> None:
    text = (DOCS / "ir.md").read_text()
    target = load_target("b200")
    for pipeline_pass in [*pipeline(target, resolve_policy(target)), SpecializeDecode()]:
        assert f"| `{pipeline_pass.name}` |" in text
