"""Engines changed by a hostile author who recomputes the hashes (issue 7, items 3 and 7): each is
refused by `load`, `run` and `inspect` alike with one line, before anything is allocated; the
runtime reads only files the manifest hashes and follows no symbolic link; `inspect --no-verify`
still describes what is there, for forensics."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from nemocompile.base.errors import EngineError
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.runtime.engine import load

WEIGHTS = "weights/rank0.safetensors"


def invoke(*args: str | Path) -> Result:
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def assert_one_line_refusal(result: Result, *phrases: str) -> str:
    assert result.exit_code == 1, f"exit {result.exit_code}: {result.output}"
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], f"{phrase!r} not in: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemocompile.api import build

    out = tmp_path_factory.mktemp("tamper") / "engine"
    build(None, out, target="h100", precision="fp32")
    return out


def rehash(engine: Path) -> None:
    """Recompute every file's size and sha256 in the manifest, as a tamperer would."""
    path = engine / "manifest.json"
    manifest = json.loads(path.read_text())
    for relative in manifest["files"]:
        data = (engine / relative).read_bytes()
        manifest["files"][relative] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path.write_text(json.dumps(manifest, indent=2))


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def tampered(engine: Path, tmp_path: Path, change: Callable[[Path], None]) -> Path:
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    change(copy)
    rehash(copy)
    return copy


def _vocab(copy: Path) -> None:
    edit_json(copy / "config.json", lambda c: c.update(vocab_size=c["vocab_size"] + 40))


def _ssm_state_size(copy: Path) -> None:
    edit_json(copy / "config.json", lambda c: c.update(ssm_state_size=c["ssm_state_size"] * 2))


def _pattern(copy: Path) -> None:
    """The last layer's block kind changed (the number of layers kept)."""
    def change(c: dict[str, Any]) -> None:
        pattern = c.pop("hybrid_override_pattern")
        c["hybrid_override_pattern"] = pattern[:-1] + ("M" if pattern[-1] != "M" else "-")
    edit_json(copy / "config.json", change)


def _no_graphs(copy: Path) -> None:
    edit_json(copy / "manifest.json", lambda m: m.pop("graphs"))


def _config(copy: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((copy / "config.json").read_text())
    return config


def _huge_state(copy: Path) -> None:
    """Every SSM state slot made [batch, heads, head_dim, 4000000] (GBs per sequence), in both graphs."""
    c = _config(copy)
    ssm = f"tensor<f32, [batch, {c['mamba_num_heads']}, {c['mamba_head_dim']}, {c['ssm_state_size']}]>"
    huge = f"tensor<f32, [batch, {c['mamba_num_heads']}, {c['mamba_head_dim']}, 4000000]>"
    for name in ("graph.txt", "graph.decode.txt"):
        path = copy / name
        assert ssm in path.read_text()
        path.write_text(path.read_text().replace(ssm, huge))


def _chunk_size(copy: Path) -> None:
    """The SSD chunk of every Mamba op made 4,000,000 tokens (the reference pads each prompt to it)."""
    chunk = f"chunk_size = {_config(copy)['chunk_size']},"
    for name in ("graph.txt", "graph.decode.txt"):
        path = copy / name
        path.write_text(path.read_text().replace(chunk, "chunk_size = 4000000,"))


def _corrupt_header(copy: Path) -> None:
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[8:16] = b"{garbage"
    (copy / WEIGHTS).write_bytes(bytes(data))


def _huge_header_length(copy: Path) -> None:
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[0:8] = (10**12).to_bytes(8, "little")
    (copy / WEIGHTS).write_bytes(bytes(data))


def _weight_shape(copy: Path) -> None:
    """The header says norm_f is [hidden / 2, 2]: the same bytes, but not the graph's [hidden]."""
    data = (copy / WEIGHTS).read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["norm_f"]["shape"] = [_config(copy)["hidden_size"] // 2, 2]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))
    assert len(text) == length, "the changed header must keep its length"
    (copy / WEIGHTS).write_bytes(data[:8] + text + data[8 + length:])


def _tokenizer(copy: Path) -> None:
    (copy / "tokenizer.json").write_text('{"type": "bytes", "offset": "4"}')


def _tokenizer_past_vocab(copy: Path) -> None:
    edit_json(copy / "tokenizer.json", lambda t: t.update(offset=100, pad_token_id=0))


# (what, the change, phrases the one-line refusal must hold; {vocab}, {hidden} are the engine's)
TAMPERED = [
    ("config vocab_size", _vocab,
     ("config.json", "weight embeddings is [{vocab}, {hidden}], the config implies [{vocab_40}, {hidden}]")),
    ("config ssm_state_size", _ssm_state_size, ("state layers.{first_mamba}.conv",)),
    ("config pattern", _pattern, ("layer pattern",)),
    ("manifest without graphs", _no_graphs, ("manifest.json", "field `graphs` is missing")),
    ("state slot of 4000000", _huge_state, ("graph",)),
    ("chunk_size of 4000000", _chunk_size, ("chunk_size = 4000000, the config implies {chunk}",)),
    ("corrupt safetensors header", _corrupt_header, (WEIGHTS, "corrupt")),
    ("implausible safetensors header length", _huge_header_length, (WEIGHTS, "header length")),
    ("weight shape in the header", _weight_shape,
     ("tensor norm_f is F32 [{half_hidden}, 2], the graph says F32 [{hidden}]",)),
    ("tokenizer field a string", _tokenizer, ("tokenizer.json", "'offset' must be an integer")),
    ("tokenizer past the vocabulary", _tokenizer_past_vocab, ("tokenizer.json", "past the model's vocab_size")),
]
IDS = [what for what, _, _ in TAMPERED]


def _filled(phrases: tuple[str, ...], engine: Path) -> list[str]:
    c = _config(engine)
    sizes = {"vocab": c["vocab_size"], "vocab_40": c["vocab_size"] + 40, "hidden": c["hidden_size"],
             "half_hidden": c["hidden_size"] // 2, "first_mamba": c["hybrid_override_pattern"].index("M"), "chunk": c["chunk_size"]}
    return [phrase.format(**sizes) for phrase in phrases]


@pytest.mark.parametrize(("change", "phrases"), [(c, p) for _, c, p in TAMPERED], ids=IDS)
def test_load_refuses_a_tampered_engine(change: Callable[[Path], None], phrases: tuple[str, ...], engine: Path,
                                        tmp_path: Path) -> None:
    copy = tampered(engine, tmp_path, change)
    with pytest.raises(EngineError) as caught:
        load(copy)
    assert all(phrase in str(caught.value) for phrase in _filled(phrases, engine)), str(caught.value)


@pytest.mark.parametrize(("change", "phrases"), [(c, p) for _, c, p in TAMPERED], ids=IDS)
@pytest.mark.parametrize("command", ["run", "inspect"])
def test_run_and_inspect_refuse_it_in_one_line(command: str, change: Callable[[Path], None],
                                               phrases: tuple[str, ...], engine: Path, tmp_path: Path) -> None:
    copy = tampered(engine, tmp_path, change)
    args = ["--input-ids", "1,2,3", "--max-new-tokens", "2"] if command == "run" else []
    assert_one_line_refusal(invoke(command, copy, *args), *_filled(phrases, engine))


def test_the_untouched_engine_runs_and_inspects(engine: Path, tmp_path: Path) -> None:
    copy = tampered(engine, tmp_path, lambda _: None)  # rehashing alone changes nothing
    assert invoke("run", copy, "--input-ids", "1,2,3", "--max-new-tokens", "2").exit_code == 0
    result = invoke("inspect", copy, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["verified"] is True


def test_inspect_no_verify_describes_a_refused_engine(engine: Path, tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    edit_json(copy / "config.json", lambda c: c.update(eos_token_id=7))  # not rehashed
    assert_one_line_refusal(invoke("inspect", copy), "config.json", "changed after build")
    result = invoke("inspect", copy, "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["verified"] is False and info["layers"]
    table = invoke("inspect", copy, "--no-verify")
    assert table.exit_code == 0 and "NOT verified" in table.stdout


def test_format_version_true_is_not_format_1(engine: Path, tmp_path: Path) -> None:
    copy = tampered(engine, tmp_path, lambda c: edit_json(c / "manifest.json", lambda m: m.update(format_version=True)))
    for command in ("inspect", "run"):
        args = ["--input-ids", "1"] if command == "run" else []
        line = assert_one_line_refusal(invoke(command, copy, *args), "field `format_version` must be 2, got the boolean true")
        assert "format 1" not in line


# ---------------------------------------------------------------------------------------------
# what the runtime reads: only hashed files, never through a link


def test_a_config_read_through_a_link_inside_the_engine_is_refused(engine: Path, tmp_path: Path) -> None:
    """The link points at an identical copy (so the hash matches): only the link can be refused."""
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    shutil.copyfile(copy / "config.json", copy / "config.copy.json")
    (copy / "config.json").unlink()
    (copy / "config.json").symlink_to("config.copy.json")
    with pytest.raises(EngineError, match=r"config\.json is a symbolic link"):
        load(copy)
    assert_one_line_refusal(invoke("inspect", copy), "config.json is a symbolic link")


def test_a_weights_folder_that_is_a_link_is_refused(engine: Path, tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    (copy / "weights").rename(copy / "real-weights")
    (copy / "weights").symlink_to("real-weights")
    with pytest.raises(EngineError, match=r"weights is a symbolic link"):
        load(copy)


def test_a_linked_manifest_is_refused(engine: Path, tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    (copy / "manifest.json").rename(tmp_path / "manifest.json")
    (copy / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(EngineError, match=r"manifest\.json is a symbolic link"):
        load(copy)


def test_an_unhashed_config_is_never_read(engine: Path, tmp_path: Path) -> None:
    copy = tampered(engine, tmp_path, lambda c: edit_json(c / "manifest.json", lambda m: m["files"].pop("config.json")))
    with pytest.raises(EngineError, match=r"field `config` names config\.json, which is not among the hashed"):
        load(copy)


def test_a_fifo_in_place_of_a_file_is_refused(engine: Path, tmp_path: Path) -> None:
    import os

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    (copy / "graph.txt").unlink()
    os.mkfifo(copy / "graph.txt")
    with pytest.raises(EngineError, match=r"graph\.txt cannot be read: it is not a plain file"):
        load(copy)  # must not block on the FIFO


# ---------------------------------------------------------------------------------------------
# the tokenizer: the build checks it as the runtime reads it


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemocompile.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo-ckpt"))


def test_a_tokenizer_that_merely_mentions_bytes_is_not_carried(demo_checkpoint: Path, tmp_path: Path) -> None:
    """A Hugging Face style tokenizer.json holding the text "type": "bytes" somewhere inside."""
    model = tmp_path / "model"
    shutil.copytree(demo_checkpoint, model)
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"},
                                                      "pre_tokenizer": {"type": "bytes"}}, indent=1))
    out = tmp_path / "engine"
    result = invoke("build", model, "--target", "h100", "--precision", "fp32", "-o", out)
    assert result.exit_code == 0, result.output
    assert not (out / "tokenizer.json").exists()
    assert invoke("run", out, "--input-ids", "5,6", "--max-new-tokens", "2").exit_code == 0


def test_a_broken_byte_tokenizer_is_refused_at_build(demo_checkpoint: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(demo_checkpoint, model)
    (model / "tokenizer.json").write_text('{"type": "bytes", "offset": true}')
    out = tmp_path / "engine"
    result = invoke("build", model, "--target", "h100", "--precision", "fp32", "-o", out)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tokenizer.json" in errors[0] and "'offset' must be an integer" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # phase log lines come before it
    assert not out.exists()
