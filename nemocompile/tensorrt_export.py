"""`build --tensorrt`: the engine's graphs exported to ONNX (codegen/tensorrt) from the weights
the build just wrote, checked by ONNX's checker, and the TensorRT engine built where TensorRT is
installed. Codegen reads the engine's weight file through a `SafetensorsSource`: the small tensors'
bytes only; the large ones are streamed into the shared data file in chunks, so the export holds
no tensor whole in memory (peak: the models' protobufs plus one chunk)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nemocompile.base.errors import EngineError
from nemocompile.codegen.tensorrt.engine_build import build_engine
from nemocompile.codegen.tensorrt.export import (
    DECOMPOSED,
    TENSORRT,
    ExternalData,
    check_exportable,
    check_model_file,
    export_graph,
    write_data,
    write_models,
)
from nemocompile.codegen.tensorrt.onnx_graph import OPSET
from nemocompile.graph.ir import Graph
from nemocompile.runtime.engine_format import TensorRTFiles

DIRECTORY = "tensorrt"
FILES = {"prefill": "model.onnx", "decode": "decode.onnx", "prefill_decomposed": "model.decomposed.onnx",
         "decode_decomposed": "decode.decomposed.onnx"}
DATA = "weights.bin"
ENGINE = "model.plan"


@dataclass(frozen=True)
class TensorRTExport:
    files: TensorRTFiles
    skipped: str  # why the TensorRT engine was not built ("" when it was)


COPY_CHUNK = 16 << 20  # bytes per read when streaming a tensor into the ONNX data file
HEADER_LIMIT = 100_000_000  # as the safetensors library: a larger header is corruption


class SafetensorsSource:
    """The tensors of one safetensors file (the engine's own, just written) by name: their sizes from
    the header, their bytes read at their offsets, never the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
            if header_len > min(HEADER_LIMIT, size - 8):
                raise EngineError(f"{path} is not a safetensors file: its header length is {header_len}")
            header = json.loads(f.read(header_len))
        self.data_start = 8 + header_len
        self.spans: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= size - self.data_start:
                raise EngineError(f"{path} is corrupt: tensor {name} lies outside the file")
            self.spans[name] = (self.data_start + begin, end - begin)

    def nbytes(self, name: str) -> int | None:
        span = self.spans.get(name)
        return None if span is None else span[1]

    def read(self, name: str) -> bytes:
        offset, length = self.spans[name]
        with self.path.open("rb") as f:
            return os.pread(f.fileno(), length, offset)

    def copy_into(self, name: str, out: BinaryIO) -> int:
        offset, length = self.spans[name]
        copied = 0
        with self.path.open("rb") as f:
            while copied < length:
                chunk = os.pread(f.fileno(), min(COPY_CHUNK, length - copied), offset + copied)
                if not chunk:
                    break
                out.write(chunk)
                copied += len(chunk)
        return copied


def check_graphs(prefill: Graph, decode: Graph) -> None:
    """Refuse, before the build writes anything, graphs the export has no form for."""
    check_exportable(prefill)
    check_exportable(decode)


def export_engine(stage: Path, prefill: Graph, decode: Graph, weights_path: Path) -> TensorRTExport:
    """Write stage/tensorrt/ (both forms of both graphs, their shared data), check each model with
    ONNX's full checker, and build the TensorRT engine where TensorRT is installed."""
    source = SafetensorsSource(weights_path)
    external = ExternalData(DATA)
    graphs = {"prefill": prefill, "decode": decode}
    models = {}
    for key, file in FILES.items():
        graph = graphs[key.removesuffix("_decomposed")]
        mode = DECOMPOSED if key.endswith("_decomposed") else TENSORRT
        models[file] = export_graph(graph, source, mode, name=f"nemotron_h_{key}", external=external)
    directory = stage / DIRECTORY
    write_models(directory, models)
    write_data(directory / DATA, external, source.copy_into)
    for file in FILES.values():
        check_model_file(directory / file)
    built = build_engine(directory / FILES["prefill"], directory / ENGINE)
    relative = {key: f"{DIRECTORY}/{file}" for key, file in FILES.items()}
    files = TensorRTFiles(relative["prefill"], relative["decode"], relative["prefill_decomposed"],
                          relative["decode_decomposed"], f"{DIRECTORY}/{DATA}", OPSET,
                          f"{DIRECTORY}/{ENGINE}" if built.engine is not None else None)
    return TensorRTExport(files, built.skipped)
