"""The quantize-and-write stage reads checkpoint tensors with plain positional reads into buffers
(no memory map): the same values as the memory-mapped reader, whole or by runs of rows, from any
thread; a file that shrank after it was opened is named, not read past."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nemocompile.base.errors import CheckpointError
from nemocompile.checkpoint_reader import CheckpointReader
from nemocompile.graph.checkpoint import Checkpoint


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    save_file({"a.weight": torch.randn(37, 48, generator=generator).to(torch.bfloat16),
               "b.scale": torch.tensor([0.25], dtype=torch.float32),
               "c.codes": torch.randint(0, 255, (5, 8), dtype=torch.uint8, generator=generator),
               "d.weight": torch.randn(3, 16, generator=generator)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_reads_equal_the_memory_mapped_reader(checkpoint: Path) -> None:
    with Checkpoint.open(checkpoint) as opened:
        reader = CheckpointReader(opened)
        for name in opened.refs:
            expected = opened.read(name)
            got = reader.read(name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
            assert torch.equal(reader.read(name, scratch=True), expected)  # this thread's reused buffer
        weight = opened.read("a.weight")
        for rows in (slice(0, 10), slice(10, 37), slice(36, 37)):
            assert torch.equal(reader.read("a.weight", rows), weight[rows])
        with ThreadPoolExecutor(3) as pool:  # one descriptor per file, shared by the threads
            results = list(pool.map(lambda n: reader.read("a.weight", slice(n, n + 1), scratch=True).clone(),
                                    range(37)))
        assert torch.equal(torch.cat(results), weight)
        reader.close()


def test_a_file_cut_short_after_opening_is_named(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    with Checkpoint.open(checkpoint) as opened:
        path.write_bytes(path.read_bytes()[:-100])
        reader = CheckpointReader(opened)
        last = max(opened.refs, key=lambda name: opened.location(name)[1])
        with pytest.raises(CheckpointError, match=rf"{path} ended inside tensor {last}: it changed after the "
                                                  "checkpoint was opened"):
            reader.read(last)
        reader.close()
