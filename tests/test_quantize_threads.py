"""The quantize-and-write stage quantizes experts on several threads while it reads and writes in
order: the engine is byte-identical whatever the thread count (errors summed in the same order)."""

from __future__ import annotations

from pathlib import Path

import pytest

import nemocompile
from nemocompile.base.settings import override
from nemocompile.report import comparable_engine_bytes


@pytest.mark.parametrize("target", ["h100", "b200"])
def test_engine_is_the_same_for_any_thread_count(tmp_path: Path, target: str) -> None:
    engines = {}
    for threads in (1, 3):
        with override(quantize_threads=threads):
            nemocompile.build(None, tmp_path / f"{threads}", target=target, calibrate=2)
        engines[threads] = comparable_engine_bytes(tmp_path / f"{threads}")
    assert engines[1] == engines[3]
    assert "quantization error" in engines[1]["report.md"].decode().lower()
