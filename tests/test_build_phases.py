"""A build names its phases: one log line per phase with its time when stderr is not a terminal, a
Rich display with each phase's own progress on a terminal, nothing with --json; the phase times
go into report.md and build --json, and report.md records how calibration was done and explains
its agreement numbers."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.console import Console
from rich.progress import Progress

from nemocompile import cli
from nemocompile.base.settings import override
from nemocompile.driver import build as driver_build
from nemocompile.options import BuildOptions
from nemocompile.passes.precision_policy import resolve_policy
from nemocompile.pipeline import (
    CALIBRATION,
    PASSES,
    PHASES,
    QUANTIZE,
    WRITE,
    PassStep,
    PhaseRecord,
    Phases,
    build_steps,
    phase_groups,
)
from nemocompile.report import (
    AGREEMENT_EXPLAINED,
    CalibrationInfo,
    calibration_lines,
    comparable_engine_bytes,
    without_build_times,
)
from nemocompile.targets import load_target

LOG_LINE = re.compile(r"^\[(?P<phase>[a-z -]+)\] (?P<seconds>\d+\.\d\d) s(?:; (?P<rest>.*))?$")
CALIBRATION_IDS = "1 5 9 13 17 21 25 29 33 37 41 45\n2,6,10,14,18,22,26,30,34,38,42,46\n"


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(cli.main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "ids.txt"
    path.write_text(CALIBRATION_IDS)
    return path


@pytest.fixture(scope="module")
def logged_build(tmp_path_factory: pytest.TempPathFactory, calibration_file: Path) -> tuple[Path, Result]:
    """The demo built for h100 (quantized: calibration and the agreement check run), output not on a
    terminal and without --json."""
    out = tmp_path_factory.mktemp("phases") / "engine"
    result = invoke("build", "--target", "h100", "-o", out, "--calibration-data", calibration_file)
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def json_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """The demo built in bf16 (nothing to calibrate or compare) with --json."""
    out = tmp_path_factory.mktemp("phases-json") / "engine"
    result = invoke("build", "--target", "h100", "-o", out, "--precision", "bf16", "--json")
    assert result.exit_code == 0, result.output
    return out, result


def log_lines(stderr: str) -> list[re.Match[str]]:
    matches = [LOG_LINE.match(line) for line in stderr.strip().splitlines()]
    assert all(matches), f"not one log line per phase:\n{stderr}"
    return [m for m in matches if m]


def test_every_step_belongs_to_a_known_phase_in_build_order() -> None:
    for name in ("h100", "b200"):
        target = load_target(name)
        groups = phase_groups(build_steps(target, resolve_policy(target)))
        order = [phase for phase, _ in groups]
        assert len(order) == len(set(order)), f"a phase is split in two: {order}"
        assert order == [p for p in PHASES if p in order]
        # driver steps: the memory plan among the passes, calibration, quantize-and-write
        assert [p for p, steps in groups if not all(isinstance(s, PassStep) for s in steps)] == [PASSES, CALIBRATION,
                                                                                               QUANTIZE]


def test_not_on_a_terminal_each_phase_prints_one_line_with_its_time(logged_build: tuple[Path, Result]) -> None:
    _, result = logged_build
    lines = log_lines(result.stderr)
    assert [m["phase"] for m in lines] == list(PHASES)
    by_phase = {m["phase"]: m["rest"] or "" for m in lines}
    assert by_phase["passes"].startswith("10 of 10 steps; set_precision, decompose, assign_precision, assign_kv_cache, "
                                         "fuse_experts, fuse_router, fuse_add_rms_norm, fuse_dequant_gemm, "
                                         "fuse_mamba_chain, plan_memory")
    assert by_phase["calibration"].startswith("7 of 7 blocks; 2 samples, 24 tokens of token ids from ")
    assert re.match(r"[\d.]+ KB of [\d.]+ KB, [\d.]+ [KMG]?B/s; \d+ weights, [\d,]+ bytes$", by_phase[QUANTIZE])
    assert by_phase["agreement check"].startswith("4 of 4 prompts; 4 random prompts, 128 positions: top-1 ")
    assert by_phase[WRITE].endswith("each with its sha256 in manifest.json")
    # the summary line still comes last, on stdout
    assert result.stdout.startswith("built ")


def test_report_records_the_phase_times(logged_build: tuple[Path, Result]) -> None:
    out, result = logged_build
    report = (out / "report.md").read_text()
    section = report.split("## Build phases\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([a-z -]+) \| (\d+\.\d{3}) \| ([^|]*) \|", section, re.MULTILINE)
    assert [name for name, _, _ in rows] == [*PHASES[:-1], "total before writing"]
    seconds = {name: float(value) for name, value, _ in rows}
    logged = {m["phase"]: float(m["seconds"]) for m in log_lines(result.stderr)}
    for name in PHASES[:-1]:
        assert seconds[name] == pytest.approx(logged[name], abs=0.006)
    assert seconds["total before writing"] == pytest.approx(sum(seconds[n] for n in PHASES[:-1]), abs=0.01)
    assert f"The {WRITE} phase" in section
    assert dict((n, p.strip()) for n, _, p in rows)["calibration"] == "7 blocks"


def test_report_records_calibration_from_a_file_with_its_hash(logged_build: tuple[Path, Result],
                                                              calibration_file: Path) -> None:
    out, _ = logged_build
    report = (out / "report.md").read_text()
    digest = hashlib.sha256(calibration_file.read_bytes()).hexdigest()
    section = report.split("## Calibration\n", 1)[1].split("\n## ", 1)[0]
    assert "- samples: 2 token sequences (one per batch), 24 tokens" in section
    assert f"- source: file {calibration_file}, sha256 {digest}" in section
    assert "amax / 448" in section


def test_report_explains_the_agreement_numbers(logged_build: tuple[Path, Result]) -> None:
    out, _ = logged_build
    report = (out / "report.md").read_text()
    section = report.split("## Agreement with the float engine\n", 1)[1].split("\n## ", 1)[0]
    assert AGREEMENT_EXPLAINED in section
    for words in ("Top-1 agreement", "Mean KL", "random weights", "trained model"):
        assert words in AGREEMENT_EXPLAINED


def test_random_calibration_is_recorded_with_its_seed() -> None:
    info = CalibrationInfo(batches=8, tokens=512, source="random", seed=0, path=None, sha256=None, scales=3)
    lines = calibration_lines(info)
    assert "- samples: 8 token sequences (one per batch), 512 tokens" in lines
    assert "- source: random token ids, seed 0" in lines
    assert calibration_lines(None)[-1].startswith("- not run")


def test_json_is_quiet_and_lists_every_phase(json_build: tuple[Path, Result]) -> None:
    out, result = json_build
    assert result.stderr == ""
    summary: dict[str, Any] = json.loads(result.stdout)
    phases = summary["phases"]
    assert [p["name"] for p in phases] == list(PHASES)
    assert all(p["seconds"] >= 0 for p in phases)
    assert sum(p["seconds"] for p in phases) <= summary["seconds"] + 0.01
    by_name = {p["name"]: p for p in phases}
    assert by_name[QUANTIZE]["unit"] == "bytes"
    assert by_name[QUANTIZE]["done"] == by_name[QUANTIZE]["total"] == summary["bytes_written"]
    assert by_name[CALIBRATION]["summary"].startswith("not needed")
    assert by_name["agreement check"]["summary"] == "skipped: nothing was quantized"
    assert summary["calibration"] is None and summary["agreement"] is None
    assert "- not run: no GEMM quantizes its activations" in (out / "report.md").read_text()


def test_on_a_terminal_the_display_names_each_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(cli, "stderr", Console(file=screen, force_terminal=True, width=160, soft_wrap=True))
    result = invoke("build", "--target", "h100", "-o", tmp_path / "engine", "--precision", "bf16")
    assert result.exit_code == 0, result.output
    shown = screen.getvalue()
    for phase in PHASES:
        assert phase in shown, f"{phase} not shown:\n{shown}"
    assert "[import]" not in result.stderr  # the display replaces the log lines


def test_the_display_shows_bytes_rate_and_time_left_while_writing() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200)
    with Progress(console=console, auto_refresh=False) as progress:
        display = cli._PhaseDisplay(progress)
        phases = Phases(display)
        with phases.phase(QUANTIZE):
            phases.set_total(4_000_000, "bytes")
            phases.advance(1_000_000, "layers.0.mixer.in_proj")
            task = progress.tasks[-1]
            detail = task.fields["detail"]
            assert re.match(r"1\.0 MB of 4\.0 MB, [\d.]+ [KMG]?B/s, ETA \d+ s, layers\.0\.mixer\.in_proj$", detail)
            assert task.completed == 1_000_000 and task.total == 4_000_000
        assert progress.tasks[-1].finished


def test_a_failed_build_prints_only_its_error(tmp_path: Path) -> None:
    bad = tmp_path / "ids.txt"
    bad.write_text("1 2 three\n")  # refused in the calibration phase, after import and passes ended
    result = invoke("build", "--target", "h100", "-o", tmp_path / "engine", "--calibration-data", bad)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "line 1" in lines[0], result.stderr
    assert not (tmp_path / "engine").exists()


def test_print_after_keeps_stderr_for_the_ir(tmp_path: Path) -> None:
    result = invoke("build", "--target", "h100", "-o", tmp_path / "engine", "--precision", "bf16",
                    "--print-after", "decompose")
    assert result.exit_code == 0, result.output
    assert not any(LOG_LINE.match(line) for line in result.stderr.splitlines())


def test_a_plain_byte_hook_still_hears_every_weight_byte(tmp_path: Path) -> None:
    heard: list[tuple[str, int, int]] = []
    result = driver_build(None, tmp_path / "engine", BuildOptions(precision="bf16"),
                          progress=lambda name, advance, total: heard.append((name, advance, total)))
    assert sum(advance for _, advance, _ in heard) == result.bytes_written
    assert {total for _, _, total in heard} == {result.bytes_written}
    assert [r.name for r in result.phases] == list(PHASES)


def test_two_builds_differ_only_in_their_phase_times(logged_build: tuple[Path, Result], calibration_file: Path,
                                                     tmp_path: Path) -> None:
    first, _ = logged_build
    again = tmp_path / "engine"
    assert invoke("build", "--target", "h100", "-o", again, "--calibration-data", calibration_file).exit_code == 0
    assert comparable_engine_bytes(first) == comparable_engine_bytes(again)
    report = (first / "report.md").read_text()
    masked = without_build_times(report)
    assert masked != report and "| import | - |" in masked
    # blanked: the phase times, and the kernel compile times (cold or from the shared compile cache)
    assert [line for line in report.splitlines() if "## Build phases" not in line and line not in masked] == [
        line for line in report.splitlines() if re.match(r"^\| [a-z -]+ \| \d+\.\d{3} \|", line)
        or re.match(r"^\| \w+ \| (sm_\d+|-) \| \d+\.\d{3} \| ", line) or line.startswith("Compiled: ")]


def test_phase_records_as_json() -> None:
    record = PhaseRecord("import", 0.123456, 0, None, "", "demo")
    assert record.as_json() == {"name": "import", "seconds": 0.1235, "done": 0, "total": None, "unit": "",
                                "summary": "demo"}
    with pytest.raises(ValueError, match="unknown build phase"):
        with Phases().phase("linking"):
            pass
