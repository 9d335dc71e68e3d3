"""`build --tensorrt`: the engine's graphs exported to ONNX (codegen/tensorrt) from the weights
the build just wrote, checked by ONNX's checker, and the TensorRT engine built where TensorRT is
installed. The driver reads the engine's weight file and hands codegen its tensors' bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from nemocompile.codegen.tensorrt.engine_build import build_engine
from nemocompile.codegen.tensorrt.export import (
    DECOMPOSED,
    TENSORRT,
    check_exportable,
    check_model_file,
    export_graph,
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


def weight_bytes(weights_path: Path) -> dict[str, bytes]:
    """Every tensor of a safetensors file as its raw little-endian bytes."""
    return {name: tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for name, tensor in load_file(str(weights_path)).items()}


def check_graphs(prefill: Graph, decode: Graph) -> None:
    """Refuse, before the build writes anything, graphs the export has no form for."""
    check_exportable(prefill)
    check_exportable(decode)


def export_engine(stage: Path, prefill: Graph, decode: Graph, weights_path: Path) -> TensorRTExport:
    """Write stage/tensorrt/ (both forms of both graphs, their shared data), check each model with
    ONNX's full checker, and build the TensorRT engine where TensorRT is installed."""
    weights = weight_bytes(weights_path)
    graphs = {"prefill": prefill, "decode": decode}
    models = {}
    for key, file in FILES.items():
        graph = graphs[key.removesuffix("_decomposed")]
        mode = DECOMPOSED if key.endswith("_decomposed") else TENSORRT
        models[file] = export_graph(graph, weights, mode, name=f"nemotron_h_{key}")
    directory = stage / DIRECTORY
    write_models(directory, models, DATA)
    for file in FILES.values():
        check_model_file(directory / file)
    built = build_engine(directory / FILES["prefill"], directory / ENGINE)
    relative = {key: f"{DIRECTORY}/{file}" for key, file in FILES.items()}
    files = TensorRTFiles(relative["prefill"], relative["decode"], relative["prefill_decomposed"],
                          relative["decode_decomposed"], f"{DIRECTORY}/{DATA}", OPSET,
                          f"{DIRECTORY}/{ENGINE}" if built.engine is not None else None)
    return TensorRTExport(files, built.skipped)
