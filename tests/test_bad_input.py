"""Bad inputs a user can meet: each is refused with a non-zero exit and ONE line on stderr naming
the file, tensor or option at fault (a traceback only with --debug), and leaves nothing
half-written: no engine at OUT, and whatever OUT held before intact.

Checkpoints are made by transformers (a tiny NemotronH) and then broken with safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from nemocompile.api import load
from nemocompile.base.errors import EngineError
from nemocompile.base.settings import override
from nemocompile.cli import main

TENSOR = "backbone.layers.1.mixer.k_proj.weight"  # [16, 32]: 2 kv heads x head_dim 8, hidden 32
WEIGHTS_FILE = "weights/rank0.safetensors"


# ---------------------------------------------------------------------------------------------
# helpers


def invoke(*args: str | Path) -> Result:
    """Run the CLI in-process; `override()` undoes any global flag (--debug) the command sets."""
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def build(model: Path | None, out: Path, *extra: str) -> Result:
    model_args = [model] if model is not None else []
    return invoke("build", *model_args, "--target", "h100", "-o", out, *extra)


def assert_one_line_error(result: Result, *names: str) -> str:
    """A non-zero exit, nothing on stdout, and one `error:` line on stderr naming every one of `names`."""
    assert result.exit_code != 0, f"expected a refusal, got exit 0; stdout begins: {result.stdout[:200]}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert result.stdout == ""
    return line


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones included) by relative POSIX path."""
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def leftovers(out: Path) -> list[str]:
    """Hidden staging or set-aside siblings a build of `out` left next to it."""
    return sorted(path.name for path in out.parent.glob(f".{out.name}.*"))


def copy_checkpoint(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def edit_config(checkpoint: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def assert_build_refused(model: Path, tmp_path: Path, good_engine: Path, *names: str) -> None:
    """The build of `model` is refused both at a fresh OUT (nothing appears) and with --force over
    an existing engine (which stays byte-for-byte as it was)."""
    fresh = tmp_path / "fresh"
    assert_one_line_error(build(model, fresh), *names)
    assert not fresh.exists() and not fresh.is_symlink()
    assert leftovers(fresh) == []

    existing = tmp_path / "existing"
    shutil.copytree(good_engine, existing)
    before = snapshot(existing)
    assert_one_line_error(build(model, existing, "--force"), *names)
    assert snapshot(existing) == before
    assert leftovers(existing) == []


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place, keeping the size (so only the hash can catch it)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Nemotron-H saved by transformers: Mamba2, attention, MoE and MLP blocks ("M*E-")."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    fields: dict[str, Any] = dict(
        vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-",
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=4, conv_kernel=4,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, n_group=1, topk_group=1,
    )
    config = NemotronHConfig(**fields)  # the legacy pattern field is accepted and expanded
    assert config.layers_block_type == ["linear_attention", "full_attention", "moe", "mlp"]
    torch.manual_seed(0)
    model = NemotronHForCausalLM(config)
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(directory)
    sharded = directory.parent / "tiny-sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    return directory


@pytest.fixture(scope="session")
def sharded_checkpoint(tiny_checkpoint: Path) -> Path:
    sharded = tiny_checkpoint.parent / "tiny-sharded"
    shards = sorted(path.name for path in sharded.glob("*.safetensors"))
    assert len(shards) > 1, f"save_pretrained did not shard: {shards}"
    assert (sharded / "model.safetensors.index.json").is_file()
    return sharded


@pytest.fixture(scope="session")
def good_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "tiny"
    result = build(tiny_checkpoint, out)
    assert result.exit_code == 0, result.stderr
    return out


def test_the_untouched_checkpoints_build(sharded_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    """The baseline every refusal below is measured against: both good checkpoints build."""
    assert load(good_engine).generate([[1, 2, 3]], 2).shape == (1, 5)
    result = build(sharded_checkpoint, tmp_path / "from-shards")
    assert result.exit_code == 0, result.stderr
    assert snapshot(tmp_path / "from-shards")[WEIGHTS_FILE] == snapshot(good_engine)[WEIGHTS_FILE]


# ---------------------------------------------------------------------------------------------
# config.json


def test_missing_config_json(tiny_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    (model / "config.json").unlink()
    assert_build_refused(model, tmp_path, good_engine, str(model / "config.json"))


def test_config_of_another_model_type(tiny_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    edit_config(model, lambda config: config.update(model_type="llama"))
    assert_build_refused(model, tmp_path, good_engine, "config.json", "llama", "model_type")


def test_unknown_block_letter_in_pattern(tiny_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    def use_pattern(config: dict[str, Any]) -> None:
        del config["layers_block_type"]
        config["hybrid_override_pattern"] = "M*X"

    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    edit_config(model, use_pattern)
    assert_build_refused(model, tmp_path, good_engine, "config.json", "hybrid_override_pattern", "'X'")


# ---------------------------------------------------------------------------------------------
# tensors


def test_missing_tensor_is_named(tiny_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    edit_tensors(model / "model.safetensors", lambda tensors: tensors.pop(TENSOR))
    assert_build_refused(model, tmp_path, good_engine, str(model), TENSOR, "missing")


def test_tensor_of_the_wrong_shape(tiny_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    def transpose(tensors: dict[str, torch.Tensor]) -> None:
        tensors[TENSOR] = tensors[TENSOR].t().contiguous()

    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    edit_tensors(model / "model.safetensors", transpose)
    assert_build_refused(model, tmp_path, good_engine, TENSOR, "[32, 16]", "[16, 32]")


def test_tensor_of_the_wrong_dtype(tiny_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    def to_int32(tensors: dict[str, torch.Tensor]) -> None:
        tensors[TENSOR] = tensors[TENSOR].to(torch.int32)

    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    edit_tensors(model / "model.safetensors", to_int32)
    assert_build_refused(model, tmp_path, good_engine, TENSOR, "I32")


def test_truncated_safetensors_file(tiny_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    weights = model / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 100)
    assert_build_refused(model, tmp_path, good_engine, str(weights), "truncated")


@pytest.mark.parametrize("corruption", ["json-garbage", "huge-length", "not-an-object"])
def test_corrupt_safetensors_header(corruption: str, tiny_checkpoint: Path, good_engine: Path,
                                    tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    length = int.from_bytes(data[:8], "little")
    if corruption == "json-garbage":
        data[8:12] = b"XXXX"
    elif corruption == "huge-length":
        data[:8] = (1 << 40).to_bytes(8, "little")
    else:
        data[8 : 8 + length] = b"[" + b" " * (length - 2) + b"]"
    weights.write_bytes(bytes(data))
    assert_build_refused(model, tmp_path, good_engine, str(weights), "corrupt")


def test_index_naming_a_missing_shard(sharded_checkpoint: Path, good_engine: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(sharded_checkpoint, tmp_path / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][TENSOR]
    (model / shard).unlink()
    assert_build_refused(model, tmp_path, good_engine, "model.safetensors.index.json", shard, "missing")


# ---------------------------------------------------------------------------------------------
# the output path


@pytest.mark.parametrize("name", ["engine.bin", "engine[v2].bin"])
def test_out_is_an_existing_file(name: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / name
    out.write_bytes(b"not an engine")
    line = assert_one_line_error(build(tiny_checkpoint, out), str(out))
    assert "existing file" in line
    assert out.read_bytes() == b"not an engine"
    assert_one_line_error(build(tiny_checkpoint, out, "--force"), str(out))
    assert out.read_bytes() == b"not an engine"
    assert leftovers(out) == []


@pytest.mark.parametrize("command", ["inspect", "run"])
def test_missing_engine_with_brackets_in_its_path_is_named(command: str, tmp_path: Path) -> None:
    """Brackets in a user's path are text, not console markup: `[/y]` must neither vanish nor crash."""
    engine = tmp_path / "x[/y]"
    args = ["--input-ids", "1"] if command == "run" else []
    assert_one_line_error(invoke(command, engine, *args), str(engine))


def test_existing_engine_is_refused_without_force(good_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    shutil.copytree(good_engine, out)
    before = snapshot(out)
    line = assert_one_line_error(build(None, out), str(out))
    assert "--force" in line
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_existing_engine_is_replaced_with_force(good_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    shutil.copytree(good_engine, out)
    (out / "stray.txt").write_text("left by the user")
    result = build(None, out, "--force")  # the demo model replaces the tiny one
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["name"] == "nemotron-h-demo"
    assert not (out / "stray.txt").exists()
    assert load(out).tokenizer is not None
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# engines changed after build


def _tampered_copy(good_engine: Path, tmp_path: Path, relative: str) -> Path:
    engine = tmp_path / "engine"
    shutil.copytree(good_engine, engine)
    target = engine / relative
    flip_byte(target, target.stat().st_size // 2)
    return engine


@pytest.mark.parametrize("relative", [WEIGHTS_FILE, "graph.txt", "config.json"])
@pytest.mark.parametrize("command", ["run", "inspect"])
def test_changed_engine_file_is_refused_by_the_cli(command: str, relative: str, good_engine: Path,
                                                   tmp_path: Path) -> None:
    engine = _tampered_copy(good_engine, tmp_path, relative)
    args = ["--input-ids", "1,2,3", "--max-new-tokens", "2"] if command == "run" else []
    line = assert_one_line_error(invoke(command, engine, *args, "--json"), relative)
    assert "changed after build" in line


@pytest.mark.parametrize("relative", [WEIGHTS_FILE, "graph.decode.txt", "tokenizer.json"])
def test_changed_engine_file_is_refused_by_load(relative: str, good_engine: Path, tmp_path: Path) -> None:
    if relative == "tokenizer.json":
        engine = tmp_path / "engine"
        result = build(None, engine)  # the demo engine carries a tokenizer
        assert result.exit_code == 0, result.stderr
        flip_byte(engine / relative, 10)
    else:
        engine = _tampered_copy(good_engine, tmp_path, relative)
    with pytest.raises(EngineError, match=relative.replace(".", r"\.")):
        load(engine)


def test_appended_bytes_are_refused(good_engine: Path, tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(good_engine, engine)
    with (engine / WEIGHTS_FILE).open("ab") as handle:
        handle.write(b"\0")
    assert_one_line_error(invoke("inspect", engine), WEIGHTS_FILE)


# Each manifest field that names a file, pointed outside the engine at a valid copy of the file,
# so nothing but the path can be the reason to refuse it.
def _point_outside(manifest: dict[str, Any], field: str) -> str:
    if field == "files":
        manifest["files"]["../x"] = manifest["files"]["config.json"]
        return "../x"
    if field == "weights":
        manifest["ranks"][0]["weights"] = [f"../outside/{WEIGHTS_FILE}"]
        return f"../outside/{WEIGHTS_FILE}"
    if field == "graphs":
        manifest["graphs"]["prefill"] = "../outside/graph.txt"
        return "../outside/graph.txt"
    manifest["tokenizer"] = "../outside/tokenizer.json"
    return "../outside/tokenizer.json"


@pytest.mark.parametrize("field", ["files", "weights", "graphs", "tokenizer"])
@pytest.mark.parametrize("command", ["run", "inspect"])
def test_manifest_naming_a_path_outside_the_engine_is_refused(command: str, field: str, tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    assert build(None, engine).exit_code == 0  # the demo: it has a tokenizer to point elsewhere
    shutil.copytree(engine, tmp_path / "outside")
    shutil.copyfile(engine / "config.json", tmp_path / "x")
    manifest_path = engine / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    outside = _point_outside(manifest, field)
    manifest_path.write_text(json.dumps(manifest, indent=2))
    args = ["--input-ids", "1,2,3", "--max-new-tokens", "2"] if command == "run" else []
    line = assert_one_line_error(invoke(command, engine, *args, "--json"), outside)
    assert "outside the engine directory" in line


# ---------------------------------------------------------------------------------------------
# killed builds

# A child that runs the real CLI with a progress hook that announces each weight and sleeps, and
# a manifest writer that announces itself and then sleeps, so the parent can kill it at a chosen step.
_CHILD = textwrap.dedent(
    """
    import contextlib, sys, time
    from nemocompile import cli, driver

    @contextlib.contextmanager
    def announcing_progress(enabled):
        done = 0
        def hook(description, advance, total):
            nonlocal done
            done += advance
            print(f"weight {done} {total}", flush=True)
            time.sleep(0.01)
        yield hook

    write_manifest = driver.write_manifest
    def announcing_write_manifest(directory, manifest, *known):
        write_manifest(directory, manifest, *known)
        print("manifest", flush=True)
        time.sleep(60)

    cli._build_progress = announcing_progress
    driver.write_manifest = announcing_write_manifest
    print("started", flush=True)
    cli.main(sys.argv[1:])
    """
)


def _reached(moment: str, line: str) -> bool:
    words = line.split()
    if not words:
        return False
    if moment in ("started", "manifest"):
        return words[0] == moment
    if words[0] != "weight":
        return False
    done, total = int(words[1]), int(words[2])
    wanted = {"first-weight": 1, "half-the-weights": total // 2, "last-weight": total}[moment]
    return done >= wanted


@pytest.mark.parametrize("moment", ["started", "first-weight", "half-the-weights", "last-weight", "manifest"])
def test_killed_build_leaves_no_engine_and_the_rerun_succeeds(moment: str, tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "engine"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "build", str(tiny_checkpoint), "--target", "h100", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        seen: list[str] = []
        for line in child.stdout:
            seen.append(line)
            if _reached(moment, line):
                break
        else:
            pytest.fail(f"the build ended before {moment}: {seen}\n{child.stderr.read() if child.stderr else ''}")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    if moment != "started":
        # Killed mid-build: its staging directory is still there (so the kill really was mid-build).
        assert any(name.startswith(".engine.partial-") for name in leftovers(out))

    result = build(tiny_checkpoint, out)
    assert result.exit_code == 0, result.stderr
    assert load(out).generate([[1, 2, 3]], 2).shape == (1, 5)
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# --debug, and the real console script


def _console_script() -> str:
    script = shutil.which("nemocompile")
    assert script is not None, "the nemocompile console script is not installed"
    return script


def test_console_script_prints_one_line_without_debug(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A long message through a real pipe (no terminal) must not be wrapped onto several lines."""
    model = copy_checkpoint(tiny_checkpoint, tmp_path / ("a-rather-long-checkpoint-directory-name-" * 3))
    edit_tensors(model / "model.safetensors", lambda tensors: tensors.pop(TENSOR))
    out = tmp_path / "engine"
    completed = subprocess.run([_console_script(), "build", str(model), "--target", "h100", "-o", str(out)],
                               capture_output=True, text=True, timeout=120, check=False,
                               env={**os.environ, "COLUMNS": "40"})
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert TENSOR in lines[0] and str(model) in lines[0]
    assert not out.exists()


def test_debug_shows_a_traceback(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "model")
    (model / "config.json").unlink()
    out = tmp_path / "engine"
    completed = subprocess.run(
        [_console_script(), "--debug", "build", str(model), "--target", "h100", "-o", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode != 0
    assert "Traceback (most recent call last)" in completed.stderr
    assert "ConfigError" in completed.stderr and "config.json" in completed.stderr
    assert not out.exists() and leftovers(out) == []
