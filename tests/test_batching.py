"""Generation that serves real batches: prompts of different lengths in one right-padded batch give,
for each sequence, exactly the tokens it gives alone and the tokens transformers' model gives it;
padding never reaches the conv or SSM state; stop tokens and token budgets per sequence; seeded
sampling that reproduces; a streaming iterator; a batch past the context bound refused before any
step runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import nemocompile
from nemocompile.base.errors import UsageError
from nemocompile.cli import main
from nemocompile.runtime.engine import Engine
from nemocompile.runtime.reference import causal_conv1d, ssd_chunk_scan, ssd_state_update

transformers = pytest.importorskip("transformers", reason="the oracle is transformers' NemotronHForCausalLM")

CONFIG: dict[str, Any] = dict(
    vocab_size=101, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
    intermediate_size=80, mamba_num_heads=6, mamba_head_dim=8, n_groups=3, ssm_state_size=8, chunk_size=8,
    conv_kernel=4, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=40, eos_token_id=2, hybrid_override_pattern="M*EM-E", moe_latent_size=24,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, dtype="float32",
)
LENGTHS = (3, 13, 1, 9, 17)  # 13 and 17 cross the chunk size 8; 1 is a prompt of one token
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_and_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Engine, Path]:
    torch.manual_seed(7)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG)).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # non-trivial routing and Mamba parameters (the defaults are zeros and ones)
        for layer in model.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.weight.normal_(0, 0.3, generator=g)
                layer.mixer.gate.e_score_correction_bias.normal_(0, 0.05, generator=g)
            if hasattr(layer.mixer, "D"):
                layer.mixer.D.uniform_(0.5, 1.5, generator=g)
    root = tmp_path_factory.mktemp("batching")
    model.save_pretrained(root / "checkpoint")
    nemocompile.build(root / "checkpoint", root / "engine", target="h100", precision="fp32", max_context=64)
    return model, nemocompile.load(root / "engine"), root / "engine"


def _prompts(seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in LENGTHS]


def test_mixed_lengths_give_each_sequence_its_tokens_alone_and_transformers_tokens(model_and_engine: Any) -> None:
    model, engine, _ = model_and_engine
    prompts = _prompts()
    together = engine.complete(prompts, NEW_TOKENS)
    for prompt, got in zip(prompts, together, strict=True):
        alone = engine.complete([prompt], NEW_TOKENS)[0]
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == alone == expected, (len(prompt), got, alone, expected)


def test_padded_prefill_logits_match_each_sequence_alone(model_and_engine: Any) -> None:
    model, engine, _ = model_and_engine
    prompts = _prompts(5)
    width = max(LENGTHS)
    padded = [p + [0] * (width - len(p)) for p in prompts]
    cache = engine.new_cache(len(prompts))
    logits = engine.forward(padded, cache, seq_lens=[len(p) for p in prompts])
    assert cache.host_lengths == list(LENGTHS)
    worst = 0.0
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0]
        got = logits[row, :len(prompt)]
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    print(f"\npadded prefill vs transformers alone: relative max|diff| {worst:.2e}")
    assert worst <= 1e-5
    # the state after the padded prefill continues each sequence as if it had been alone
    step = engine.forward([[5]] * len(prompts), cache)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = model(torch.tensor([[*prompt, 5]])).logits[0, -1]
        assert float((step[row, 0] - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_padding_never_reaches_the_conv_or_ssm_state() -> None:
    g = torch.Generator().manual_seed(0)
    batch, length, channels, kernel = 3, 11, 12, 4
    x = torch.randn(batch, length, channels, generator=g)
    weight, bias = torch.randn(channels, 1, kernel, generator=g), torch.randn(channels, generator=g)
    state = torch.randn(batch, channels, kernel - 1, generator=g)
    lens = torch.tensor([11, 2, 0])
    y, new_state = causal_conv1d(x, weight, bias, "silu", state, lens)
    assert torch.equal(new_state[2], state[2])  # no real token: the window as it was
    for row, n in enumerate(lens.tolist()[:2]):
        y_alone, state_alone = causal_conv1d(x[row:row + 1, :n], weight, bias, "silu", state[row:row + 1])
        assert torch.equal(new_state[row], state_alone[0])
        assert torch.allclose(y[row, :n], y_alone[0], atol=1e-6)
    # one token (decode), a sequence with none: its window stays, the others shift by one
    _, stepped_state = causal_conv1d(x[:, :1], weight, bias, "silu", state, torch.tensor([1, 0, 1]))
    _, shifted = causal_conv1d(x[:, :1], weight, bias, "silu", state)
    assert torch.equal(stepped_state[1], state[1]) and torch.equal(stepped_state[[0, 2]], shifted[[0, 2]])

    heads, head_dim, groups, size = 4, 3, 2, 5
    args = (torch.randn(batch, length, heads * head_dim, generator=g), torch.randn(batch, length, heads, generator=g),
            torch.randn(heads, generator=g), torch.randn(batch, length, groups * size, generator=g),
            torch.randn(batch, length, groups * size, generator=g), torch.randn(heads, generator=g),
            torch.randn(heads, generator=g))
    sizes = dict(num_heads=heads, head_dim=head_dim, n_groups=groups, state_size=size, dt_min=0.0, dt_max=float("inf"))
    start = torch.randn(batch, heads, head_dim, size, generator=g)
    y, final = ssd_chunk_scan(*args, chunk_size=4, initial_state=start, seq_lens=lens, **sizes)  # type: ignore[arg-type]
    for row, n in enumerate(lens.tolist()):
        if n == 0:
            assert torch.equal(final[row], start[row])
            continue
        alone = [a[row:row + 1, :n] if a.dim() == 3 else a for a in args]
        y_alone, final_alone = ssd_chunk_scan(*alone, chunk_size=4, initial_state=start[row:row + 1],
                                              **sizes)  # type: ignore[arg-type]
        assert torch.allclose(final[row], final_alone[0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(y[row, :n], y_alone[0], rtol=1e-5, atol=1e-5)
    one_token = [a[:, :1] if a.dim() == 3 else a for a in args]
    _, stepped = ssd_state_update(*one_token, state=start, seq_lens=torch.tensor([1, 0, 1]),
                                  **sizes)  # type: ignore[arg-type]
    assert torch.equal(stepped[1], start[1]) and not torch.equal(stepped[0], start[0])


def test_stop_tokens_and_budgets_per_sequence(model_and_engine: Any) -> None:
    _, engine, _ = model_and_engine
    prompts = _prompts()
    free = engine.complete(prompts, NEW_TOKENS)
    stop_1 = free[1][4]  # sequence 1 stops at its fifth token (or earlier, if that token came sooner)
    budgets = [2, NEW_TOKENS, 0, 7, NEW_TOKENS]
    got = engine.complete(prompts, budgets, stop_token_ids=[[], [stop_1], [], [], [free[4][0]]])
    assert got[0] == free[0][:2]
    assert got[1] == free[1][:free[1].index(stop_1) + 1] and got[1][-1] == stop_1
    assert got[2] == []
    assert got[3] == free[3][:7]
    assert got[4] == free[4][:1]
    # one stop set for every sequence
    shared = engine.complete(prompts, NEW_TOKENS, stop_token_ids=[stop_1])
    for row, tokens in enumerate(free):
        cut = tokens.index(stop_1) + 1 if stop_1 in tokens else len(tokens)
        assert shared[row] == tokens[:cut]


def test_sampling_is_seeded_per_sequence(model_and_engine: Any) -> None:
    _, engine, _ = model_and_engine
    prompts = _prompts()
    first = engine.complete(prompts, 8, temperature=0.9, top_p=0.8, seed=42)
    assert engine.complete(prompts, 8, temperature=0.9, top_p=0.8, seed=42) == first
    assert engine.complete(prompts, 8, temperature=0.9, top_p=0.8, seed=43) != first
    # sequence b of a batch seeded s samples with seed s + b: as it does alone with that seed
    for row, prompt in enumerate(prompts):
        assert engine.complete([prompt], 8, temperature=0.9, top_p=0.8, seed=42 + row)[0] == first[row]
    # a seed per sequence
    seeds = [7, 7, 7, 7, 7]
    per = engine.complete([prompts[0]] * 5, 8, temperature=0.9, top_p=0.8, seed=seeds)
    assert all(tokens == per[0] for tokens in per)


def test_stream_yields_each_step_as_it_comes(model_and_engine: Any) -> None:
    _, engine, _ = model_and_engine
    prompts = _prompts()
    budgets = [1, 3, 2, 3, 3]
    steps = engine.stream(prompts, budgets)
    first = next(steps)
    assert len(first.tokens) == len(prompts) and all(t is not None for t in first.tokens)
    assert first.finished == (True, False, False, False, False)
    rest = list(steps)
    assert len(rest) == 2
    assert rest[0].tokens[0] is None and rest[0].finished[2]
    expected = engine.complete(prompts, budgets)
    streamed = [[t for t in column if t is not None] for column in zip(*(s.tokens for s in [first, *rest]), strict=True)]
    assert streamed == expected


def test_a_batch_past_the_context_bound_is_refused_before_anything_runs(model_and_engine: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _, engine, _ = model_and_engine

    def must_not_run(*args: Any) -> None:
        raise AssertionError("a step ran")

    monkeypatch.setattr(engine, "step", must_not_run)
    prompts = [[3] * 10, [4] * 50]
    with pytest.raises(UsageError, match="prompt 1: 50 tokens plus 20 new ones make 70 tokens, which exceed the "
                                         "engine's context bound of 64"):
        engine.stream(prompts, 20)
    with pytest.raises(UsageError, match="token ids must lie in"):
        engine.stream([[3], [101]], 1)
    with pytest.raises(UsageError, match="max_new_tokens gives 1 values for 2 prompts"):
        engine.stream(prompts, [5])
    with pytest.raises(UsageError, match="stop_token_ids must be one list"):
        engine.stream(prompts, 5, stop_token_ids=[[2], 3])


def test_run_takes_prompts_of_different_lengths_and_streams_one(model_and_engine: Any) -> None:
    _, engine, path = model_and_engine
    prompts = _prompts()[:3]
    args = ["run", str(path), "--max-new-tokens", "6", "--json"]
    for prompt in prompts:
        args += ["--input-ids", ",".join(map(str, prompt))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["generated_ids"] == engine.complete(prompts, 6, stop_token_ids=[2])
    single = CliRunner().invoke(main, ["run", str(path), "--max-new-tokens", "6", "--input-ids",
                                       ",".join(map(str, prompts[1]))])
    assert single.exit_code == 0, single.output
    assert single.stdout.splitlines()[0] == ",".join(map(str, engine.complete([prompts[1]], 6, stop_token_ids=[2])[0]))
    refused = CliRunner().invoke(main, ["run", str(path), "--max-new-tokens", "60", "--input-ids", "3,4,5,6,7"])
    assert refused.exit_code == 2 and "make 65 tokens, which exceed the engine's context bound of 64" in refused.output
