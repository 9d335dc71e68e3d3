"""Load and run an engine directory. Loading verifies every file's sha256 and the GPU arch
before anything runs, reads only files the manifest hashes (never through a symbolic link), and
checks the graphs against the engine's config.json and the weight files' headers before anything
is allocated; weights come from safetensors (nothing is unpickled)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemocompile.base.errors import EngineError, NemocompileError, UsageError
from nemocompile.base.settings import settings
from nemocompile.graph.config import ModelConfig, config_from_dict
from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import INPUT_SCALE_CATEGORY, KV_SCALES, build_block_graph
from nemocompile.graph.sharding import COUNT_ATTRS, local_count, rank_view
from nemocompile.graph.text import parse_graph
from nemocompile.graph.types import F32
from nemocompile.graph.verifier import verify

from .cache import Cache, SequenceState
from .cpu_gemm import PackedLinear
from .distributed import join
from .engine_files import check_arch, read_engine_text, read_manifest, verify_engine_files
from .engine_format import Manifest
from .executor import Executor, Resolver
from .generation import Request, StepTokens, collect, make_requests
from .generation import stream as generation_stream
from .kernels import Resolution, resolve
from .kernels.triton_backend import load_triton_backend, reference_only, triton_available
from .kernels.triton_loader import INDEX
from .prefix import PrefixStore
from .snapshot import engine_identity, read_snapshot, save_snapshot
from .tokenizer import ByteTokenizer
from .weights import WeightValue, check_weight_files, load_weights

MTP_CATEGORY = "mtp"  # multi-token-prediction weights: carried and counted, not executed


def _pick_device(device: str | torch.device | None) -> torch.device:
    choice = str(device) if device is not None else settings().device
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _read_graph(directory: Path, manifest: Manifest, relative: str, check: bool) -> Graph:
    text = read_engine_text(directory, manifest, relative, verify=check)
    try:
        graph = parse_graph(text)
        return verify(graph) if check else graph
    except NemocompileError as error:
        raise EngineError(f"{directory / relative}: {error}") from None
    except RecursionError:
        raise EngineError(f"{directory / relative}: the graph is nested too deeply to read") from None


def _read_config(directory: Path, manifest: Manifest) -> tuple[dict[str, Any], ModelConfig]:
    path = directory / manifest.config
    try:
        raw = json.loads(read_engine_text(directory, manifest, manifest.config))
    except (ValueError, RecursionError):
        raise EngineError(f"{path} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise EngineError(f"{path} must hold a JSON object")
    try:
        return raw, config_from_dict(raw, str(path))
    except NemocompileError as error:
        raise EngineError(str(error)) from None


def _shapes(graph: Graph) -> list[tuple[str, tuple[int | str, ...]]]:
    return [(slot.name, slot.type.shape) for slot in graph.states]


def check_against_config(directory: Path, config: ModelConfig, prefill: Graph, decode: Graph) -> None:
    """Refuse graphs that are not the model config.json describes: the layer pattern, every state
    slot (name and shape) and every weight's shape must be those the config implies, so no size in
    a graph can exceed what the config and weights hold. Run before anything is allocated."""
    where = f"{directory}: the graph does not match the engine's config.json"
    for graph, name in ((prefill, "prefill"), (decode, "decode")):
        if graph.meta("pattern") != config.pattern:
            raise EngineError(f"{where}: the {name} graph's layer pattern is {graph.meta('pattern')!r}, the "
                              f"config's {config.pattern!r}")
    engine_weights = {w.name: w for w in prefill.weights}
    if {w.name: w.type for w in decode.weights} != {w.name: w.type for w in prefill.weights}:
        raise EngineError(f"{where}: the prefill and decode graphs hold different weights")
    try:
        expected = build_block_graph(config, F32, lm_head="lm_head" in engine_weights)
    except NemocompileError:
        raise EngineError(f"{where}: its graph cannot be built from it") from None
    for graph, name in ((prefill, "prefill"), (decode, "decode")):
        if _shapes(graph) != _shapes(expected):
            got = {n: s for n, s in _shapes(graph)}
            for slot, shape in _shapes(expected):
                if got.get(slot) != shape:
                    raise EngineError(f"{where}: state {slot} of the {name} graph is "
                                      f"{list(got[slot]) if slot in got else 'missing'}, the config implies "
                                      f"{list(shape)}")
            raise EngineError(f"{where}: the {name} graph has state slots the config does not imply")
    _check_attributes(where, expected, prefill, decode)
    wanted = {w.name: w.type.shape for w in expected.weights}
    for name, shape in wanted.items():
        weight = engine_weights.get(name)
        if weight is None:
            raise EngineError(f"{where}: weight {name} is missing from the graph")
        if weight.type.shape != shape:
            raise EngineError(f"{where}: weight {name} is {list(weight.type.shape)}, the config implies {list(shape)}")
    for name, weight in engine_weights.items():
        if name in wanted or weight.category == MTP_CATEGORY:
            continue
        scope, _, last = name.rpartition(".")
        if (weight.category == INPUT_SCALE_CATEGORY and last in KV_SCALES and f"{scope}.k_proj" in wanted
                and weight.type.shape == ()):
            continue  # an FP8 KV cache's scale
        scaled = name.removesuffix(".input_scale")
        experts = wanted.get(scaled, ())
        if (weight.category == INPUT_SCALE_CATEGORY and scaled in wanted
                and weight.type.shape in ((), tuple(experts[:1]) if len(experts) == 3 else ())):
            continue
        raise EngineError(f"{where}: weight {name} is not a weight of the model it describes")


def _check_attributes(where: str, expected: Graph, prefill: Graph, decode: Graph) -> None:
    """Every attribute an engine op shares with the block op of its scope (chunk_size, num_heads,
    state_size, eps, ...) must hold the config's value: passes carry them down unchanged, and the
    reference ops size their work by them (a chunk_size of 4,000,000 would allocate gigabytes)."""
    by_scope: dict[str, dict[str, object]] = {}
    for op in expected.ops:
        by_scope.setdefault(op.scope, {}).update(op.attrs.items)
    for graph, name in ((prefill, "prefill"), (decode, "decode")):
        tp_text = graph.meta("tp") or "1"
        tp = int(tp_text) if tp_text.isdigit() else 1
        for op in graph.ops:
            wanted = by_scope.get(op.scope, {})
            for key, value in op.attrs.items:
                if key in COUNT_ATTRS and key in wanted and tp > 1:  # a sharded engine's ops hold a rank's heads
                    wanted = {**wanted, key: local_count(key, int(wanted[key]), tp)}  # type: ignore[call-overload]
                if key != "kernel" and key in wanted and wanted[key] != value:
                    raise EngineError(f"{where}: {op.opname} in {op.scope} of the {name} graph has {key} = "
                                      f"{value!r}, the config implies {wanted[key]!r}")


@dataclass(frozen=True)
class EngineContents:
    """What an engine directory holds, read and checked: the manifest, both graphs, config.json
    (raw and typed) and the tokenizer. The weights are checked (headers) but not loaded."""

    directory: Path
    manifest: Manifest
    prefill: Graph
    decode: Graph
    config: dict[str, Any]
    model_config: ModelConfig
    tokenizer: ByteTokenizer | None


def _engine_directory(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise EngineError(f"{directory} is not an engine directory")
    return directory


def read_engine_unverified(path: str | Path) -> tuple[Manifest, Graph]:
    """The manifest (typed) and the prefill graph (parsed) of the engine at `path`, no hash or
    consistency checked: for forensics (`inspect --no-verify`) on an engine `load` refuses. Still no
    symbolic link is followed and no path outside the engine is read."""
    directory = _engine_directory(path)
    manifest = read_manifest(directory)
    return manifest, _read_graph(directory, manifest, manifest.graphs.prefill, check=False)


def read_engine(path: str | Path) -> EngineContents:
    """Read the engine at `path` with every check `load` makes, short of loading the weights (and of
    the GPU arch, which depends on where it runs): hashes, graphs, config.json, the graphs against
    the config, the weight files' headers against the graphs, and the tokenizer."""
    directory = _engine_directory(path)
    manifest = verify_engine_files(directory)
    prefill = _read_graph(directory, manifest, manifest.graphs.prefill, check=True)
    decode = _read_graph(directory, manifest, manifest.graphs.decode, check=True)
    raw, config = _read_config(directory, manifest)
    check_against_config(directory, config, prefill, decode)
    if (prefill.meta("world_size") or "1") != str(manifest.world_size):
        raise EngineError(f"{directory}: the graph is sharded for {prefill.meta('world_size')} ranks but the manifest "
                          f"lists {manifest.world_size}")
    for rank in range(manifest.world_size):
        check_weight_files(directory, list(manifest.weight_files(rank)), rank_view(prefill))
    tokenizer = None
    if manifest.tokenizer is not None:
        tokenizer = ByteTokenizer.parse(read_engine_text(directory, manifest, manifest.tokenizer),
                                        str(directory / manifest.tokenizer), config.vocab_size)
    return EngineContents(directory, manifest, prefill, decode, raw, config, tokenizer)


class Engine:
    """A loaded engine: `forward` for logits, `new_cache` + `forward` for token-by-token decode,
    `generate` for text. `generate`, `stream` and `complete` continue a cache when given one (a
    conversation: each turn costs only its own tokens); `enable_prefix_reuse` keeps sequence states
    so that requests sharing a prefix with earlier ones resume from it."""

    def __init__(self, contents: EngineContents, weights: dict[str, WeightValue], device: torch.device,
                 backend: str | None = None, compile: bool | None = None) -> None:
        """compile: run the decode step's traceable ops compiled by torch.compile (CPU only;
        runtime/compiled_step.py): each batch size compiles on its first decode step, then decodes
        2-3x faster in float32 (bf16 about 1.25x; quantized GEMMs stay eager). None: the
        `cpu_compile_decode` setting. backend: "triton" (the ops bound to the engine's Triton kernels
        run them: compiled binaries on CUDA, the interpreter on a CPU; the others as the kernel registry says), "reference" (every
        op by its reference implementation), or None: the kernel registry resolves every op (a kernel
        registered in this runtime for the device, else the reference implementation)."""
        self.directory = contents.directory
        self.manifest = contents.manifest
        self.graph = contents.prefill
        self.decode_graph = contents.decode
        self.device = device
        self.tokenizer = contents.tokenizer
        self.config = contents.config
        self.backend = backend or "reference"
        prefill_resolver: Resolver
        decode_resolver: Resolver
        if backend == "triton":
            triton = load_triton_backend(contents.directory, contents.manifest, device)
            prefill_resolver, decode_resolver = triton.resolver("prefill"), triton.resolver("decode")
        elif backend == "reference":
            prefill_resolver = decode_resolver = reference_only
        else:
            prefill_resolver = decode_resolver = resolve
        prepared: dict[str, WeightValue] = {}  # each weight prepared once, for both graphs
        weights = dict(weights)
        compiled = settings().cpu_compile_decode if compile is None else compile
        if compiled and device.type != "cpu":
            raise UsageError(f"compile=True compiles the decode step for the CPU reference runtime, not for {device}")
        self.compiled = compiled
        self._prefill = Executor(contents.prefill, weights, resolver=prefill_resolver, prepared=prepared,
                                 dense_weights=compiled)
        self._decode = Executor(contents.decode, weights, resolver=decode_resolver, prepared=prepared,
                                compile=compiled, dense_weights=compiled)
        weights.update((name, value) for name, value in prepared.items() if isinstance(value, PackedLinear))
        # (a packed weight is the only copy held: the dense one is dropped)
        self.vocab_size = contents.model_config.vocab_size
        self.prefix_store: PrefixStore | None = None

    def new_cache(self, batch_size: int) -> Cache:
        return Cache.for_graph(self.graph, batch_size, self.device)

    def cache_from_states(self, states: Sequence[SequenceState | None]) -> Cache:
        """A cache whose sequence b starts from states[b] (a `Cache.sequence_state`, a snapshot's or a
        kept prefix's; None: a fresh sequence)."""
        template = self.new_cache(1)  # the slots and the context bound, exactly as new caches get them
        return Cache.from_states(template.slots, states, template.max_context, self.device)

    def enable_prefix_reuse(self, max_bytes: int, keep_every: int | None = None) -> PrefixStore:
        """Keep sequence states (at most `max_bytes` of them, least recently used dropped first) at the
        end of every request and, with `keep_every=N`, every N prompt tokens; a later request without
        a cache resumes from the longest kept prefix of its prompt (runtime/prefix.py). Replaces any
        store this engine had; returns the new one."""
        self.prefix_store = PrefixStore(max_bytes, keep_every)
        return self.prefix_store

    def disable_prefix_reuse(self) -> None:
        self.prefix_store = None

    @property
    def identity(self) -> str:
        """What a snapshot is tied to: a hash of this engine's files (runtime/snapshot.py)."""
        return engine_identity(self.manifest)

    def save_state(self, cache: Cache, seq: int, path: str | Path) -> Path:
        """Save sequence `seq` of `cache` (its state, token ids and pending token) to a safetensors file
        that only this engine will load."""
        return save_snapshot(path, cache.sequence_state(seq), self.identity)

    def load_state(self, *paths: str | Path) -> Cache:
        """A cache of one sequence per snapshot in `paths`, each exactly as saved; a snapshot saved by
        another engine, or malformed, is refused in one sentence (StateError)."""
        if not paths:
            raise UsageError("load_state needs at least one snapshot")
        template = self.new_cache(1)
        states = [read_snapshot(path, template, self.identity, self.vocab_size) for path in paths]
        return Cache.from_states(template.slots, states, template.max_context, self.device)

    def kernels(self) -> list[Resolution]:
        """How each op of the prefill graph and then the decode graph runs: the kernel its IR asks
        for, the one used, and why they differ when they do (a kernel that cannot run here)."""
        return [entry[0] for executor in (self._prefill, self._decode) for entry in executor.plan
                if isinstance(entry[0], Resolution)]

    def _ids(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        try:
            ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.int64)
        except (ValueError, TypeError):
            raise UsageError("input_ids must be a [batch, seq] array of integers (prompts of different lengths: "
                             "use complete or stream)") from None
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise UsageError(f"input_ids must be a non-empty [batch, seq] array, got shape {list(ids.shape)}")
        if ids.device.type == "cpu":  # checked before moving to a GPU: no device sync per token
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise UsageError(f"input_ids must lie in [0, {self.vocab_size}), got {low}..{high}")
        return ids.to(device=self.device, dtype=torch.int64)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | Sequence[Sequence[int]], cache: Cache | None = None,
                seq_lens: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, T, V] float32. With a cache, continues the sequences it holds and updates it.
        With seq_lens, row b holds seq_lens[b] real tokens followed by right padding: the cache takes
        only the real ones, and logits[b, seq_lens[b] - 1] is its last real token's. A cache that
        generation left with pending tokens (`cache.pending`: generated, not yet processed) is refused:
        continue it with generate/stream/complete, or take them (`cache.take_pending()`) and put them
        in front of input_ids."""
        on_host = not isinstance(input_ids, torch.Tensor) or input_ids.device.type == "cpu"
        ids = self._ids(input_ids)
        if cache is None:
            cache = self.new_cache(ids.shape[0])
        elif any(cache.pending):
            raise UsageError("the cache holds generated tokens not yet processed (cache.pending); continue it with "
                             "generate, stream or complete, or take them with cache.take_pending() and pass them "
                             "first")
        logits = self.step(ids, cache, seq_lens)
        if on_host:  # the ids the state now holds (known without a device sync)
            for row, tokens in enumerate(torch.as_tensor(input_ids).tolist()):
                cache.record(row, tokens if seq_lens is None else tokens[:seq_lens[row]])
        return logits

    def check_requests(self, requests: Sequence[Request], context: Sequence[int] | None = None) -> None:
        """Refuse, before anything runs, a batch past the engine's bounds: too many sequences, a
        token id outside the vocabulary, or a prompt whose tokens plus its new ones (plus the
        context[b] tokens sequence b already holds, when continuing a cache) exceed the context
        bound."""
        bound = self.graph.dim_bound("batch")
        if bound is not None and len(requests) > bound.high:
            raise UsageError(f"batch size must be at most {bound.high}, got {len(requests)}")
        ctx = self.graph.dim_bound("ctx")
        for index, request in enumerate(requests):
            low, high = min(request.prompt), max(request.prompt)
            if low < 0 or high >= self.vocab_size:
                raise UsageError(f"prompt {index}: token ids must lie in [0, {self.vocab_size}), got {low}..{high}")
            held = 0 if context is None else context[index]
            total = held + len(request.prompt) + request.max_new_tokens
            if ctx is not None and total > ctx.high:
                past = f"{held} cached tokens, " if held else ""
                raise UsageError(f"prompt {index}: {past}{len(request.prompt)} tokens plus {request.max_new_tokens} "
                                 f"new ones make {total} tokens, which exceed the engine's context bound of {ctx.high}")
        if len({len(r.prompt) for r in requests}) > 1 and not self._prefill.takes_seq_lens:
            raise UsageError(f"engine {self.directory} was built before prompts of different lengths could share "
                             f"a batch; rebuild it")

    def step(self, ids: torch.Tensor, cache: Cache, seq_lens: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, T, V] of ids [B, T] (checked by the caller) continuing `cache`; with seq_lens,
        sequence b's first seq_lens[b] tokens are real and the rest right padding."""
        executor = self._decode if ids.shape[1] == 1 and cache.length > 0 else self._prefill
        return executor.run(ids, cache, seq_lens)["logits"]

    def stream(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int | Sequence[int],
               temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
               stop_token_ids: Iterable[int] | Sequence[Iterable[int]] | None = None,
               cache: Cache | None = None) -> Iterator[StepTokens]:
        """Yield each step's new token per sequence as it is chosen (see generation.make_requests for
        the per-sequence arguments). Prompts may differ in length. Everything is checked first.

        cache: continue its sequences instead of starting new ones: prompts[b] holds only the new
        tokens of sequence b (may be empty when the cache holds a pending token, e.g. to let the
        model go on), processed after the tokens its state already holds and its pending last
        generated token; the cache is updated in place and can be continued again."""
        rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
        if cache is not None:
            if len(rows) != cache.batch_size:
                raise UsageError(f"{len(rows)} prompts were given to continue a cache of {cache.batch_size} "
                                 f"sequences")
            for row, new in enumerate(rows):
                if not new and not cache.pending[row]:
                    raise UsageError(f"prompt {row} is empty and its sequence has no pending token to go on from")
            rows = [list(cache.pending[row]) + new for row, new in enumerate(rows)]
        requests = make_requests(rows, max_new_tokens, stop_token_ids, seed)
        steps = generation_stream(self, requests, temperature, top_p, cache, None if cache is not None
                                  else self.prefix_store)
        return _inference(steps)

    def complete(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int | Sequence[int],
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
                 stop_token_ids: Iterable[int] | Sequence[Iterable[int]] | None = None,
                 cache: Cache | None = None) -> list[list[int]]:
        """The new tokens of each prompt (without the prompt; a stop token is kept): `stream`, collected."""
        count = len(prompts)
        return collect(self.stream(prompts, max_new_tokens, temperature, top_p, seed, stop_token_ids, cache), count)

    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None, cache: Cache | None = None) -> torch.Tensor:
        """ids [B, T + new]: prompts of equal length followed by up to max_new_tokens tokens. Stops
        early once every sequence has produced eos_token_id; finished sequences are padded with it.
        Prompts of different lengths: `complete` or `stream`. With a cache, input_ids are new tokens
        appended to its sequences (see `stream`)."""
        ids = self._ids(input_ids).cpu()
        stops = None if eos_token_id is None else [eos_token_id]
        new = self.complete(ids, max_new_tokens, temperature, top_p, seed, stops, cache)
        width = max(map(len, new))
        pad = eos_token_id if eos_token_id is not None else 0
        rows = [row + [pad] * (width - len(row)) for row in new]
        return torch.cat([ids, torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)], dim=1)


def _inference(steps: Iterator[StepTokens]) -> Iterator[StepTokens]:
    """`steps`, each computed without autograd (a generator runs outside the caller's context)."""
    while True:
        with torch.inference_mode():
            step = next(steps, None)
        if step is None:
            return
        yield step


BACKENDS = ("triton", "reference")


def pick_backend(backend: str | None, manifest: Manifest, device: torch.device) -> str:
    """The backend an engine runs with: the one asked for, else triton where the engine has Triton
    kernels, the device is a GPU and triton is installed, else reference."""
    if backend is not None:
        if backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        return backend
    has_kernels = INDEX in manifest.files
    return "triton" if has_kernels and device.type == "cuda" and triton_available() else "reference"


def load(path: str | Path, device: str | torch.device | None = None, backend: str | None = None,
         compile: bool | None = None) -> Engine:
    """Load an engine directory written by `nemocompile build`: every check of `read_engine`, then
    the GPU arch, then the weights; `backend` as `pick_backend` says; `compile` as Engine's."""
    contents = read_engine(path)
    manifest = contents.manifest
    target_device = _pick_device(device)
    check_arch(manifest, target_device)
    # a sharded engine: this process is one of its ranks (started by `run --world-size` or torchrun)
    rank = join(manifest.world_size, target_device, settings().distributed_timeout_s)
    if target_device.type == "cuda" and manifest.world_size > 1:
        target_device = torch.device("cuda", rank.local_rank)
    contents = dataclasses.replace(contents, prefill=rank_view(contents.prefill), decode=rank_view(contents.decode))
    chosen = pick_backend(backend, manifest, target_device)
    weights = load_weights(contents.directory, list(manifest.weight_files(rank.rank)), contents.prefill,
                           target_device)
    # by default (no triton) the kernel registry resolves each op; an explicit "reference" forces reference ops
    return Engine(contents, weights, target_device, chosen if backend is not None or chosen == "triton" else None,
                  compile)
