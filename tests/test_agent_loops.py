"""Sequence state for agent loops: continuing a cache, forking a sequence, snapshots and prefix reuse
across requests all give the logits and greedy tokens of processing the whole sequence from scratch
(transformers' NemotronHForCausalLM is the oracle, fp32, chunk_size 4 so that every boundary below
falls inside a Mamba chunk); a snapshot is refused by any other engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import nemocompile
from nemocompile.base.errors import StateError, UsageError
from nemocompile.cli import main
from nemocompile.runtime.cache import SequenceState
from nemocompile.runtime.engine import Engine
from nemocompile.runtime.prefix import PrefixStore
from nemocompile.runtime.reference import ssd_chunk_scan
from tests.test_batching import CONFIG as BATCHING_CONFIG

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' NemotronHForCausalLM")

CONFIG: dict[str, Any] = {**BATCHING_CONFIG, "chunk_size": 4}
VOCAB = CONFIG["vocab_size"]
GREEDY = 16
TOLERANCE = 1e-5  # max |diff| relative to the largest logit (fp32; only the blocking differs)


def _model(seed: int) -> Any:
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG)).eval()
    g = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():  # non-trivial routing and Mamba parameters (the defaults are zeros and ones)
        for layer in model.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.weight.normal_(0, 0.3, generator=g)
            if hasattr(layer.mixer, "D"):
                layer.mixer.D.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Engine, Path]:
    root = tmp_path_factory.mktemp("agent")
    model = _model(7)
    model.save_pretrained(root / "checkpoint")
    nemocompile.build(root / "checkpoint", root / "engine", target="h100", precision="fp32", max_context=96)
    return model, nemocompile.load(root / "engine"), root


def _tokens(count: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def _transformers_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def _transformers_greedy(model: Any, tokens: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=GREEDY, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return list(out[0, len(tokens):].tolist())


class Widths:
    """Counts the tokens each call of the engine's step processes."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, int]] = []
        original = engine.step

        def counted(ids: torch.Tensor, cache: Any, seq_lens: Any = None) -> torch.Tensor:
            self.calls.append((ids.shape[0], ids.shape[1]))
            return original(ids, cache, seq_lens)
        monkeypatch.setattr(engine, "step", counted)


def test_ssd_scan_continues_from_its_state_inside_a_chunk() -> None:
    g = torch.Generator().manual_seed(1)
    length, heads, head_dim, groups, size = 19, 4, 3, 2, 5
    args = [torch.randn(1, length, heads * head_dim, generator=g), torch.randn(1, length, heads, generator=g),
            torch.randn(heads, generator=g), torch.randn(1, length, groups * size, generator=g),
            torch.randn(1, length, groups * size, generator=g), torch.randn(heads, generator=g),
            torch.randn(heads, generator=g)]
    sizes: dict[str, Any] = dict(num_heads=heads, head_dim=head_dim, n_groups=groups, state_size=size,
                                 chunk_size=4, dt_min=0.0, dt_max=float("inf"))
    whole, whole_state = ssd_chunk_scan(*args, initial_state=None, **sizes)
    state, pieces = None, []
    for start, end in ((0, 5), (5, 11), (11, 14), (14, 19)):  # none a multiple of the chunk size
        part = [a[:, start:end] if a.dim() == 3 else a for a in args]
        y, state = ssd_chunk_scan(*part, initial_state=state, **sizes)
        pieces.append(y)
    assert state is not None
    assert torch.allclose(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)
    assert torch.allclose(state, whole_state, rtol=1e-5, atol=1e-5)


def test_forward_in_pieces_gives_the_logits_of_the_whole_sequence(built: Any) -> None:
    model, engine, _ = built
    tokens = _tokens(23, 1)
    cache = engine.new_cache(1)
    pieces = [engine.forward([tokens[a:b]], cache)[0] for a, b in ((0, 5), (5, 14), (14, 15), (15, 23))]
    expected = _transformers_logits(model, tokens)
    assert _relative(torch.cat(pieces), expected) <= TOLERANCE
    assert cache.tokens(0) == tuple(tokens)


def test_generate_continues_a_cache_and_processes_only_the_new_tokens(built: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model, engine, _ = built
    turns = [_tokens(6, 2), _tokens(7, 3), _tokens(3, 4)]
    widths = Widths(engine, monkeypatch)
    cache = engine.new_cache(1)
    history: list[int] = []
    for number, turn in enumerate(turns):
        widths.calls.clear()
        budget = GREEDY if number == len(turns) - 1 else 5
        generated = engine.complete([turn], budget, cache=cache)[0]
        pending = [] if number == 0 else [history[-1]]
        assert widths.calls[0] == (1, len(pending) + len(turn))  # the pending last token and this turn's
        assert len(widths.calls) == budget  # then one token per step
        history += turn + generated
        assert cache.host_lengths == [len(history) - 1] and cache.pending == [[generated[-1]]]
        assert cache.tokens(0) == tuple(history[:-1])
    scratch = engine.complete([history[:-GREEDY]], GREEDY)[0]
    assert history[-GREEDY:] == scratch == _transformers_greedy(model, history[:-GREEDY])
    # generate with a cache takes [B, T] new tokens and returns them followed by the new ones
    out = engine.generate(torch.tensor([[7, 8]]), 3, cache=cache)
    assert out.shape == (1, 5) and cache.host_lengths == [len(history) + 2 + 2]


def test_continuing_needs_tokens_and_respects_the_context_bound(built: Any) -> None:
    _, engine, _ = built
    cache = engine.new_cache(1)
    with pytest.raises(UsageError, match="no pending token"):
        engine.complete([[]], 3, cache=cache)
    engine.forward([_tokens(80, 5)], cache)
    with pytest.raises(UsageError, match="80 cached tokens, 10 tokens plus 7 new ones make 97 tokens"):
        engine.complete([_tokens(10, 6)], 7, cache=cache)
    assert cache.host_lengths == [80]  # refused before anything ran
    with pytest.raises(UsageError, match="2 prompts were given to continue a cache of 1"):
        engine.complete([[5], [6]], 1, cache=cache)
    engine.complete([[5]], 2, cache=cache)
    with pytest.raises(UsageError, match=r"cache\.pending"):
        engine.forward([[5]], cache)
    assert engine.complete([[]], 2, cache=cache)  # the pending token alone lets it go on


def test_forks_diverge_independently_and_match_from_scratch(built: Any) -> None:
    model, engine, _ = built
    prompt = _tokens(9, 7)
    cache = engine.new_cache(1)
    first = engine.complete([prompt], 3, cache=cache)[0]
    before = {name: tensor.clone() for name, tensor in cache.tensors.items()}
    forks = cache.fork(0, copies=2)
    assert forks.batch_size == 2 and forks.host_lengths == [11, 11] and forks.pending == [[first[-1]]] * 2
    tool_a, tool_b = _tokens(5, 8), _tokens(10, 9)
    got = forks.fork(0), forks.fork(1)
    out_a = engine.complete([tool_a], GREEDY, cache=got[0])[0]
    out_b = engine.complete([tool_b], GREEDY, cache=got[1])[0]
    together = engine.complete([tool_a, tool_b], GREEDY, cache=forks)
    assert together == [out_a, out_b]
    for tool, out in ((tool_a, out_a), (tool_b, out_b)):
        assert out == _transformers_greedy(model, prompt + first + tool)
    probe = cache.fork(0)  # logits too: a fork continues with the logits of the whole sequence
    logits = engine.forward([[*probe.take_pending()[0], *tool_a]], probe)[0]
    assert _relative(logits, _transformers_logits(model, prompt + first + tool_a)[-len(tool_a) - 1:]) <= TOLERANCE
    assert all(torch.equal(cache.tensors[name], before[name]) for name in before)  # the original is untouched
    assert cache.host_lengths == [11]


def test_a_snapshot_loads_back_bit_for_bit(built: Any) -> None:
    model, engine, root = built
    prompt = _tokens(10, 10)
    cache = engine.new_cache(2)
    engine.complete([prompt, _tokens(4, 11)], 3, cache=cache)
    path = engine.save_state(cache, 0, root / "turn.safetensors")
    assert not list(root.glob(".*partial"))
    restored = engine.load_state(path)
    saved, loaded = cache.sequence_state(0), restored.sequence_state(0)
    assert loaded.length == saved.length == 12 and loaded.tokens == saved.tokens and loaded.pending == saved.pending
    for name, tensor in saved.tensors.items():
        assert tensor.dtype == loaded.tensors[name].dtype and torch.equal(tensor, loaded.tensors[name]), name
    # resuming from the snapshot computes exactly what continuing the original does
    step_original = engine.forward([[*cache.take_pending()[0], 9, 10]], cache.fork(0))
    step_restored = engine.forward([[*restored.take_pending()[0], 9, 10]], restored)
    assert torch.equal(step_original, step_restored)
    history = list(saved.tokens or ()) + list(saved.pending) + [9, 10]
    assert _relative(step_restored[0], _transformers_logits(model, history)[-3:]) <= TOLERANCE


def test_a_snapshot_is_refused_by_another_engine_and_when_malformed(built: Any) -> None:
    _, engine, root = built
    cache = engine.new_cache(1)
    engine.forward([_tokens(6, 12)], cache)
    path = engine.save_state(cache, 0, root / "other.safetensors")
    other_root = root / "other"
    _model(8).save_pretrained(other_root / "checkpoint")
    nemocompile.build(other_root / "checkpoint", other_root / "engine", target="h100", precision="fp32",
                      max_context=96)
    other = nemocompile.load(other_root / "engine")
    assert isinstance(other, Engine) and other.identity != engine.identity
    with pytest.raises(StateError, match=r"was saved by another engine .*only valid in the engine that computed it"):
        other.load_state(path)
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(StateError, match="is not a readable safetensors file"):
        engine.load_state(garbage)
    with pytest.raises(StateError, match="does not exist"):
        engine.load_state(root / "missing.safetensors")
    # the same model rebuilt (byte-identical but for report.md's times) takes it
    nemocompile.build(root / "checkpoint", root / "rebuilt", target="h100", precision="fp32", max_context=96)
    rebuilt = nemocompile.load(root / "rebuilt")
    assert isinstance(rebuilt, Engine)
    assert rebuilt.load_state(path).host_lengths == [6]
    result = CliRunner().invoke(main, ["run", str(other_root / "engine"), "--load-state", str(path),
                                       "--input-ids", "5,6"])
    assert result.exit_code == 1 and "saved by another engine" in result.output


def test_a_request_resumes_from_the_longest_kept_prefix(built: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model, engine, _ = built
    store = engine.enable_prefix_reuse(max_bytes=1 << 24, keep_every=5)
    try:
        widths = Widths(engine, monkeypatch)
        prompt = _tokens(13, 13)
        first = engine.complete([prompt], 4)[0]
        assert [w for _, w in widths.calls[:3]] == [5, 5, 3]  # pieces ending at the kept boundaries 5 and 10
        assert store.lengths() == [5, 10, 16]  # and the end of the request (its last token is not in the state)
        kept = store.longest([*prompt[:10], 3])
        assert kept is not None and kept.length == 10
        scratch = engine.new_cache(1)
        engine.forward([prompt[:10]], scratch)
        for name, tensor in scratch.sequence_state(0).tensors.items():  # the state a recomputation reaches
            assert tensor.shape == kept.tensors[name].shape
            assert torch.allclose(kept.tensors[name], tensor, rtol=1e-5, atol=1e-6), name
        store.stats.hits, store.stats.reused_tokens = 0, 0
        # the next turn of the conversation resumes at the end of the first
        follow = prompt + first + _tokens(6, 14)
        widths.calls.clear()
        second = engine.complete([follow], GREEDY)[0]
        assert widths.calls[0] == (1, 4) and widths.calls[1] == (1, 3)  # 16..20 then 20..23: 7 new tokens
        assert store.stats.hits == 1 and store.stats.reused_tokens == 16
        assert second == _transformers_greedy(model, follow)
        # a request that shares only the first 12 tokens resumes at the boundary 10 (a Mamba state cannot be
        # rewound to 12), inside a chunk of 4
        branch = prompt[:12] + _tokens(5, 15)
        widths.calls.clear()
        third = engine.complete([branch], GREEDY)[0]
        assert widths.calls[0] == (1, 5) and store.stats.reused_tokens == 16 + 10
        assert third == _transformers_greedy(model, branch)
        # a batch: one sequence found, one not
        fresh = _tokens(8, 16)
        both = engine.complete([follow, fresh], GREEDY)
        assert both == [second, _transformers_greedy(model, fresh)]
    finally:
        engine.disable_prefix_reuse()


def _state(tokens: tuple[int, ...], size: int) -> SequenceState:
    return SequenceState({"s": torch.zeros(size, dtype=torch.uint8)}, len(tokens), tokens)


def test_prefix_store_is_bounded_and_evicts_the_least_recently_used() -> None:
    store = PrefixStore(max_bytes=250)
    assert store.keep(_state((1, 2), 100)) and store.keep(_state((1, 2, 3), 100))
    assert store.longest([1, 2, 9]) is not None  # (1, 2) is now the most recently used
    assert store.keep(_state((4, 5), 100))  # evicts (1, 2, 3)
    assert store.lengths() == [2, 2] and store.nbytes == 200 and store.stats.evicted == 1
    found = store.longest([1, 2, 3, 4])
    assert found is not None and found.tokens == (1, 2)
    assert store.longest([1, 2]) is None  # a whole prompt is never a proper prefix of itself
    assert not store.keep(_state((7,), 300))  # larger than the bound: not kept
    assert not store.keep(SequenceState({}, 3, None))  # tokens unknown: cannot be found again
    with pytest.raises(UsageError, match="keep_every"):
        PrefixStore(10, keep_every=0)


def test_run_feeds_successive_turns_and_saves_the_state(built: Any) -> None:
    _, engine, root = built
    turns = root / "turns.txt"
    turn_ids = [_tokens(4, 17), _tokens(6, 18)]
    turns.write_text("\n".join(",".join(map(str, t)) for t in turn_ids) + "\n")
    state = root / "cli.safetensors"
    result = CliRunner().invoke(main, ["run", str(root / "engine"), "--turns", str(turns), "--max-new-tokens", "3",
                                       "--save-state", str(state), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [t["processed_tokens"] for t in report["turns"]] == [4, 1 + 6]
    cache = engine.new_cache(1)
    expected = [engine.complete([t], 3, cache=cache)[0] for t in turn_ids]
    assert [t["generated_ids"] for t in report["turns"]] == expected
    again = CliRunner().invoke(main, ["run", str(root / "engine"), "--load-state", str(state), "--input-ids", "5,6",
                                      "--max-new-tokens", "4", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["generated_ids"] == [engine.complete([[5, 6]], 4, cache=cache)[0]]
