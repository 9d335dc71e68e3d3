"""The TensorRT engine build, where the `tensorrt` package imports (the `[tensorrt]` extra): parse
the exported model with TensorRT's ONNX parser into a strongly typed network (the Q/DQ and FP4
nodes carry their own types) and serialize the engine. Plugins are looked up by the creator name,
version and namespace each plugin node carries; the project registers no implementation of them
yet, so TensorRT refuses such a model in the parser and the build says which node it could not
import. None of this has been run on this project's machines: TensorRT cannot be installed here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemocompile.base.errors import NemocompileError


@dataclass(frozen=True)
class TensorRTBuild:
    """What the TensorRT step did: `engine` the engine file written, or `skipped` saying why not."""

    engine: Path | None
    skipped: str = ""


def tensorrt_module() -> Any | None:
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        return None


def build_engine(model: Path, engine: Path, workspace_bytes: int = 1 << 30) -> TensorRTBuild:
    """Build `engine` from the ONNX file `model` when TensorRT is importable; otherwise skip it,
    saying so in one line."""
    trt = tensorrt_module()
    if trt is None:
        return TensorRTBuild(None, "TensorRT is not installed: skipped building the TensorRT engine "
                                   "(the ONNX export is written; install nemocompile[tensorrt] to build it)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise NemocompileError(f"TensorRT could not parse {model}: {errors[0] if errors else 'no reason given'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise NemocompileError(f"TensorRT could not build an engine from {model}")
    engine.write_bytes(bytes(serialized))
    return TensorRTBuild(engine)
