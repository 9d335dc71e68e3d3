"""Per-rank weight files of a sharded engine, written straight from the weight stream. The stream
quantizes every weight whole (so each rank's piece is bit for bit the piece of the one-rank
engine's weight: NVFP4's global scales come from the whole tensor) and hands each tensor to
`RankSink` as it is produced, whole or in consecutive parts along its first dim (an expert, a run
of rows); the sink appends each rank's piece of each part to that rank's file. Nothing is written
twice, no whole-engine file is ever on disk, and no rank's weights, and no whole tensor beyond the
stream's own part, are held in memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import torch

from nemocompile.graph.ir import Graph, Weight
from nemocompile.graph.sharding import rank_view
from nemocompile.graph.storage import StoredTensor, component_name, stored_tensors
from nemocompile.graph.types import Sharding

from .safetensors_writer import SafetensorsWriter, data_start
from .weight_stream import METADATA, engine_tensor_specs

HASH_SEPARATOR = ","  # the sink's sha256(): every file's, in order


def _ranges(sharding: Sharding, whole: StoredTensor, logical: tuple[int, ...], rank: int) -> list[tuple[int, int]]:
    """The ranges of `whole` (a stored component of a weight of shape `logical`) along the split dim
    that `rank` holds; the whole dim when the component does not run along it (a scalar scale)."""
    dim = sharding.dim
    assert dim is not None
    if len(whole.shape) <= dim or (whole.shape[dim] == 1 and logical[dim] != 1):
        return []
    ratio = logical[dim] // whole.shape[dim]  # packed codes (2 per byte) or block scales (1 per 16)
    return [(start // ratio, stop // ratio) for start, stop in sharding.ranges(logical[dim], rank)]


def rank_pieces(weight: Weight, whole: StoredTensor, rank: int, part: torch.Tensor, first_row: int
                ) -> Iterator[torch.Tensor]:
    """`rank`'s pieces of `part`: the rows first_row.. of stored tensor `whole` of `weight`, in order
    (views where they can be: nothing is copied until written)."""
    sharding = weight.type.sharding
    if sharding is None or sharding.dim is None:
        # a partial-sum weight: rank 0 holds it, so the all-reduce adds it once
        yield torch.zeros_like(part) if sharding is not None and sharding.partial and rank > 0 else part
        return
    ranges = _ranges(sharding, whole, tuple(int(d) for d in weight.type.shape), rank)
    if not ranges:
        yield part
        return
    if sharding.dim == 0:  # the rows of the rank's ranges that fall in this part
        rows = part.shape[0] if part.dim() else 1
        for start, stop in ranges:
            low, high = max(start, first_row), min(stop, first_row + rows)
            if low < high:
                yield part[low - first_row:high - first_row]
        return
    lead = (slice(None),) * sharding.dim
    pieces = [part[(*lead, slice(start, stop))] for start, stop in ranges]
    yield pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=sharding.dim)


class RankSink:
    """Where the weight stream writes a sharded engine's weights: one safetensors file per rank (each
    rank's pieces), and optionally a whole copy (`whole`: the agreement check runs the unsharded graph
    on it; only written for models small enough for that check). Every rank file has the same header
    and tensor sizes, so one position (tensors, bytes) is every rank file's."""

    def __init__(self, graph: Graph, rank_paths: list[Path], resume_at: tuple[int, int] | None = None,
                 whole: Path | None = None) -> None:
        specs = engine_tensor_specs(rank_view(graph))
        self.stored = {component_name(w.name, s.component): (w, s) for w in graph.weights for s in stored_tensors(w.type)}
        self.ranks: list[SafetensorsWriter] = []
        self.whole: SafetensorsWriter | None = None
        try:
            for path in rank_paths:
                self.ranks.append(SafetensorsWriter(path, specs, METADATA, resume_at=resume_at))
            if whole is not None:
                assert resume_at is None, "a build that writes the whole copy restarts its weights"
                self.whole = SafetensorsWriter(whole, engine_tensor_specs(graph), METADATA)
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def data_start(graph: Graph) -> int:
        """Where every rank file's data region starts."""
        return data_start(engine_tensor_specs(rank_view(graph)), METADATA)

    @property
    def writers(self) -> list[SafetensorsWriter]:
        return [*self.ranks, *([self.whole] if self.whole is not None else [])]

    @property
    def position(self) -> tuple[int, int]:
        """(tensors written, where their bytes end in the data region) of every rank file."""
        return self.ranks[0].position

    def sha256(self) -> str:
        """Each rank file's sha256 from its first byte through the last tensor written, joined by ','."""
        return HASH_SEPARATOR.join(writer.sha256() for writer in self.ranks)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Tensor `name`, whole or in consecutive parts along its first dim: each rank's pieces of each
        part to its file as the part comes."""
        weight, whole = self.stored[name]
        for writer in self.writers:
            writer.begin(name)
        first_row = 0
        for part in parts:
            for rank, writer in enumerate(self.ranks):
                for piece in rank_pieces(weight, whole, rank, part, first_row):
                    writer.append(piece)
            if self.whole is not None:
                self.whole.append(part)
            first_row += part.shape[0] if part.dim() else 1
        for writer in self.writers:
            writer.end()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()

    def __enter__(self) -> RankSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
