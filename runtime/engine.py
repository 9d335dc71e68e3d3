"""Load and run an engine directory. Loading verifies every file's sha256 and the GPU arch
before anything runs; weights come from safetensors (nothing is unpickled)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nemocompile.base.errors import EngineError, NemocompileError, UsageError
from nemocompile.base.settings import settings
from nemocompile.graph.ir import Graph
from nemocompile.graph.text import parse_graph
from nemocompile.graph.verifier import verify

from .cache import Cache
from .engine_files import check_arch, verify_engine_files
from .engine_format import Manifest
from .executor import Executor
from .kernels import Resolution
from .sampling import check_sampling, next_tokens
from .tokenizer import ByteTokenizer
from .weights import WeightValue, load_weights


def _pick_device(device: str | torch.device | None) -> torch.device:
    choice = str(device) if device is not None else settings().device
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _load_graph(directory: Path, relative: str) -> Graph:
    try:
        return verify(parse_graph((directory / relative).read_text()))
    except NemocompileError as error:
        raise EngineError(f"{directory / relative}: {error}") from None


class Engine:
    """A loaded engine: `forward` for logits, `new_cache` + `forward` for token-by-token decode,
    `generate` for text."""

    def __init__(self, directory: Path, manifest: Manifest, prefill: Graph, decode: Graph,
                 weights: dict[str, WeightValue], device: torch.device, tokenizer: ByteTokenizer | None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.graph = prefill
        self.decode_graph = decode
        self.device = device
        self.tokenizer = tokenizer
        self.config: dict[str, Any] = json.loads((directory / manifest.config).read_text())
        self._prefill = Executor(prefill, weights)
        self._decode = Executor(decode, weights)
        self.vocab_size = int(self.config["vocab_size"])

    def new_cache(self, batch_size: int) -> Cache:
        return Cache.for_graph(self.graph, batch_size, self.device)

    def kernels(self) -> list[Resolution]:
        """How each op of the prefill graph and then the decode graph runs: the kernel its IR asks
        for, the one used, and why they differ when they do (a kernel that cannot run here)."""
        return [entry[0] for executor in (self._prefill, self._decode) for entry in executor.plan
                if isinstance(entry[0], Resolution)]

    def _ids(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.int64)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UsageError(f"input_ids must be a non-empty [batch, seq] array, got shape {list(ids.shape)}")
        if ids.device.type == "cpu":  # checked before moving to a GPU: no device sync per token
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise UsageError(f"input_ids must lie in [0, {self.vocab_size}), got {low}..{high}")
        return ids.to(device=self.device, dtype=torch.int64)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | Sequence[Sequence[int]], cache: Cache | None = None) -> torch.Tensor:
        """Logits [B, T, V] float32. With a cache, continues the sequences it holds and updates it."""
        ids = self._ids(input_ids)
        if cache is None:
            cache = self.new_cache(ids.shape[0])
        executor = self._decode if ids.shape[1] == 1 and cache.length > 0 else self._prefill
        return executor.run(ids, cache)["logits"]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """ids [B, T + new]: the prompt followed by up to max_new_tokens tokens. Stops early once every
        sequence has produced eos_token_id; finished sequences are padded with it."""
        check_sampling(temperature, top_p)
        if max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = self._ids(input_ids)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        cache = self.new_cache(ids.shape[0])
        tokens = [ids]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        step_input = ids
        for _ in range(max_new_tokens):
            logits = self.forward(step_input, cache)[:, -1]
            chosen = next_tokens(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                chosen = torch.where(finished, torch.full_like(chosen, eos_token_id), chosen)
                finished |= chosen == eos_token_id
            step_input = chosen[:, None]
            tokens.append(step_input)
            if eos_token_id is not None and bool(finished.all()):
                break
        return torch.cat(tokens, dim=1)


def load(path: str | Path, device: str | torch.device | None = None) -> Engine:
    """Load an engine directory written by `nemocompile build`."""
    directory = Path(path)
    if not directory.is_dir():
        raise EngineError(f"{directory} is not an engine directory")
    manifest = verify_engine_files(directory)
    target_device = _pick_device(device)
    check_arch(manifest, target_device)
    if manifest.world_size != 1:
        raise EngineError(f"{directory} holds {manifest.world_size} ranks; this runtime runs one-rank engines")
    prefill = _load_graph(directory, manifest.graphs.prefill)
    decode = _load_graph(directory, manifest.graphs.decode)
    weights = load_weights(directory, list(manifest.weight_files(0)), prefill, target_device)
    tokenizer = ByteTokenizer.load(directory / manifest.tokenizer) if manifest.tokenizer else None
    return Engine(directory, manifest, prefill, decode, weights, target_device, tokenizer)
