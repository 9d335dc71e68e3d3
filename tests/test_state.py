"""Explicit state: state slots are graph inputs read by `state` operands and bound to their updates;
the KV cache is preallocated, grows by doubling within the graph's ctx bound, and keeps a length
per sequence, so sequences of different lengths decode together exactly as they do alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nemocompile.api import load
from nemocompile.base.errors import UsageError
from nemocompile.cli import main
from nemocompile.graph.ir import DimBound, Graph
from nemocompile.graph.opdef import opdef
from nemocompile.graph.text import parse_graph, print_graph
from nemocompile.graph.types import F32
from nemocompile.graph.verifier import verify
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.runtime.cache import Cache, stack_caches
from nemocompile.runtime.executor import Executor
from nemocompile.runtime.reference import attention_gqa, attention_gqa_cached
from tests.test_passes import decomposed, random_weights, tiny_config

SIZES = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "scale": 8 ** -0.5}


def _qkv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, 32, generator=g), torch.randn(batch, length, 16, generator=g),
            torch.randn(batch, length, 16, generator=g))


def test_state_operands_and_results_are_declared_by_role() -> None:
    for name, states in [("causal_conv1d", ["conv_state"]), ("ssd_chunk_scan", ["ssm_state"]),
                         ("ssd_state_update", ["ssm_state"]), ("attention_gqa", ["k_cache", "v_cache"]),
                         ("mamba2_mixer", ["conv_state", "ssm_state"]), ("attention", ["k_cache", "v_cache"])]:
        definition = opdef(name)
        assert [definition.operand_names[i] for i in definition.indices_with_role("state")] == states
        assert len(definition.results) == 1 + len(states), name


def test_graph_binds_every_state_slot_to_its_update() -> None:
    graph = decomposed(tiny_config("M*EM-E"), F32)
    kinds = sorted(slot.kind for slot in graph.states)
    assert kinds == ["conv", "conv", "kv", "kv", "ssm", "ssm"]
    for slot in graph.states:
        producer = graph.producer(slot.update)
        assert producer is not None, slot.name
        assert slot.name in producer.operands  # the op that reads the state writes its update
        assert [op.opname for op in graph.users(slot.name)] == [producer.opname]
    assert parse_graph(print_graph(graph)) == graph


def test_cached_attention_with_equal_lengths_is_attention_gqa() -> None:
    q, k, v = _qkv(2, 5, 0)
    past_q, past_k, past_v = _qkv(2, 3, 1)
    _, k_all, v_all = attention_gqa(past_q, past_k, past_v, **SIZES, past_k=None, past_v=None)
    expected, _, _ = attention_gqa(q, k, v, **SIZES, past_k=k_all, past_v=v_all)
    k_cache = torch.zeros(2, 2, 16, 8)
    v_cache = torch.zeros(2, 2, 16, 8)
    lens = torch.zeros(2, dtype=torch.int64)
    attention_gqa_cached(past_q, past_k, past_v, k_cache, v_cache, lens, **SIZES)
    out, k_out, v_out = attention_gqa_cached(q, k, v, k_cache, v_cache, lens + 3, **SIZES)
    assert torch.equal(out, expected)
    assert k_out is k_cache and v_out is v_cache  # written in place
    assert torch.equal(k_cache[:, :, 3:8], k.reshape(2, 5, 2, 8).transpose(1, 2))
    assert not k_cache[:, :, 8:].any()


def test_cached_attention_keeps_a_length_per_sequence() -> None:
    lens = [2, 6]
    q, k, v = _qkv(2, 3, 2)
    k_cache = torch.randn(2, 2, 12, 8, generator=torch.Generator().manual_seed(3))
    v_cache = torch.randn(2, 2, 12, 8, generator=torch.Generator().manual_seed(4))
    alone = []
    for b, length in enumerate(lens):
        k_one, v_one = k_cache[b : b + 1].clone(), v_cache[b : b + 1].clone()
        out, _, _ = attention_gqa_cached(q[b : b + 1], k[b : b + 1], v[b : b + 1], k_one, v_one,
                                         torch.tensor([length]), **SIZES)
        # the same as attention over exactly this sequence's past
        expected, _, _ = attention_gqa(q[b : b + 1], k[b : b + 1], v[b : b + 1], **SIZES,
                                       past_k=k_cache[b : b + 1, :, :length], past_v=v_cache[b : b + 1, :, :length])
        assert torch.allclose(out, expected, atol=1e-6)
        alone.append(out)
    together, _, _ = attention_gqa_cached(q, k, v, k_cache, v_cache, torch.tensor(lens), **SIZES)
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)


def test_cache_grows_by_doubling_and_keeps_its_contents() -> None:
    graph = decomposed(tiny_config("M*EM-E"), F32)
    cache = Cache.for_graph(graph, 2, torch.device("cpu"))
    assert cache.capacity == 0 and cache.host_lengths == [0, 0]
    cache.reserve(5)
    assert cache.capacity == 16
    kv = next(slot.name for slot in graph.states if slot.kind == "kv")
    cache.tensors[kv][:, :, :5] = 1.0
    cache.advance(5)
    cache.reserve(20)
    assert cache.capacity == 32
    assert cache.tensors[kv].shape[2] == 32
    assert torch.equal(cache.tensors[kv][:, :, :5], torch.ones(2, 2, 5, 4))
    assert not cache.tensors[kv][:, :, 5:].any()


def test_cache_refuses_past_the_context_and_batch_bounds() -> None:
    graph = decomposed(tiny_config("M*EM-E"), F32)
    bounded = dataclasses.replace(graph, dims=tuple(DimBound(d.name, d.low, 8 if d.name in ("ctx", "batch") else d.high)
                                                   for d in graph.dims))
    verify(bounded)
    cache = Cache.for_graph(bounded, 2, torch.device("cpu"))
    cache.reserve(8)
    assert cache.capacity == 8  # growth stops at the bound
    with pytest.raises(UsageError, match="9 tokens exceed the engine's context bound of 8"):
        cache.reserve(9)
    with pytest.raises(UsageError, match="at most 8"):
        Cache.for_graph(bounded, 9, torch.device("cpu"))


def _generate_alone(prefill: Graph, decode: Graph, weights: dict[str, torch.Tensor], prompt: torch.Tensor,
                    steps: int) -> tuple[Cache, list[torch.Tensor]]:
    cache = Cache.for_graph(prefill, 1, torch.device("cpu"))
    Executor(prefill, weights).run(prompt[None], cache)
    return cache, [Executor(decode, weights).run(torch.tensor([[t]]), cache)["logits"] for t in range(steps)]


def test_sequences_of_different_lengths_decode_together_as_alone() -> None:
    prefill = decomposed(tiny_config("M*EM-E"), F32)
    decode = SpecializeDecode().apply(prefill).graph
    weights = random_weights(prefill)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 48, (3,), generator=g), torch.randint(0, 48, (9,), generator=g)]
    steps = 4
    caches, alone = [], []
    for prompt in prompts:
        cache, logits = _generate_alone(prefill, decode, weights, prompt, 0)
        caches.append(cache)
        alone.append(_generate_alone(prefill, decode, weights, prompt, steps)[1])
    together = stack_caches(caches)
    assert together.host_lengths == [3, 9] and together.lengths.tolist() == [3, 9]
    stepper = Executor(decode, weights)
    for t in range(steps):
        logits = stepper.run(torch.tensor([[t], [t]]), together)["logits"]
        for b in range(2):
            expected = alone[b][t][0]
            assert torch.allclose(logits[b], expected, atol=1e-5 * expected.abs().max().item()), (t, b)
    assert together.host_lengths == [3 + steps, 9 + steps]


# ---------------------------------------------------------------- run-time bounds as build options


@pytest.fixture(scope="module")
def bounded_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bounded") / "engine"
    result = CliRunner().invoke(main, ["build", "--target", "h100", "--precision", "fp32", "-o", str(out),
                                       "--max-context", "24", "--max-batch-size", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_bounds_are_written_into_both_graphs(bounded_engine: Path) -> None:
    for name in ("graph.txt", "graph.decode.txt"):
        graph = parse_graph((bounded_engine / name).read_text())
        assert graph.dim_bound("batch") == DimBound("batch", 1, 2)
        assert graph.dim_bound("ctx") == DimBound("ctx", 0, 24)
        assert graph.dim_bound("seq") == DimBound("seq", 1, 24)


def test_engine_runs_up_to_its_bounds_and_refuses_past_them(bounded_engine: Path) -> None:
    engine = load(bounded_engine)
    ids = engine.generate([[1] * 20, [2] * 20], max_new_tokens=4)
    assert ids.shape == (2, 24)
    with pytest.raises(UsageError, match="20 tokens plus 6 new ones make 26 tokens, which exceed the engine's "
                                         "context bound of 24"):
        engine.generate([[1] * 20], max_new_tokens=6)
    with pytest.raises(UsageError, match="25 tokens exceed the engine's context bound of 24"):
        engine.forward([[1] * 25])
    with pytest.raises(UsageError, match="at most 2, got 3"):
        engine.forward([[1], [2], [3]])
    result = CliRunner().invoke(main, ["run", str(bounded_engine), "--input-ids", ",".join(["1"] * 30)])
    assert result.exit_code != 0
    assert "30 tokens plus 16 new ones make 46 tokens, which exceed the engine's context bound of 24" in \
        result.output


@pytest.mark.parametrize("option", ["--max-context", "--max-batch-size"])
def test_bound_options_must_be_positive(option: str, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["build", "--target", "h100", "-o", str(out), option, "0"])
    assert result.exit_code == 2
    assert f"{option} must be an integer of at least 1, got 0" in result.output
    assert not out.exists()
    plan = CliRunner().invoke(main, ["plan", "/work/shared/models/nano.json", option, "-3"])
    assert plan.exit_code == 2 and option in plan.output
