"""The CLI's exit codes follow one rule (README, "Exit codes"): 0 success (--help and --version
included), 1 a failed operation, 2 a usage error; every error is one line on stderr, click's own
validation errors included. The Python API names its own arguments, the input is checked before
the output, and `plan` of a weights file says what to pass instead."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import nemocompile.codegen.triton.aot  # noqa: F401  (raises CompileError; the walk below finds loaded subclasses)
from nemocompile.base import errors
from nemocompile.base.settings import override
from nemocompile.cli import main

COMMANDS = sorted(main.commands)  # type: ignore[attr-defined]


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def assert_refused(result: Result, code: int, *phrases: str) -> str:
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}: {result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in: {lines[0]}"
    return lines[0]


def _error_classes() -> list[type[errors.NemocompileError]]:
    found: list[type[errors.NemocompileError]] = []
    pending = [errors.NemocompileError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


# ---------------------------------------------------------------------------------------------
# --help and --version exit 0


def test_every_command_is_covered() -> None:
    assert COMMANDS == ["build", "inspect", "plan", "run", "tune"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_exits_0(command: str) -> None:
    args = [command, "--help"] if command else ["--help"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_the_console_script_exits_0(command: str) -> None:
    script = shutil.which("nemocompile")
    assert script is not None
    completed = subprocess.run([script, command, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "Usage:" in completed.stdout and "error" not in completed.stderr


def test_version_exits_0() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and "version" in result.stdout


# ---------------------------------------------------------------------------------------------
# the rule, class by class: every NemocompileError subclass has its documented code

RULE = {
    "NemocompileError": 1,
    "ConfigError": 1,
    "CheckpointError": 1,
    "IRError": 1,
    "CompileError": 1,
    "EngineError": 1,
    "StateError": 1,
    "TargetError": 2,
    "UsageError": 2,
}


def test_every_error_class_has_a_documented_code() -> None:
    names = {cls.__name__ for cls in _error_classes()}
    assert names == set(RULE), f"error classes without a rule: {names ^ set(RULE)}"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Exit codes"):]
    for name in RULE:
        if name != "NemocompileError":
            assert name in section, f"{name} is missing from README's exit-code table"


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_each_error_class_exits_with_its_code(cls: type[errors.NemocompileError], monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise cls(f"a {cls.__name__} naming {tmp_path}/engine\non a second line")

    monkeypatch.setattr("nemocompile.inspection.inspect_engine", refuse)
    line = assert_refused(invoke("inspect", tmp_path / "engine"), RULE[cls.__name__], cls.__name__)
    assert "on a second line" in line  # newlines in a message are folded into the one line


def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*_: object, **__: object) -> None:
        raise KeyError("graphs")

    monkeypatch.setattr("nemocompile.inspection.inspect_engine", broken)
    assert_refused(invoke("inspect", tmp_path), 1, "KeyError", "--debug")


# Real error paths, one or more per class and click's own: (arguments, code, phrase, from click).
MODELS = Path("/work/shared/models")
PATHS = [
    (["plan", "/nonexistent/config.json"], 1, "does not exist", False),                       # ConfigError
    (["inspect", "/nonexistent/engine"], 1, "is not an engine directory", False),            # EngineError
    (["run", "/nonexistent/engine", "--input-ids", "1"], 1, "is not an engine directory", False),
    (["plan", MODELS / "nano.json", "--target", "a100"], 2, "unknown target 'a100'", False),  # TargetError
    (["plan", MODELS / "nano.json", "--override", "routed_experts=nvfp4_w4a4"], 2, "h100", False),
    (["plan", MODELS / "nano.json", "--override", "router"], 2, "--override must look like", False),  # UsageError
    (["plan", MODELS / "nano.json", "--max-context", "0"], 2, "--max-context", False),
    (["build", "--target", "h100"], 2, "Missing option '-o'", True),
    (["build", "-o", "x"], 2, "Missing option '--target'", True),
    (["build", "--target", "h100", "-o", "x", "--precision", "fp4"], 2, "Invalid value for '--precision'", True),
    (["build", "--target", "h100", "-o", "x", "--calibrate", "many"], 2, "'many' is not a valid integer", True),
    (["run", "e", "--input-ids", "1", "--temperature", "hot"], 2, "--temperature", True),
    (["run", "e", "--nonsense"], 2, "No such option", True),
    (["compile"], 2, "No such command 'compile'", True),
    (["tune", "/nonexistent/engine", "--cost-model"], 1, "is not an engine directory", False),
    (["tune", "e", "--budget", "soon"], 2, "--budget must be a duration", False),
    (["plan"], 2, "Missing argument 'CONFIG'", True),
    ([], 2, "no command given", True),
]


@pytest.mark.parametrize(("args", "code", "phrase", "from_click"), PATHS,
                         ids=[" ".join(map(str, a)) or "(none)" for a, _, _, _ in PATHS])
def test_error_paths_follow_the_rule(args: list[str | Path], code: int, phrase: str, from_click: bool) -> None:
    line = assert_refused(invoke(*args), code, phrase)
    if from_click:
        assert "--help'" in line  # click's usage errors say where to look


def test_click_errors_are_one_line_through_the_console_script() -> None:
    script = shutil.which("nemocompile")
    assert script is not None
    completed = subprocess.run([script, "build", "--target", "h100", "-o", "x", "--precision", "fp4"],
                               capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert completed.stdout == ""


# ---------------------------------------------------------------------------------------------
# issue 10 item 5: errors in the right order and words


def test_a_missing_input_is_named_before_an_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    assert_refused(invoke("build", tmp_path / "nosuchdir", "--target", "h100", "-o", out), 1,
                   "nosuchdir does not exist")


def test_plan_of_a_weights_file_says_what_to_pass(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert_refused(invoke("plan", weights), 1, "pass a checkpoint directory or its config.json")


def test_the_api_names_its_own_arguments(tmp_path: Path) -> None:
    from nemocompile.api import api_message, build

    out = tmp_path / "engine"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(errors.NemocompileError) as caught:
        build(None, out, precision="fp32")
    message = str(caught.value)
    assert "force=True" in message and "--force" not in message, message
    with pytest.raises(errors.UsageError) as bounded:
        build(None, tmp_path / "other", max_context=0)
    assert "max_context" in str(bounded.value) and "--max-context" not in str(bounded.value)
    assert api_message("pass --force, or --calibrate 8 (--calibration-data)") == \
        "pass force=True, or calibrate 8 (calibration_data)"


def test_click_usage_error_classes_keep_their_codes() -> None:
    """The rule's 2 is click's own convention: its usage errors carry it."""
    assert click.UsageError("x").exit_code == 2 and click.BadParameter("x").exit_code == 2
    assert click.ClickException("x").exit_code == 1
