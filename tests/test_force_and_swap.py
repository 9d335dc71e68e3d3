"""Nothing lost (issue 7, items 1, 2 and the special-file cases of 5 and 8).

- `--force` replaces only an engine: never the input checkpoint, a directory holding an input, a
  directory inside the checkpoint, a link, or a directory that is not an engine.
- The swap of an old engine for a new one survives SIGKILL at every step: afterwards the old or
  the new engine is loadable, and a leftover aside copy is restored or removed (and the user told)
  only once a good engine is in place, never by a build that then fails.
- Special files (FIFOs, devices such as /dev/zero) given as inputs are refused by name, without
  blocking or reading forever.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from safetensors import safe_open

import nemocompile
from nemocompile.base.errors import ConfigError, UsageError
from nemocompile.base.inputs import open_regular_file, read_regular_bytes, read_regular_text
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.demo import write_demo_checkpoint
from nemocompile.runtime.engine_files import verify_engine_files

OLD_PRECISION = "bf16"  # the engine at OUT before a replacing build
NEW_PRECISION = "fp32"  # the engine the replacing build makes
DEAD_PID = 2**31 - 2  # above any pid_max: no process has it
# When a special-file check regresses, a reader blocked on a FIFO is fed this after a while, so
# the test fails instead of hanging.
FIFO_RESCUE_SECONDS = 20.0

# ---------------------------------------------------------------------------------------------
# helpers


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def build(model: Path | None, out: Path, *extra: str) -> Result:
    model_args = [model] if model is not None else []
    return invoke("build", *model_args, "--target", "h100", "-o", out, "--precision", NEW_PRECISION, *extra)


def one_line_error(result: Result, *names: str) -> str:
    """A non-zero exit and one `error:` line on stderr naming each of `names`."""
    assert result.exit_code != 0, f"expected a refusal, got exit 0: {result.stdout[:200]}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not in: {lines[0]}"
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, hidden ones included, by relative path."""
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file() and not path.is_symlink()}


def siblings(out: Path, kind: str) -> list[Path]:
    """Hidden `.OUT.partial-*` ("partial") or `.OUT.old-*` ("old") siblings of `out`."""
    return sorted(out.parent.glob(f".{out.name}.{kind}-*"))


def precision_of(engine: Path) -> str:
    """The precision of a complete, unchanged engine (every file's hash checked)."""
    return verify_engine_files(engine).precision


def set_aside_by_a_dead_build(out: Path) -> Path:
    """Move the engine at `out` where a build killed between the two renames of its swap leaves it."""
    aside = out.parent / f".{out.name}.old-{DEAD_PID}-0123456789ab"
    os.rename(out, aside)
    return aside


@pytest.fixture(scope="module")
def old_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo engine at OLD_PRECISION: what sits at OUT before a replacing build."""
    out = tmp_path_factory.mktemp("old") / "engine"
    result = invoke("build", "--target", "h100", "-o", out, "--precision", OLD_PRECISION)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "mymodel")


@pytest.fixture
def workspace(checkpoint: Path, tmp_path: Path) -> Path:
    """A folder holding a copy of the checkpoint (`mymodel`) and an unrelated file beside it."""
    shutil.copytree(checkpoint, tmp_path / "ckpt" / "mymodel")
    (tmp_path / "ckpt" / "notes.txt").write_text("unrelated, the user's")
    return tmp_path / "ckpt"


# ---------------------------------------------------------------------------------------------
# --force replaces only an engine


@pytest.mark.parametrize("force", [True, False])
def test_output_that_is_the_checkpoint_is_refused(workspace: Path, force: bool) -> None:
    model = workspace / "mymodel"
    before = snapshot(workspace)
    line = one_line_error(build(model, model, *(["--force"] if force else [])), str(model))
    assert "is the input checkpoint" in line
    assert snapshot(workspace) == before


def test_output_that_contains_the_checkpoint_is_refused(workspace: Path) -> None:
    before = snapshot(workspace)
    line = one_line_error(build(workspace / "mymodel", workspace, "--force"), str(workspace))
    assert "contains the input checkpoint" in line
    assert snapshot(workspace) == before


def test_output_inside_the_checkpoint_is_refused(workspace: Path, old_engine: Path) -> None:
    model = workspace / "mymodel"
    line = one_line_error(build(model, model / "engine"), str(model / "engine"))
    assert "lies inside the input checkpoint" in line
    assert not (model / "engine").exists() and siblings(model / "engine", "partial") == []
    shutil.copytree(old_engine, model / "engine")  # an engine in there is not replaced either
    before = snapshot(workspace)
    one_line_error(build(model, model / "engine", "--force"), "lies inside the input checkpoint")
    assert snapshot(workspace) == before


def test_output_linking_to_the_checkpoint_is_refused(workspace: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(workspace / "mymodel", target_is_directory=True)
    before = snapshot(workspace)
    one_line_error(build(workspace / "mymodel", link, "--force"), str(link), "is the input checkpoint")
    one_line_error(build(link, workspace, "--force"), "contains the input checkpoint")  # the input via a link
    assert snapshot(workspace) == before and link.is_symlink()


def test_output_holding_the_policy_file_is_refused(old_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    shutil.copytree(old_engine, out)
    policy = out / "policy.toml"
    policy.write_text('base = "bf16"\n')
    before = snapshot(out)
    line = one_line_error(build(None, out, "--force", "--policy", policy), str(out))
    assert "contains the policy file" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("content", ["files", "manifest-not-an-engine", "manifest-not-json"])
def test_a_directory_that_is_not_an_engine_is_refused_with_force(content: str, tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    if content == "manifest-not-an-engine":
        (out / "manifest.json").write_text('{"name": "my web app", "version": 3}')
    elif content == "manifest-not-json":
        (out / "manifest.json").write_text("CACHE MANIFEST\n")
    before = snapshot(out)
    line = one_line_error(build(None, out, "--force"), str(out), "not a nemocompile engine")
    assert ("holds no manifest.json" if content == "files" else "not an engine manifest") in line
    assert snapshot(out) == before
    assert siblings(out, "partial") == [] and siblings(out, "old") == []


def test_a_symbolic_link_at_out_is_refused_with_force(old_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    out.symlink_to(old_engine, target_is_directory=True)
    one_line_error(build(None, out, "--force"), str(out), "symbolic link")
    assert out.is_symlink() and precision_of(old_engine) == OLD_PRECISION


def test_the_api_refuses_the_checkpoint_as_output(workspace: Path) -> None:
    before = snapshot(workspace)
    with pytest.raises(UsageError, match="is the input checkpoint"):
        nemocompile.build(workspace / "mymodel", workspace / "mymodel", force=True)
    assert snapshot(workspace) == before


@pytest.mark.parametrize("kind", ["empty", "format-1"])
def test_force_replaces_an_empty_directory_and_an_older_engine(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    out.mkdir()
    if kind == "format-1":  # loading it says "rebuild it", so a rebuild must be able to replace it
        (out / "manifest.json").write_text(json.dumps({"format_version": 1, "nemocompile_version": "0.0.1",
                                                       "files": {}}))
    assert build(None, out, "--force").exit_code == 0
    assert precision_of(out) == NEW_PRECISION
    assert siblings(out, "old") == []


# ---------------------------------------------------------------------------------------------
# an aside copy left by a build that died between the two renames


def test_next_build_restores_the_set_aside_engine_before_refusing(old_engine: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "engine"
    shutil.copytree(old_engine, out)
    aside = set_aside_by_a_dead_build(out)
    with caplog.at_level(logging.WARNING):
        one_line_error(build(None, out), "already exists")  # no --force: the old engine stays
    assert precision_of(out) == OLD_PRECISION
    assert not aside.exists()
    assert any("restored the previous engine" in message and aside.name in message
               for message in caplog.messages)


def test_a_failing_build_never_deletes_the_set_aside_engine(old_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    shutil.copytree(old_engine, out)
    set_aside_by_a_dead_build(out)
    broken = tmp_path / "broken"
    write_demo_checkpoint(broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    one_line_error(build(broken, out, "--force"), "model.safetensors")
    assert precision_of(out) == OLD_PRECISION  # restored, and not replaced by the failed build


def test_the_aside_copy_stays_until_a_good_engine_is_in_place(old_engine: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Killed after the second rename: OUT is the new engine and the old one is still aside. A build
    that fails keeps the aside copy; the next load that verifies OUT removes it, and says so."""
    out = tmp_path / "engine"
    shutil.copytree(old_engine, out)
    aside = set_aside_by_a_dead_build(out)
    shutil.copytree(aside, out)
    one_line_error(build(tmp_path / "missing", out, "--force"), "missing")
    assert aside.exists()
    with caplog.at_level(logging.WARNING):
        nemocompile.load(out)
    assert not aside.exists()
    assert any(f"removed {aside.name}" in message for message in caplog.messages)


@pytest.mark.parametrize("command", ["load", "run", "inspect"])
def test_load_restores_the_set_aside_engine(command: str, old_engine: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "engine"
    shutil.copytree(old_engine, out)
    set_aside_by_a_dead_build(out)
    with caplog.at_level(logging.WARNING):
        if command == "load":
            assert nemocompile.load(out).generate([[1, 2]], 1).shape == (1, 3)
        else:
            extra = ["--input-ids", "1,2", "--max-new-tokens", "1"] if command == "run" else []
            result = invoke(command, out, *extra)
            assert result.exit_code == 0, result.stderr
    assert precision_of(out) == OLD_PRECISION
    assert siblings(out, "old") == []
    assert any("interrupted while replacing it" in message for message in caplog.messages)


def test_a_live_builds_aside_copy_is_left_alone(old_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    shutil.copytree(old_engine, out)
    aside = out.parent / f".{out.name}.old-{os.getpid()}-0123456789ab"  # our own pid: a build running
    shutil.copytree(old_engine, aside)
    assert build(None, out, "--force").exit_code == 0
    assert aside.exists()


# ---------------------------------------------------------------------------------------------
# SIGKILL at every step of the swap

# The child runs the real CLI; os.rename and shutil.rmtree announce the step of the swap they are
# at and sleep there when it is the chosen one, so the parent kills the build exactly at that step.
_CHILD = textwrap.dedent(
    """
    import os, shutil, sys, time
    from nemocompile import cli

    moment = sys.argv[1]
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def pause_at(step):
        if step == moment:
            print(step, flush=True)
            time.sleep(120)

    def rename(source, destination):
        if ".old-" in os.fspath(destination):
            pause_at("before-set-aside")
            real_rename(source, destination)
            pause_at("between-renames")
        elif ".partial-" in os.fspath(source):
            real_rename(source, destination)
            pause_at("after-swap")
        else:
            real_rename(source, destination)

    def rmtree(path, *args, **kwargs):
        if ".old-" in os.fspath(path) and moment == "removing-aside":
            os.remove(os.path.join(path, "weights", "rank0.safetensors"))  # half removed
            pause_at("removing-aside")
        real_rmtree(path, *args, **kwargs)

    os.rename, shutil.rmtree = rename, rmtree
    cli.main(sys.argv[2:])
    """
)
MOMENTS = ("before-set-aside", "between-renames", "after-swap", "removing-aside")
# The engine `load` finds after the kill: the old one until the second rename, then the new one.
EXPECTED = {"before-set-aside": OLD_PRECISION, "between-renames": OLD_PRECISION,
            "after-swap": NEW_PRECISION, "removing-aside": NEW_PRECISION}


@pytest.fixture(scope="module")
def killed_swaps(old_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """For each moment, an OUT whose replacing build was SIGKILLed there. The children run side by
    side (each pays the interpreter and torch start-up once, together)."""
    outs: dict[str, Path] = {}
    children: dict[str, subprocess.Popen[str]] = {}
    try:
        for moment in MOMENTS:
            out = tmp_path_factory.mktemp(moment) / "engine"
            shutil.copytree(old_engine, out)
            outs[moment] = out
            command = [sys.executable, "-c", _CHILD, moment, "build", "--target", "h100", "-o", str(out),
                       "--precision", NEW_PRECISION, "--force"]
            children[moment] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for moment, child in children.items():
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            if line != moment:
                child.wait(timeout=60)
                pytest.fail(f"the build ended before {moment}: {line!r} {child.stderr.read() if child.stderr else ''}")
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            assert child.returncode == -signal.SIGKILL
        yield outs
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_build_killed_during_the_swap_leaves_the_old_or_the_new_engine(
        moment: str, killed_swaps: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    out = killed_swaps[moment]
    # On disk: a complete engine at OUT, or (between the renames) the old one aside, never neither.
    if out.exists():
        assert precision_of(out) in (OLD_PRECISION, NEW_PRECISION)
    else:
        (aside,) = siblings(out, "old")
        assert precision_of(aside) == OLD_PRECISION
    # The next load puts the old engine back or removes the aside copy once OUT verified, and says so.
    with caplog.at_level(logging.WARNING):
        engine = nemocompile.load(out)
    assert engine.generate([[1, 2, 3]], 2).shape == (1, 5)
    assert precision_of(out) == EXPECTED[moment]
    assert siblings(out, "old") == []
    said = " ".join(caplog.messages)
    if moment == "between-renames":
        assert "restored the previous engine" in said
    elif moment in ("after-swap", "removing-aside"):
        assert "removed" in said and "holds the engine that replaced it" in said
    # The next build cleans up what the killed one left, and replaces the engine.
    result = invoke("build", "--target", "h100", "-o", out, "--precision", OLD_PRECISION, "--force")
    assert result.exit_code == 0, result.stderr
    assert precision_of(out) == OLD_PRECISION
    assert siblings(out, "old") == [] and siblings(out, "partial") == []


# ---------------------------------------------------------------------------------------------
# special files as inputs


@pytest.fixture
def make_fifo() -> Iterator[Callable[[Path], Path]]:
    """Makes named pipes. Should a reader open one blocking, a writer turns up after a while and
    feeds it text that no reader takes for the refusal the test expects: a regression fails, not hangs."""
    made: list[Path] = []
    done = threading.Event()

    def rescue() -> None:
        if done.wait(FIFO_RESCUE_SECONDS):
            return
        for path in made:
            try:  # non-blocking: succeeds only when a reader is waiting
                descriptor = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            os.write(descriptor, b"garbage from the rescuing writer\n")
            os.close(descriptor)

    def make(path: Path) -> Path:
        os.mkfifo(path)
        made.append(path)
        return path

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    yield make
    done.set()
    thread.join()


@pytest.fixture
def fifo(make_fifo: Callable[[Path], Path], tmp_path: Path) -> Path:
    return make_fifo(tmp_path / "pipe")


def test_policy_from_dev_zero_is_refused(tmp_path: Path) -> None:
    one_line_error(build(None, tmp_path / "engine", "--policy", "/dev/zero"),
                   "policy file /dev/zero", "character device")
    assert not (tmp_path / "engine").exists()


def test_policy_from_a_fifo_is_refused(fifo: Path, tmp_path: Path) -> None:
    one_line_error(build(None, tmp_path / "engine", "--policy", fifo), str(fifo), "FIFO")
    one_line_error(invoke("plan", tmp_path, "--policy", fifo), "FIFO")


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_calibration_data_that_is_a_special_file_is_refused(special: str, fifo: Path, tmp_path: Path) -> None:
    """Refused even when this build would not calibrate (bf16 quantizes no activation)."""
    path = fifo if special == "fifo" else Path(special)
    one_line_error(build(None, tmp_path / "engine", "--calibration-data", path), f"calibration data {path}",
                   "FIFO" if special == "fifo" else "character device")
    result = invoke("build", "--target", "b200", "-o", tmp_path / "engine", "--calibration-data", path)
    one_line_error(result, str(path))


def _replace_with(path: Path, special: str, make_fifo: Callable[[Path], Path]) -> None:
    path.unlink(missing_ok=True)
    if special == "fifo":
        make_fifo(path)
    else:
        path.symlink_to(special)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "hf_quant_config.json"])
def test_checkpoint_files_that_are_special_files_are_refused(
        name: str, special: str, checkpoint: Path, make_fifo: Callable[[Path], Path], tmp_path: Path) -> None:
    model = shutil.copytree(checkpoint, tmp_path / "model")
    _replace_with(model / name, special, make_fifo)
    kind = "FIFO" if special == "fifo" else "character device"
    one_line_error(build(model, tmp_path / "engine"), name, kind)
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_shard_or_index_that_is_a_special_file_is_refused(
        special: str, checkpoint: Path, make_fifo: Callable[[Path], Path], tmp_path: Path) -> None:
    model = shutil.copytree(checkpoint, tmp_path / "model")
    with safe_open(str(model / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    os.rename(model / "model.safetensors", model / "model-00001-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in names}
    weight_map["extra"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _replace_with(model / "model-00002-of-00002.safetensors", special, make_fifo)
    kind = "FIFO" if special == "fifo" else "character device"
    one_line_error(build(model, tmp_path / "engine"), "model-00002-of-00002.safetensors", kind)
    (model / "model-00002-of-00002.safetensors").unlink()
    (model / "model.safetensors.index.json").unlink()
    (model / "model.safetensors.index.json").symlink_to("/dev/zero")
    os.rename(model / "model-00001-of-00002.safetensors", model / "shard.bin")
    one_line_error(build(model, tmp_path / "engine"), "model.safetensors.index.json", "character device")


def test_plan_of_dev_zero_is_refused() -> None:
    one_line_error(invoke("plan", "/dev/zero"), "/dev/zero", "character device")


# ---------------------------------------------------------------------------------------------
# the reader itself


def test_regular_file_reader_refuses_what_is_not_a_regular_file(fifo: Path, tmp_path: Path) -> None:
    cases = {fifo: "FIFO", Path("/dev/zero"): "character device", tmp_path: "a directory",
             tmp_path / "absent": "does not exist"}
    for path, phrase in cases.items():
        with pytest.raises(UsageError, match=phrase), open_regular_file(path, "policy file", UsageError):
            pass
    text = tmp_path / "text"
    text.write_bytes(b"x" * 100)
    assert read_regular_bytes(text, "config", ConfigError, 100) == b"x" * 100
    with pytest.raises(ConfigError, match="larger than 99 bytes"):
        read_regular_bytes(text, "config", ConfigError, 99)
    text.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_regular_text(text, "config", ConfigError, 100)
    link = tmp_path / "link"
    link.symlink_to(text)  # a link to a regular file is followed (the Hugging Face cache links files)
    assert read_regular_bytes(link, "config", ConfigError, 100) == b"\xff\xfe"
