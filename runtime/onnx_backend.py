"""`load(path, backend="onnx")`: run an engine's decomposed ONNX export (written by `build
--tensorrt`) on the CPU, to check what the export means against the reference runtime.

The models and their external data are read only from files the manifest hashes, through the same
checked reads as every other engine file, and assembled in memory (nothing is opened by path).
onnxruntime runs a model it has kernels for (FP32, BF16 through Cast, FP8 Q/DQ); a model holding
NVFP4 (FLOAT4E2M1, which onnxruntime cannot run) goes to ONNX's reference evaluator. bf16 model
inputs and outputs are bridged through float32 (a lossless Cast) because neither takes bf16 arrays
from numpy. State lives in the runtime's `Cache`, fed in and read back each call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from nemocompile.base.errors import EngineError, UsageError
from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import CACHE_LENS, SEQ_LENS

from .cache import Cache
from .engine import EngineContents, read_engine
from .engine_files import read_engine_bytes
from .sampling import check_sampling, next_tokens

ORT = "onnxruntime"
REFERENCE = "onnx-reference"
_BRIDGE = "::bf16"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise UsageError("backend='onnx' needs the onnx package: pip install 'nemocompile[onnx]'") from None
    return onnx


def _with_external_data(model: Any, data: bytes, data_name: str, where: str) -> None:
    """Fill each externally stored initializer from `data` (the verified bytes of the data file)."""
    onnx = _onnx()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        fields = {entry.key: entry.value for entry in tensor.external_data}
        if fields.get("location") != data_name:
            raise EngineError(f"{where}: initializer {tensor.name} names external data "
                              f"{fields.get('location')!r}, not the engine's {data_name}")
        offset, length = int(fields.get("offset", "0")), int(fields.get("length", "-1"))
        if offset < 0 or length < 0 or offset + length > len(data):
            raise EngineError(f"{where}: initializer {tensor.name} lies outside {data_name}")
        tensor.raw_data = data[offset:offset + length]
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _bridge_bf16(model: Any) -> None:
    """bf16 graph inputs and outputs become float32 with a Cast inside the model (lossless)."""
    onnx = _onnx()
    graph = model.graph
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    casts = []
    for value in graph.input:
        if value.type.tensor_type.elem_type != bf16:
            continue
        inner = value.name + _BRIDGE
        for node in graph.node:
            node.input[:] = [inner if name == value.name else name for name in node.input]
        casts.append(onnx.helper.make_node("Cast", [value.name], [inner], to=bf16))
        value.type.tensor_type.elem_type = f32
    for value in graph.output:
        if value.type.tensor_type.elem_type != bf16:
            continue
        inner = value.name + _BRIDGE
        for node in graph.node:
            node.output[:] = [inner if name == value.name else name for name in node.output]
            node.input[:] = [inner if name == value.name else name for name in node.input]
        graph.node.append(onnx.helper.make_node("Cast", [inner], [value.name], to=f32))
        value.type.tensor_type.elem_type = f32
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def _needs_reference(model: Any) -> bool:
    onnx = _onnx()
    fp4 = onnx.TensorProto.FLOAT4E2M1
    return any(t.data_type == fp4 for t in model.graph.initializer) or any(
        attr.name == "output_dtype" and attr.i == fp4 for node in model.graph.node for attr in node.attribute)


class _Session:
    """One model, run by onnxruntime or ONNX's reference evaluator."""

    def __init__(self, model: Any) -> None:
        _bridge_bf16(model)
        self.runner = REFERENCE if _needs_reference(model) else ORT
        self.outputs = [value.name for value in model.graph.output]
        if self.runner == ORT:
            try:
                import onnxruntime
            except ImportError:
                raise UsageError("backend='onnx' needs onnxruntime: pip install 'nemocompile[onnx]'") from None
            self.session: Any = onnxruntime.InferenceSession(model.SerializeToString(),
                                                             providers=["CPUExecutionProvider"])
        else:
            from onnx.reference import ReferenceEvaluator

            self.session = ReferenceEvaluator(model)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.outputs, feeds) if self.runner == ORT else self.session.run(None, feeds)
        return dict(zip(self.outputs, results, strict=True))


def _load_model(contents: EngineContents, relative: str) -> Any:
    onnx = _onnx()
    files = contents.manifest.tensorrt
    assert files is not None
    directory, manifest = contents.directory, contents.manifest
    try:
        model = onnx.load_from_string(read_engine_bytes(directory, manifest, relative))
    except Exception as error:  # protobuf raises its own DecodeError
        raise EngineError(f"{directory / relative} is not an ONNX model ({type(error).__name__})") from None
    try:  # external data is named relative to the model's folder
        location = PurePosixPath(files.data).relative_to(PurePosixPath(relative).parent).as_posix()
    except ValueError:
        raise EngineError(f"{directory}: the ONNX data file {files.data} is not beside {relative}") from None
    _with_external_data(model, read_engine_bytes(directory, manifest, files.data), location, str(directory / relative))
    return model


class OnnxEngine:
    """The engine's decomposed ONNX export, run on the CPU with the engine's cache and tokenizer:
    `forward` and `generate` as `Engine` has them."""

    def __init__(self, contents: EngineContents) -> None:
        files = contents.manifest.tensorrt
        if files is None:
            raise EngineError(f"{contents.directory} holds no ONNX export; build it with "
                              f"`nemocompile build --tensorrt`")
        self.directory = contents.directory
        self.manifest = contents.manifest
        self.graph: Graph = contents.prefill
        self.decode_graph: Graph = contents.decode
        self.tokenizer = contents.tokenizer
        self.vocab_size = contents.model_config.vocab_size
        self.device = torch.device("cpu")
        self._prefill = _Session(_load_model(contents, files.prefill_decomposed))
        self._decode = _Session(_load_model(contents, files.decode_decomposed))

    @property
    def runners(self) -> tuple[str, str]:
        """What runs the prefill and the decode model (onnxruntime or the reference evaluator)."""
        return self._prefill.runner, self._decode.runner

    def new_cache(self, batch_size: int) -> Cache:
        return Cache.for_graph(self.graph, batch_size, self.device)

    def _ids(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.int64)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UsageError(f"input_ids must be a non-empty [batch, seq] array, got shape {list(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            raise UsageError(f"input_ids must lie in [0, {self.vocab_size}), got {low}..{high}")
        return ids.to(dtype=torch.int64, device="cpu")

    def forward(self, input_ids: torch.Tensor | Sequence[Sequence[int]], cache: Cache | None = None) -> torch.Tensor:
        """Logits [B, T, V] float32; with a cache, continues its sequences and updates it."""
        ids = self._ids(input_ids)
        if cache is None:
            cache = self.new_cache(ids.shape[0])
        if ids.shape[0] != cache.batch_size:
            raise UsageError(f"input_ids has batch {ids.shape[0]} but the cache holds {cache.batch_size}")
        decode = ids.shape[1] == 1 and cache.length > 0
        session, graph = (self._decode, self.decode_graph) if decode else (self._prefill, self.graph)
        cache.reserve(ids.shape[1])
        feeds = {graph.inputs[0].name: ids.numpy()}
        feeds.update({v.name: cache.lengths.numpy() for v in graph.inputs[1:] if v.name == CACHE_LENS})
        # every token of every row is real here (this backend takes no right padding)
        feeds.update({v.name: np.full(ids.shape[0], ids.shape[1], dtype=np.int64)
                      for v in graph.inputs[1:] if v.name == SEQ_LENS})
        feeds.update({slot.name: cache.tensors[slot.name].float().numpy() for slot in graph.states})
        results = session.run(feeds)
        for slot in graph.states:
            cache.tensors[slot.name] = torch.from_numpy(np.array(results[slot.update])).to(
                cache.tensors[slot.name].dtype)
        cache.advance(ids.shape[1])
        return torch.from_numpy(np.array(results[graph.outputs[0]], dtype=np.float32))

    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> torch.Tensor:
        """ids [B, T + max_new_tokens], decoding with the state outputs fed back as inputs."""
        check_sampling(temperature, top_p)
        ids = self._ids(input_ids)
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else torch.seed())
        cache = self.new_cache(ids.shape[0])
        tokens, step = [ids], ids
        for _ in range(max_new_tokens):
            step = next_tokens(self.forward(step, cache)[:, -1], temperature, top_p, generator)[:, None]
            tokens.append(step)
        return torch.cat(tokens, dim=1)


def load_onnx(path: str | Path) -> OnnxEngine:
    """The engine at `path` (every check `load` makes) with its decomposed ONNX export."""
    return OnnxEngine(read_engine(path))


def load_tensorrt(path: str | Path) -> OnnxEngine:
    """`load(path, backend="tensorrt")`: refused, saying why, until an engine holds a TensorRT plan
    this runtime can run (no plan is built without TensorRT and the plugins' implementations)."""
    contents = read_engine(path)
    files = contents.manifest.tensorrt
    if files is None:
        raise EngineError(f"{contents.directory} holds no ONNX export; build it with `nemocompile build --tensorrt`")
    if files.engine is None:
        raise EngineError(f"{contents.directory} holds no TensorRT engine: TensorRT was not installed when it was "
                          f"built (backend='onnx' runs its decomposed ONNX export)")
    raise EngineError(f"{contents.directory / files.engine}: running TensorRT engines is not implemented yet; "
                      f"backend='onnx' runs the decomposed ONNX export")
