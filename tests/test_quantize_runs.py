"""A large unstacked weight is quantized a run of rows at a time (io_chunk_bytes of them), with the
whole tensor's largest magnitude found first: the engine's weights are byte-identical to quantizing
each tensor whole, and no read of a tensor to quantize holds more than a run of it, except a routed
expert's (one tensor each, quantized whole)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nemocompile
from nemocompile.base.settings import override
from nemocompile.checkpoint_reader import CheckpointReader

RUN_BYTES = 4096


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_large_unstacked_weights_are_quantized_in_runs_of_rows(tmp_path: Path, target: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    nemocompile.build(None, tmp_path / "whole", target=target, act_scales="dynamic")
    reads: list[tuple[str, int]] = []
    original = CheckpointReader.read

    def recording(reader: CheckpointReader, name: str, rows: slice | None = None,
                  scratch: bool = False) -> torch.Tensor:
        tensor = original(reader, name, rows, scratch)
        if scratch:  # the reads of tensors to quantize
            reads.append((name, tensor.nbytes))
        return tensor

    monkeypatch.setattr(CheckpointReader, "read", recording)
    with override(io_chunk_bytes=RUN_BYTES, quantize_threads=2):
        nemocompile.build(None, tmp_path / "runs", target=target, act_scales="dynamic")
    unstacked = [(name, nbytes) for name, nbytes in reads if ".experts." not in name]
    assert unstacked, "the demo model has no unstacked weight to quantize"
    assert max(nbytes for _, nbytes in unstacked) <= RUN_BYTES, sorted(unstacked, key=lambda r: -r[1])[:3]
    names = [name for name, _ in unstacked]
    assert any(names.count(name) > 2 for name in names)  # a tensor read in several runs (and once for its amax)
    weights = "weights/rank0.safetensors"
    assert (tmp_path / "runs" / weights).read_bytes() == (tmp_path / "whole" / weights).read_bytes()
