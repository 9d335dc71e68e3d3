"""Lazy checkpoint reading: layouts, corruption found at open time, checks, laziness, fingerprint."""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nemocompile.base.errors import CheckpointError
from nemocompile.graph.checkpoint import Checkpoint, TensorRef, check_tensors


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "backbone.embeddings.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "backbone.layers.0.mixer.A_log": torch.randn(4, generator=generator),
        "backbone.layers.0.mixer.up_proj.weight": torch.randn(8, 8, generator=generator).to(
            torch.float8_e4m3fn
        ),
        "backbone.layers.0.mixer.up_proj.weight_packed": torch.randint(0, 255, (8, 4), dtype=torch.uint8),
        "backbone.layers.0.mixer.up_proj.weight_scale_2": torch.tensor(0.5),
    }


def _write_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map: dict[str, str] = {}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, str(directory / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def _assert_reads_back(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype, name
        assert got.shape == tensor.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_single_file_refs_and_read(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.directory == tmp_path
    assert set(ckpt.refs) == set(tensors)
    assert ckpt.ref("backbone.embeddings.weight") == TensorRef(
        file="model.safetensors", name="backbone.embeddings.weight", dtype="BF16", shape=(16, 8)
    )
    assert ckpt.ref("backbone.layers.0.mixer.up_proj.weight_scale_2") == TensorRef(
        "model.safetensors", "backbone.layers.0.mixer.up_proj.weight_scale_2", "F32", ()
    )
    fp8_ref = ckpt.ref("backbone.layers.0.mixer.up_proj.weight")
    assert fp8_ref is not None and fp8_ref.dtype == "F8_E4M3"
    assert ckpt.ref("nope") is None
    _assert_reads_back(ckpt, tensors)
    with pytest.raises(CheckpointError, match="has no tensor nope"):
        ckpt.read("nope")


def test_sharded_index(tmp_path: Path) -> None:
    tensors = _tensors()
    weight_map = _write_sharded(tmp_path, tensors)
    ckpt = Checkpoint.open(tmp_path)
    assert {name: ref.file for name, ref in ckpt.refs.items()} == weight_map
    assert len(set(weight_map.values())) == 2
    _assert_reads_back(ckpt, tensors)


def test_loose_safetensors_files_are_found(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "first.safetensors"))
    save_file({"b": torch.zeros(3, dtype=torch.int32)}, str(tmp_path / "second.safetensors"))
    ckpt = Checkpoint.open(tmp_path)
    assert {name: ref.file for name, ref in ckpt.refs.items()} == {
        "a": "first.safetensors",
        "b": "second.safetensors",
    }
    assert torch.equal(ckpt.read("b"), torch.zeros(3, dtype=torch.int32))


def test_duplicate_tensor_across_loose_files_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "first.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "second.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"tensor a appears in both first\.safetensors and second\.safetensors"
    ):
        Checkpoint.open(tmp_path)


def test_empty_or_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "absent")


def test_missing_shard_names_index_and_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as caught:
        Checkpoint.open(tmp_path)
    message = str(caught.value)
    assert "model.safetensors.index.json" in message
    assert "model-00002-of-00002.safetensors" in message
    assert "missing" in message


def test_index_maps_tensor_to_shard_that_lacks_it(tmp_path: Path) -> None:
    weight_map = _write_sharded(tmp_path, _tensors())
    weight_map["backbone.norm_f.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError, match=r"maps tensor backbone\.norm_f\.weight to model-00001-of-00002"
    ):
        Checkpoint.open(tmp_path)


def test_index_shard_outside_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../evil.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        Checkpoint.open(tmp_path)


def test_index_that_is_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        Checkpoint.open(tmp_path)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # a download cut short
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        Checkpoint.open(tmp_path)


def test_file_cut_inside_header_is_named(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: its header claims"):
        Checkpoint.open(tmp_path)


def test_corrupt_header_bytes_are_named(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe#!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its header is not valid JSON"):
        Checkpoint.open(tmp_path)


def test_implausible_header_length_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: its header length"):
        Checkpoint.open(tmp_path)


def _raw_file(path: Path, header: Mapping[str, object], data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("entry", "data", "phrase"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, b"\0" * 8, "does not match dtype F32"),
        ({"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}, b"\0" * 2, "unknown dtype 'Q7'"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, b"\0" * 4, "invalid shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, b"\0" * 8, "invalid shape or data_offsets"),
    ],
)
def test_inconsistent_entries_are_named(
    tmp_path: Path, entry: dict[str, object], data: bytes, phrase: str
) -> None:
    _raw_file(tmp_path / "model.safetensors", {"w": entry}, data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt") as caught:
        Checkpoint.open(tmp_path)
    assert phrase in str(caught.value)


def test_overlapping_tensors_are_refused(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _raw_file(tmp_path / "model.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError, match="tensors a and b overlap"):
        Checkpoint.open(tmp_path)


def test_check_tensors_reports_every_problem_together(tmp_path: Path) -> None:
    save_file(
        {
            "backbone.layers.0.mixer.up_proj.weight": torch.zeros(4, 8, dtype=torch.bfloat16),
            "backbone.layers.1.mixer.down_proj.weight": torch.zeros(8, 8, dtype=torch.int32),
            "backbone.norm_f.weight": torch.zeros(8, dtype=torch.float32),
        },
        str(tmp_path / "model.safetensors"),
    )
    floats = frozenset({"BF16", "F16", "F32"})
    expected = {
        "backbone.layers.0.mixer.up_proj.weight": ((8, 8), floats),
        "backbone.layers.1.mixer.down_proj.weight": ((8, 8), floats),
        "backbone.layers.3.mixer.up_proj.weight": ((8, 8), floats),
        "backbone.norm_f.weight": ((8,), frozenset({"F32"})),
    }
    problems = check_tensors(Checkpoint.open(tmp_path), expected)
    assert problems == [
        "backbone.layers.0.mixer.up_proj.weight has shape [4, 8], expected [8, 8]",
        "backbone.layers.1.mixer.down_proj.weight has dtype I32, expected one of BF16, F16, F32",
        "backbone.layers.3.mixer.up_proj.weight is missing",
    ]
    single = check_tensors(Checkpoint.open(tmp_path), {"backbone.norm_f.weight": ((8,), frozenset({"BF16"}))})
    assert single == ["backbone.norm_f.weight has dtype F32, expected BF16"]


def _sparse_checkpoint(directory: Path, big_bytes: int) -> torch.Tensor:
    """A file whose header declares a huge tensor backed by a sparse (never written) data region."""
    small = torch.arange(6, dtype=torch.float32)
    header = {
        "small": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
        "big": {"dtype": "BF16", "shape": [big_bytes // 2], "data_offsets": [24, 24 + big_bytes]},
    }
    path = directory / "model.safetensors"
    _raw_file(path, header, small.numpy().tobytes())
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size + big_bytes)
    return small


def test_open_reads_no_tensor_data(tmp_path: Path) -> None:
    big_bytes = 1 << 30
    small = _sparse_checkpoint(tmp_path, big_bytes)
    tracemalloc.start()
    ckpt = Checkpoint.open(tmp_path)
    fingerprint = ckpt.fingerprint()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ckpt.ref("big") == TensorRef("model.safetensors", "big", "BF16", (big_bytes // 2,))
    assert len(fingerprint) == 64
    assert peak < 1 << 20, f"opening allocated {peak} bytes; a 1 GiB tensor must stay on disk"
    # Reading the small tensor maps only its bytes, not the 1 GiB neighbour.
    tracemalloc.start()
    assert torch.equal(ckpt.read("small"), small)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_fingerprint_is_stable_and_tracks_changes(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)
    first = Checkpoint.open(tmp_path).fingerprint()
    assert first == Checkpoint.open(tmp_path).fingerprint()
    save_file(
        {
            "backbone.embeddings.weight": torch.zeros(16, 9, dtype=torch.bfloat16),
            "backbone.layers.0.mixer.A_log": tensors["backbone.layers.0.mixer.A_log"],
        },
        str(tmp_path / "model-00001-of-00002.safetensors"),
    )
    second = Checkpoint.open(tmp_path).fingerprint()
    assert second != first
    # Moving a tensor between shards changes the index alone; the fingerprint must still move.
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"] = {"total_size": 1}
    index_path.write_text(json.dumps(index))
    assert Checkpoint.open(tmp_path).fingerprint() != second


def test_read_detects_a_file_replaced_after_open(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint.open(tmp_path)
    save_file({"w": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="changed after the checkpoint was opened"):
        ckpt.read("w")


def test_reads_files_written_by_the_engine_writer(tmp_path: Path) -> None:
    from nemocompile.safetensors_writer import SafetensorsWriter

    tensors = _tensors()
    specs = [
        (name, ref_dtype, tuple(tensor.shape))
        for (name, tensor), ref_dtype in zip(
            tensors.items(), ["BF16", "F32", "F8_E4M3", "U8", "F32"], strict=True
        )
    ]
    with SafetensorsWriter(tmp_path / "model.safetensors", specs) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    _assert_reads_back(Checkpoint.open(tmp_path), tensors)
