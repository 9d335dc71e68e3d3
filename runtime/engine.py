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
from nemocompile.engine_files import verify_engine_files
from nemocompile.graph.ir import Graph
from nemocompile.graph.text import parse_graph
from nemocompile.graph.verifier import verify
from nemocompile.tokenizer import ByteTokenizer

from .cache import Cache
from .executor import Executor
from .sampling import check_sampling, next_tokens
from .weights import WeightValue, load_weights

SUPPORTED_FORMAT_VERSIONS = (1,)


def _pick_device(device: str | torch.device | None) -> torch.device:
    choice = str(device) if device is not None else settings().device
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _check_arch(manifest: dict[str, Any], device: torch.device) -> None:
    if device.type != "cuda":
        return  # the reference runtime runs any engine on the CPU
    wanted = tuple(manifest["target"]["compute_capability"])
    found = torch.cuda.get_device_capability(device)
    if found[0] != wanted[0]:
        raise EngineError(f"engine was built for {manifest['target']['name']} ({manifest['target']['arch']}) "
                          f"but this GPU is sm_{found[0]}{found[1]}; rebuild with the matching --target")


def _load_graph(directory: Path, relative: str) -> Graph:
    try:
        return verify(parse_graph((directory / relative).read_text()))
    except NemocompileError as error:
        raise EngineError(f"{directory / relative}: {error}") from None


class Engine:
    """A loaded engine: `forward` for logits, `new_cache` + `forward` for token-by-token decode,
    `generate` for text."""

    def __init__(self, directory: Path, manifest: dict[str, Any], prefill: Graph, decode: Graph,
                 weights: dict[str, WeightValue], device: torch.device, tokenizer: ByteTokenizer | None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.graph = prefill
        self.decode_graph = decode
        self.device = device
        self.tokenizer = tokenizer
        self.config: dict[str, Any] = json.loads((directory / "config.json").read_text())
        self._prefill = Executor(prefill, weights)
        self._decode = Executor(decode, weights)
        self.vocab_size = int(self.config["vocab_size"])

    def new_cache(self, batch_size: int) -> Cache:
        return Cache.for_slots(self.graph.states, batch_size, self.device)

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
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise EngineError(f"{directory / 'manifest.json'}: engine format {manifest.get('format_version')!r} "
                          f"is not one this nemocompile reads ({SUPPORTED_FORMAT_VERSIONS})")
    target_device = _pick_device(device)
    _check_arch(manifest, target_device)
    prefill = _load_graph(directory, manifest["graphs"]["prefill"])
    decode = _load_graph(directory, manifest["graphs"]["decode"])
    weights = load_weights(directory, manifest["weights"], prefill, target_device)
    tokenizer = ByteTokenizer.load(directory / manifest["tokenizer"]) if manifest.get("tokenizer") else None
    return Engine(directory, manifest, prefill, decode, weights, target_device, tokenizer)
