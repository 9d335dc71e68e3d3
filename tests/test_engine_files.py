"""Engine directory mechanics: streaming safetensors writer, staged builds, manifest verification."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nemocompile.base.errors import EngineError, UsageError
from nemocompile.base.settings import override
from nemocompile.engine_files import staged_directory, write_manifest
from nemocompile.runtime.engine_files import sha256_file, verify_engine_files
from nemocompile.runtime.engine_format import (
    GraphFiles,
    KernelUse,
    Manifest,
    PolicyInfo,
    RankFiles,
    SourceInfo,
    TargetInfo,
    weights_file,
)
from nemocompile.safetensors_writer import SafetensorsWriter

# ---------------------------------------------------------------------------------------------
# SafetensorsWriter


def _sample_tensors() -> dict[str, tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {
        "bf16": ("BF16", torch.randn(3, 5, generator=generator).to(torch.bfloat16)),
        "f32": ("F32", torch.randn(7, generator=generator)),
        "u8": ("U8", torch.randint(0, 256, (4, 4), dtype=torch.uint8, generator=generator)),
        "e4m3": ("F8_E4M3", (torch.randn(2, 8, generator=generator) * 50).to(torch.float8_e4m3fn)),
        "i64": ("I64", torch.randint(-(2**62), 2**62, (3,), dtype=torch.int64, generator=generator)),
        "scalar": ("F32", torch.tensor(0.125)),
        "empty": ("BF16", torch.empty(0, 4, dtype=torch.bfloat16)),
        "strided": ("F32", torch.arange(12, dtype=torch.float32).reshape(3, 4).t()),
    }


def _write(path: Path, tensors: dict[str, tuple[str, torch.Tensor]]) -> None:
    specs = [(name, dtype, tuple(tensor.shape)) for name, (dtype, tensor) in tensors.items()]
    with SafetensorsWriter(path, specs, metadata={"format": "pt", "rank": "0"}) as writer:
        for name, (_, tensor) in tensors.items():
            writer.write(name, tensor)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_writer_round_trips_bit_for_bit(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    path = tmp_path / "rank0.safetensors"
    _write(path, tensors)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, (_, tensor) in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(_bits(loaded[name]), _bits(tensor)), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "rank": "0"}


def test_writer_header_is_aligned_and_output_byte_identical(tmp_path: Path) -> None:
    _write(tmp_path / "a.safetensors", _sample_tensors())
    _write(tmp_path / "b.safetensors", _sample_tensors())
    first = (tmp_path / "a.safetensors").read_bytes()
    assert first == (tmp_path / "b.safetensors").read_bytes()
    header_length = int.from_bytes(first[:8], "little")
    assert header_length % 8 == 0
    assert first[8 : 8 + header_length].rstrip(b" ").endswith(b"}")


@pytest.mark.parametrize(
    ("name", "tensor", "phrase"),
    [
        ("b", torch.zeros(2), "expected tensor a next"),
        ("a", torch.zeros(2, dtype=torch.float16), "declared F32"),
        ("a", torch.zeros(3), "declared [2]"),
    ],
)
def test_writer_refuses_out_of_order_or_mismatched(
    tmp_path: Path, name: str, tensor: torch.Tensor, phrase: str
) -> None:
    writer = SafetensorsWriter(tmp_path / "w.safetensors", [("a", "F32", (2,)), ("b", "F32", (2,))])
    with pytest.raises(ValueError) as caught:
        writer.write(name, tensor)
    assert phrase in str(caught.value)
    writer.abort()
    assert not (tmp_path / "w.safetensors").exists()


def test_writer_close_requires_every_tensor(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    writer = SafetensorsWriter(path, [("a", "F32", (2,)), ("b", "F32", (2,))])
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 declared tensors unwritten, starting with b"):
        writer.close()
    assert not path.exists()
    with SafetensorsWriter(path, [("a", "F32", (2,))]) as complete:
        complete.write("a", torch.ones(2))
        with pytest.raises(ValueError, match="was not declared"):
            complete.write("extra", torch.ones(2))
    with pytest.raises(ValueError, match="already closed"):
        complete.write("a", torch.ones(2))
    assert torch.equal(load_file(str(path))["a"], torch.ones(2))


def test_writer_refuses_bad_declarations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicated"):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(ValueError, match="cannot write"):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", "F4", (2,))])


# ---------------------------------------------------------------------------------------------
# staged_directory


def _hidden_siblings(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}."))


def test_staged_directory_success(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    with staged_directory(out, force=False) as staging:
        assert staging.parent == tmp_path
        assert staging.name.startswith(".engine.partial-")
        assert not out.exists()
        (staging / "graph.txt").write_text("graph")
    assert (out / "graph.txt").read_text() == "graph"
    assert _hidden_siblings(out) == []


def test_staged_directory_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    with pytest.raises(RuntimeError, match="boom"), staged_directory(out, force=False) as staging:
        (staging / "graph.txt").write_text("graph")
        raise RuntimeError("boom")
    assert not out.exists()
    assert _hidden_siblings(out) == []


def test_staged_directory_refuses_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    out.write_text("not an engine")
    with pytest.raises(UsageError, match="is an existing file"), staged_directory(out, force=True):
        pass
    assert out.read_text() == "not an engine"


def test_staged_directory_existing_dir_needs_force(tmp_path: Path) -> None:
    out = _engine(tmp_path / "engine")
    with (
        pytest.raises(UsageError, match=r"engine already exists; pass --force"),
        staged_directory(out, force=False),
    ):
        pass
    assert (out / "graph.txt").read_text() == "graph text\n"
    with staged_directory(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
        assert (out / "graph.txt").exists()  # the old engine stays until the new one is complete
    assert sorted(path.name for path in out.iterdir()) == ["new.txt"]
    assert _hidden_siblings(out) == []


def test_staged_directory_removes_stale_partial(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    stale = tmp_path / ".engine.partial-abc123"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    unrelated = tmp_path / ".other.partial-abc123"
    unrelated.mkdir()
    with staged_directory(out, force=False) as staging:
        (staging / "a").write_text("a")
    assert not stale.exists()
    assert unrelated.exists()
    assert out.is_dir()


_CHILD_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nemocompile.engine_files import staged_directory
    out = Path(sys.argv[1])
    with staged_directory(out, force=True) as staging:
        (staging / "weights.bin").write_bytes(b"partial")
        print("ready", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("had_old_engine", [False, True])
def test_killed_build_leaves_no_engine_and_rerun_succeeds(tmp_path: Path, had_old_engine: bool) -> None:
    out = tmp_path / "engine"
    if had_old_engine:
        _engine(out)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_BUILD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert len([name for name in _hidden_siblings(out) if ".partial-" in name]) == 1
    if had_old_engine:
        assert verify_engine_files(out).source.name == "tiny"
    else:
        assert not out.exists()
    with staged_directory(out, force=True) as staging:
        (staging / "weights.bin").write_bytes(b"complete")
    assert (out / "weights.bin").read_bytes() == b"complete"
    assert _hidden_siblings(out) == []


# ---------------------------------------------------------------------------------------------
# manifest

_ENGINE_FILES = ("config.json", "graph.decode.txt", "graph.txt", "weights/rank0.safetensors")


def _manifest() -> Manifest:
    return Manifest(
        nemocompile_version="0.1.0",
        target=TargetInfo("h100", "sm_90", (9, 0)),
        ranks=(RankFiles(0, (weights_file(0),)),),
        graphs=GraphFiles("graph.txt", "graph.decode.txt"),
        config="config.json",
        kernels=(KernelUse("prefill", "linear", "reference", "reference", 3),),
        tokenizer=None,
        precision="auto",
        policy=PolicyInfo("bf16", {"router": "fp32"}, (), "error", False),
        source=SourceInfo("tiny", "f" * 64),
    )


def _engine(directory: Path) -> Path:
    (directory / "weights").mkdir(parents=True)
    (directory / weights_file(0)).write_bytes(b"w" * 1000)
    (directory / "graph.txt").write_text("graph text\n")
    (directory / "graph.decode.txt").write_text("decode graph text\n")
    (directory / "config.json").write_text("{}\n")
    write_manifest(directory, _manifest())
    return directory


def test_sha256_file_matches_hashlib_with_small_chunks(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 37)
    with override(io_chunk_bytes=7):
        assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_manifest_lists_files_deterministically(tmp_path: Path) -> None:
    directory = _engine(tmp_path / "e")
    text = (directory / "manifest.json").read_text()
    assert text.endswith("}\n")
    manifest = json.loads(text)
    assert list(manifest["files"]) == list(_ENGINE_FILES)
    assert manifest["files"]["weights/rank0.safetensors"]["size"] == 1000
    assert manifest["files"]["graph.txt"]["sha256"] == sha256_file(directory / "graph.txt")
    assert manifest["target"]["name"] == "h100"
    assert manifest["format_version"] == 2
    assert manifest["ranks"] == [{"rank": 0, "weights": ["weights/rank0.safetensors"]}]
    written = write_manifest(directory, _manifest())
    assert (directory / "manifest.json").read_text() == text
    verified = verify_engine_files(directory)
    assert verified == written
    assert verified.files["graph.txt"].size == len("graph text\n")


def test_write_manifest_refuses_a_named_file_it_does_not_hold(tmp_path: Path) -> None:
    directory = tmp_path / "e"
    directory.mkdir()
    (directory / "graph.txt").write_text("graph text\n")
    with pytest.raises(EngineError, match=r"field `graphs\.decode` names graph\.decode\.txt, which is not among"):
        write_manifest(directory, _manifest())
    assert not (directory / "manifest.json").exists()


def test_tampered_file_is_named(tmp_path: Path) -> None:
    directory = _engine(tmp_path / "e")
    (directory / "weights" / "rank0.safetensors").write_bytes(b"x" * 1000)
    with pytest.raises(
        EngineError, match=r"engine file weights/rank0\.safetensors was changed after build \(sha256"
    ):
        verify_engine_files(directory)


def test_resized_file_is_named(tmp_path: Path) -> None:
    directory = _engine(tmp_path / "e")
    (directory / "graph.txt").write_text("graph text, longer\n")
    with pytest.raises(EngineError, match=r"engine file graph\.txt was changed after build \(size"):
        verify_engine_files(directory)


def test_missing_file_is_named(tmp_path: Path) -> None:
    directory = _engine(tmp_path / "e")
    (directory / "graph.txt").unlink()
    with pytest.raises(EngineError, match=r"engine file graph\.txt is missing"):
        verify_engine_files(directory)


def test_unlisted_extra_file_is_ignored(tmp_path: Path) -> None:
    directory = _engine(tmp_path / "e")
    (directory / "notes.txt").write_text("user notes")
    assert "notes.txt" not in verify_engine_files(directory).files


def _add_entry(directory: Path, relative: str) -> None:
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][relative] = {"sha256": "0" * 64, "size": 0}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("relative", ["../x", "weights/../../x", "/etc/passwd", "outside_link"])
def test_paths_outside_engine_are_refused(tmp_path: Path, relative: str) -> None:
    directory = _engine(tmp_path / "e")
    (tmp_path / "x").write_bytes(b"")
    (directory / "outside_link").symlink_to(tmp_path / "x")
    _add_entry(directory, relative)
    with pytest.raises(
        EngineError, match=r"manifest\.json names a path outside the engine directory: "
    ) as caught:
        verify_engine_files(directory)
    assert relative in str(caught.value)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "manifest.json is missing"),
        ("{not json", "manifest.json is not valid JSON"),
        ("[1, 2]", "is not an engine manifest: it holds list, not an object"),
        ('{"format_version": 2, "files": {}}', "field `ranks` is missing"),
    ],
)
def test_bad_manifest_is_named(tmp_path: Path, content: str | None, phrase: str) -> None:
    directory = tmp_path / "e"
    directory.mkdir()
    if content is not None:
        (directory / "manifest.json").write_text(content)
    with pytest.raises(EngineError) as caught:
        verify_engine_files(directory)
    assert phrase in str(caught.value)


def test_malformed_file_entry_is_named(tmp_path: Path) -> None:
    directory = _engine(tmp_path / "e")
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["graph.txt"]["sha256"] = "zz"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"field `files\.graph\.txt\.sha256` must be 64 lowercase hex digits"):
        verify_engine_files(directory)


def test_write_manifest_refuses_symlinks(tmp_path: Path) -> None:
    directory = tmp_path / "e"
    directory.mkdir()
    (directory / "link").symlink_to(tmp_path)
    with pytest.raises(EngineError, match="symbolic link link"):
        write_manifest(directory, _manifest())
