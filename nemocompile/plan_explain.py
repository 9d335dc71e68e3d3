"""`plan --explain`: the explained plan of a model from config.json alone: each op's precision and
policy rule, its kernel with the config a build would try first (a tuning database's entry, else
the cost model's) and why. The numerics gate needs weights, so plan reports it as not run; the
build's report.md has the same table with the gate's results."""

from __future__ import annotations

from pathlib import Path

from nemocompile.codegen.triton.plan import plan_kernels
from nemocompile.codegen.tuning.db import TuningDB

from .explain import OpExplained, explain
from .kernel_configs import ConfigChooser
from .planner import PlanResult


def explain_plan(result: PlanResult, tuning_db: Path | None = None) -> list[OpExplained]:
    db = TuningDB(tuning_db) if tuning_db is not None else None
    try:
        chooser = ConfigChooser(result.target, db, None, plan_only=True, graphs={"prefill": result.graph})
        plan_kernels({"prefill": result.graph}, result.target.arch, chooser)
    finally:
        if db is not None:
            db.close()
    return explain({"prefill": result.graph}, result.policy, chooser.choices, result.target.arch)
