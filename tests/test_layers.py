"""The layering contracts cover what they claim: every driver module is named in each contract that
forbids the driver, and every stage folder is a package the wheel installs."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
STAGES = {"base", "codegen", "graph", "passes", "runtime", "targets"}


def _driver_modules() -> set[str]:
    return {f"nemocompile.{p.stem}" for p in (ROOT / "nemocompile").glob("*.py") if p.stem != "__init__"}


def test_every_contract_that_forbids_the_driver_names_all_of_it() -> None:
    driver = _driver_modules()
    contracts = PYPROJECT["tool"]["importlinter"]["contracts"]
    forbidding = [c for c in contracts if "nemocompile.driver" in c.get("forbidden_modules", [])]
    assert {c["id"] for c in forbidding} >= {"base", "graph", "passes", "runtime", "codegen", "targets"}
    for contract in forbidding:
        missing = driver - set(contract["forbidden_modules"])
        assert not missing, f"contract {contract['id']} does not forbid {sorted(missing)}"


def test_every_package_folder_is_installed_under_nemocompile() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    for stage in STAGES:
        assert mapping[f"nemocompile.{stage}"] == stage
    found = {"nemocompile"}
    for stage in STAGES:
        for init in (ROOT / stage).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join(("nemocompile", *parts)))
    assert set(setuptools["packages"]) == found
