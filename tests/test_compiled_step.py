"""The decode step compiled by torch.compile (runtime/compiled_step.py, runtime/compiled_ops.py):
every op but attention runs compiled, the traceable implementations give their reference ops'
results to float32 rounding (ragged experts, an expert with no tokens, more pairs than the
per-pair path takes), and compiled engines give the eager engine's logits (relative 1e-5) and the
same greedy tokens, for a mixed-length batch and for a quantized engine whose quantized GEMMs
stay eager."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F

import nemocompile
from nemocompile.base.errors import UsageError
from nemocompile.graph.ir import Op
from nemocompile.runtime.compiled_ops import GEMV_MAX_ROWS, PAIRS_MAX, TRACEABLE, gemv
from nemocompile.runtime.compiled_step import COMPILABLE
from nemocompile.runtime.reference_dispatch import REFERENCE

transformers = pytest.importorskip("transformers", reason="the checkpoint is transformers' NemotronHForCausalLM")

EXPERTS = 6


def _close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = 1e-5) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = max(1.0, float(theirs.float().abs().max()))
    assert float((ours.float() - theirs.float()).abs().max()) <= tolerance * scale


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.NemotronHConfig(
        vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=8,
        conv_kernel=4, n_routed_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16,
        moe_shared_expert_intermediate_size=24, hybrid_override_pattern="ME*-ME", tie_word_embeddings=True,
        dtype="float32")
    torch.manual_seed(11)
    model = transformers.NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.weight.normal_(0, 0.3)
                layer.mixer.gate.e_score_correction_bias.normal_(0, 0.05)
            if hasattr(layer.mixer, "D"):
                layer.mixer.D.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("compiled-step") / "checkpoint"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp32_engine(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compiled-step-engines") / "fp32"
    nemocompile.build(checkpoint, out, target="h100", precision="fp32")
    return out


def test_gemv_is_the_reference_linear() -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(37, 64, generator=g), torch.randn(37, generator=g)
    for rows in (1, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        x = torch.randn(rows, 1, 64, generator=g)
        _close(gemv(x, weight, bias), F.linear(x, weight, bias))
        _close(gemv(x, weight), F.linear(x, weight))
    x16, w16 = torch.randn(2, 64, generator=g).bfloat16(), weight.bfloat16()
    _close(gemv(x16, w16), F.linear(x16, w16), tolerance=1e-2)  # one bf16 rounding either way


def _moe_ops(engine: Any) -> dict[str, Op]:
    ops = {step.op.opname: step.op for step in engine._decode.steps}
    return {name: ops[name] for name in ("moe_route", "moe_expert_up", "moe_expert_down")}


@pytest.mark.parametrize("tokens", [1, 5, PAIRS_MAX // 2 + 3])  # the last takes the reference path
def test_traceable_moe_ops_are_their_reference_ops(fp32_engine: Path, tokens: int) -> None:
    engine = nemocompile.load(fp32_engine, device="cpu")
    ops = _moe_ops(engine)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 1, 32, generator=g)
    router, bias = torch.randn(EXPERTS, 32, generator=g), torch.randn(EXPERTS, generator=g) * 0.05
    bias[3] = -100.0  # expert 3 never wins: a segment with no rows
    route = REFERENCE["moe_route"](ops["moe_route"], [x, router, bias])
    with patch("torch.compiler.is_compiling", return_value=True):  # the counting torch.compile traces
        ours = REFERENCE["moe_route"](ops["moe_route"], [x, router, bias])
    for mine, theirs in zip(ours, route, strict=True):
        assert torch.equal(mine, theirs)
    weights, _, offsets, order = route
    assert int(offsets[4] - offsets[3]) == 0 and int(offsets[-1]) == 2 * tokens
    up_weight, down_weight = torch.randn(EXPERTS, 16, 32, generator=g), torch.randn(EXPERTS, 32, 16, generator=g)
    up_args = [x, order, offsets, up_weight, None]
    hidden = REFERENCE["moe_expert_up"](ops["moe_expert_up"], up_args)[0]
    _close(TRACEABLE["moe_expert_up"](ops["moe_expert_up"], up_args)[0], hidden)
    down_args = [hidden, order, offsets, down_weight, weights, None]
    _close(TRACEABLE["moe_expert_down"](ops["moe_expert_down"], down_args)[0],
           REFERENCE["moe_expert_down"](ops["moe_expert_down"], down_args)[0])


def _greedy(engine: Any, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each decode step's logits (prompts right-padded to one length, as generation pads them) and
    the greedy tokens, through engine.forward; seq_lens as generation passes them."""
    cache = engine.new_cache(len(prompts))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    logits = engine._prefill.run(ids, cache, [len(p) for p in prompts])["logits"]
    last = torch.stack([logits[b, len(p) - 1] for b, p in enumerate(prompts)])
    steps_logits, tokens = [], [[] for _ in prompts]
    for _ in range(steps):
        token = last.argmax(-1)
        for b, t in enumerate(token.tolist()):
            tokens[b].append(t)
        last = engine.forward(token[:, None], cache)[:, -1]
        steps_logits.append(last)
    return steps_logits, tokens


def test_compiled_engine_matches_eager_on_a_mixed_length_batch(fp32_engine: Path) -> None:
    from torch._dynamo.utils import counters

    eager = nemocompile.load(fp32_engine, device="cpu")
    fast = nemocompile.load(fp32_engine, device="cpu", compile=True)
    compiled = fast._decode.compiled
    assert compiled is not None and eager._decode.compiled is None and fast._prefill.compiled is None
    # every decode op but attention runs compiled; attention is the one eager op between two runs
    decode_ops = [step.op.opname for step in fast._decode.steps]
    assert compiled.compiled_ops == len(decode_ops) - decode_ops.count("attention_gqa")
    assert set(decode_ops) - {"attention_gqa"} <= COMPILABLE
    assert [run.compiled is not None for run in compiled.runs] == [True, False, True]
    assert "moe_expert_down layers.5.mixer" in compiled.source
    frames = counters["stats"]["unique_graphs"]
    prompts = [[5, 17, 33, 2, 9, 41, 7], [12, 3, 88], [60, 61, 62, 63, 64]]
    theirs, their_tokens = _greedy(eager, prompts, 8)
    ours, our_tokens = _greedy(fast, prompts, 8)
    assert counters["stats"]["unique_graphs"] >= frames + 2  # both runs were compiled for batch 3
    assert our_tokens == their_tokens
    for mine, reference in zip(ours, theirs, strict=True):
        _close(mine, reference)
    # the same engine through the generation API
    assert fast.complete(prompts, 6) == eager.complete(prompts, 6)


def test_quantized_gemms_stay_eager_in_a_compiled_engine(checkpoint: Path, tmp_path: Path) -> None:
    nemocompile.build(checkpoint, tmp_path / "h100", target="h100")
    eager = nemocompile.load(tmp_path / "h100", device="cpu")
    fast = nemocompile.load(tmp_path / "h100", device="cpu", compile=True)
    compiled = fast._decode.compiled
    assert compiled is not None
    eager_ops = {fast._decode.steps[i].op.opname for run in compiled.runs if run.compiled is None
                 for i in range(run.start, run.end)}
    assert "attention_gqa" in eager_ops and eager_ops & {"quant_linear", "moe_expert_up", "add_rms_norm"}
    assert 0 < compiled.compiled_ops < len(fast._decode.steps)
    prompts = [[5, 17, 33, 2, 9], [12, 3, 88, 1, 4]]
    theirs, their_tokens = _greedy(eager, prompts, 6)
    ours, our_tokens = _greedy(fast, prompts, 6)
    assert our_tokens == their_tokens
    for mine, reference in zip(ours, theirs, strict=True):
        _close(mine, reference, tolerance=1e-4)


def test_compile_is_refused_where_it_does_not_apply(fp32_engine: Path) -> None:
    with pytest.raises(UsageError, match="compile applies to the reference and triton backends"):
        nemocompile.load(fp32_engine, device="cpu", backend="onnx", compile=True)


def test_run_compile_prints_the_eager_tokens(fp32_engine: Path) -> None:
    from click.testing import CliRunner

    from nemocompile.cli import main

    def run(*extra: str) -> Any:
        result = CliRunner().invoke(main, ["run", str(fp32_engine), "--input-ids", "5,17,33,2", "--input-ids",
                                           "12,3", "--max-new-tokens", "5", "--json", *extra],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert run("--compile") == run()


def test_ops_after_a_ranks_expert_share_stay_eager(checkpoint: Path, tmp_path: Path) -> None:
    """In an expert-parallel rank's graph, `local_experts` (eager) keeps a number of token-expert
    pairs that varies per step; the expert GEMMs reading them stay eager rather than compile again
    for every count. (Building the executor needs no process group; running it does.)"""
    from nemocompile.graph.sharding import rank_view
    from nemocompile.runtime.engine import read_engine
    from nemocompile.runtime.executor import Executor
    from nemocompile.runtime.weights import load_weights

    nemocompile.build(checkpoint, tmp_path / "two", target="h100", precision="fp32", world_size=2)
    contents = read_engine(tmp_path / "two")
    decode = rank_view(contents.decode)
    weights = load_weights(contents.directory, list(contents.manifest.weight_files(0)), rank_view(contents.prefill),
                           torch.device("cpu"))
    executor = Executor(decode, weights, compile=True, dense_weights=True)
    compiled = executor.compiled
    assert compiled is not None
    eager = [executor.steps[i].op.opname for run in compiled.runs if run.compiled is None
             for i in range(run.start, run.end)]
    assert eager.count("local_experts") == eager.count("moe_expert_up") == eager.count("moe_expert_down") == 2
    assert "ssd_state_update" not in eager and "linear" not in eager and "all_reduce" in eager


def test_a_cache_made_outside_inference_mode_compiles_once(fp32_engine: Path) -> None:
    """A new cache or a restored snapshot holds ordinary tensors, the states a step writes are
    inference tensors: the compiled code, specialised to what it first gets, would compile again on
    the second step (as it did) unless the states are handed over as inference tensors."""
    from torch._dynamo.utils import counters

    fast = nemocompile.load(fp32_engine, device="cpu", compile=True)
    snapshot = fast.new_cache(1)
    fast.forward([[5, 17, 33, 2]], snapshot)
    cache = fast.cache_from_states([snapshot.sequence_state(0)])  # ordinary tensors again
    assert not any(t.is_inference() for t in cache.tensors.values())
    fast.forward([[7]], cache)
    graphs = counters["stats"]["unique_graphs"]
    for token in (8, 9, 10):
        fast.forward([[token]], cache)
    assert counters["stats"]["unique_graphs"] == graphs
