"""The passes (decompose, specialize_decode, set_precision) and the pass manager: what each rewrites,
the counts it reports, that it verifies after each pass, and that prefill + decode graphs agree
numerically with one prefill over the whole sequence."""

from __future__ import annotations

import builtins
import dataclasses
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from nemocompile.base.errors import IRError, UsageError
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.config import ModelConfig, config_from_dict, load_config
from nemocompile.graph.ir import Attrs, Graph
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.text import parse_graph
from nemocompile.graph.types import BF16, DTYPES, F32, I64, TensorType
from nemocompile.graph.verifier import verify
from nemocompile.passes.assign_precision import AssignPrecision
from nemocompile.passes.base import Pass, PassOutput
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.manager import PassManager
from nemocompile.passes.precision_policy import PrecisionPolicy
from nemocompile.passes.set_precision import SetPrecision
from nemocompile.passes.specialize_decode import SpecializeDecode
from nemocompile.runtime.cache import Cache
from nemocompile.runtime.dtypes import torch_dtype
from nemocompile.runtime.executor import Executor

BLOCKS = ("mamba2_mixer", "attention", "moe", "mlp")


def tiny_config(pattern: str = "M*EM-E", latent: int | None = None, **changes: Any) -> ModelConfig:
    raw: dict[str, Any] = {
        "model_type": "nemotron_h", "hybrid_override_pattern": pattern, "vocab_size": 48, "hidden_size": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 24,
        "mamba_num_heads": 4, "mamba_head_dim": 4, "n_groups": 2, "ssm_state_size": 8, "conv_kernel": 4,
        "chunk_size": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
        "moe_shared_expert_intermediate_size": 12, "moe_latent_size": latent, "routed_scaling_factor": 2.5,
        **changes,
    }
    return config_from_dict(raw)


def decomposed(config: ModelConfig, dtype: Any = BF16) -> Graph:
    return Decompose().apply(build_block_graph(config, dtype)).graph


# ---------------------------------------------------------------- decompose


def test_decompose_counts_each_block_kind() -> None:
    output = Decompose().apply(build_block_graph(tiny_config("M*EM-E"), BF16))
    assert output.counts == {"mamba2_mixer": 2, "attention": 1, "moe": 2, "mlp": 1}
    assert not any(op.opname in BLOCKS for op in output.graph.ops)
    assert verify(output.graph) is output.graph


@pytest.mark.parametrize(("latent", "linears"), [(None, 15), (8, 19)])
def test_decompose_op_counts(latent: int | None, linears: int) -> None:
    # linear: 2 per Mamba (in/out proj), 4 per attention, 2 per MLP, 2 shared-expert per MoE
    # (+2 latent projections per MoE when moe_latent_size is set), and the lm_head.
    counts = decomposed(tiny_config("M*EM-E", latent)).op_counts()
    assert counts["linear"] == linears
    assert counts["ssd_chunk_scan"] == 2
    assert counts["causal_conv1d"] == 2
    assert counts["gated_rms_norm"] == 2
    assert counts["attention_gqa"] == 1
    assert counts["grouped_gemm"] == 4
    assert counts["moe_router"] == counts["moe_dispatch"] == counts["moe_combine"] == 2
    assert counts["activation"] == 2 * 2 + 1 + 2  # routed + shared per MoE, one per MLP, the conv's SiLU per Mamba
    assert counts["rms_norm"] == 6 + 1


@pytest.mark.parametrize("latent", [None, 8])
def test_latent_projections_wrap_the_routed_experts(latent: int | None) -> None:
    graph = decomposed(tiny_config("E", latent))
    latent_linears = [op for op in graph.ops_named("linear") if "latent" in str(op.operands[1])]
    assert [op.operands[1] for op in latent_linears] == (
        [] if latent is None else ["layers.0.mixer.fc1_latent", "layers.0.mixer.fc2_latent"])
    dispatch = next(graph.ops_named("moe_dispatch"))
    assert dispatch.results[0].type.shape == ("routed", 16 if latent is None else latent)


def test_decompose_keeps_the_ops_it_does_not_rewrite_and_the_block_result_names() -> None:
    block = build_block_graph(tiny_config(), BF16)
    core = Decompose().apply(block).graph
    kept = [op for op in block.ops if op.opname not in BLOCKS]
    assert [op for op in core.ops if op.origin == "import"] == kept
    block_results = {op.results[0].name: op.results[0].type for op in block.ops if op.opname in BLOCKS}
    core_types = core.value_types()
    assert all(core_types[name] == type_ for name, type_ in block_results.items())
    assert {op.scope for op in core.ops if op.origin == "decompose"} == {
        f"layers.{i}.mixer" for i in range(6)}


def test_decompose_of_a_core_graph_changes_nothing() -> None:
    core = decomposed(tiny_config())
    again = Decompose().apply(core)
    assert again.counts == {}
    assert again.graph == core


# ---------------------------------------------------------------- specialize_decode


def test_specialize_decode_replaces_every_chunk_scan_and_reinfers_types() -> None:
    prefill = decomposed(tiny_config(), BF16)
    scans = list(prefill.ops_named("ssd_chunk_scan"))
    assert [s.results[0].type.dtype for s in scans] == [F32, F32]
    output = SpecializeDecode().apply(prefill)
    decode = output.graph
    assert output.counts == {"ssd_state_update": 2}
    assert not list(decode.ops_named("ssd_chunk_scan"))
    steps = list(decode.ops_named("ssd_state_update"))
    assert [s.results[0].name for s in steps] == [s.results[0].name for s in scans]
    assert [s.results[0].type.dtype for s in steps] == [BF16, BF16]
    assert all("chunk_size" not in s.attrs for s in steps)
    for step, scan in zip(steps, scans, strict=True):
        assert step.operands == scan.operands
        for key in ("num_heads", "head_dim", "n_groups", "state_size"):
            assert step.attrs[key] == scan.attrs[key]
    # The gated norm that reads the step now produces bf16 too.
    norms = list(decode.ops_named("gated_rms_norm"))
    assert [n.result.type.dtype for n in norms] == [BF16, BF16]
    assert verify(decode) is decode
    assert len(decode.ops) == len(prefill.ops)


# ---------------------------------------------------------------- set_precision


@pytest.mark.parametrize(("start", "precision", "target"), [(BF16, "fp32", F32), (F32, "bf16", BF16)])
def test_set_precision_retypes_weights_but_keeps_routers_and_ssm_state_f32(
        start: Any, precision: str, target: Any) -> None:
    block = build_block_graph(tiny_config(), start)
    output = SetPrecision(precision).apply(block)
    graph = output.graph
    routers = [w for w in graph.weights if w.category == "router"]
    others = [w for w in graph.weights if w.category != "router"]
    assert len(routers) == 4
    assert all(w.type.dtype == F32 for w in routers)
    assert all(w.type.dtype == target for w in others)
    assert output.counts == {"weights_retyped": len(others)}
    states = {s.kind: s.type.dtype for s in graph.states}
    assert states == {"conv": target, "ssm": F32, "kv": target}
    assert graph.inputs[0].type.dtype == I64
    assert graph.meta("precision") == precision
    types = graph.value_types()
    assert types[next(graph.ops_named("embedding")).result.name].dtype == target
    assert types["logits"].dtype == F32
    assert verify(graph) is graph
    core = Decompose().apply(graph).graph
    assert {op.attrs.str("dtype") for op in core.ops_named("cast")} == {"f32", target.name}


def test_set_precision_to_the_current_precision_retypes_nothing() -> None:
    block = build_block_graph(tiny_config(), BF16)
    output = SetPrecision("bf16").apply(block)
    assert output.counts == {"weights_retyped": 0}
    assert [w.type for w in output.graph.weights] == [w.type for w in block.weights]


@pytest.mark.parametrize("precision", ["fp16", "FP32", "nvfp4", ""])
def test_set_precision_rejects_unknown_precisions(precision: str) -> None:
    with pytest.raises(UsageError, match=f"got '{precision}'"):
        SetPrecision(precision)


# ---------------------------------------------------------------- pass manager


@dataclasses.dataclass(frozen=True)
class DropNormEps(Pass):  # type: ignore[misc]  # mypy resolves the mapped package as Any
    """A deliberately broken pass: strips the attributes of the first rms_norm."""

    name: ClassVar[str] = "drop_norm_eps"

    def apply(self, graph: Graph) -> PassOutput:
        index = next(i for i, op in enumerate(graph.ops) if op.opname == "rms_norm")
        broken = dataclasses.replace(graph.ops[index], attrs=Attrs())
        return PassOutput(dataclasses.replace(graph, ops=(*graph.ops[:index], broken, *graph.ops[index + 1:])),
                          {"broken": 1})


def test_pass_manager_verifies_after_each_pass_and_names_the_broken_one() -> None:
    block = build_block_graph(tiny_config(), BF16)
    manager = PassManager([Decompose(), DropNormEps(), SpecializeDecode()])
    with pytest.raises(IRError) as info:
        manager.run(block)
    assert "after pass 'drop_norm_eps'" in str(info.value)
    assert "missing attribute 'eps'" in str(info.value)
    assert ">> " in str(info.value)
    _, records = dataclasses.replace(manager, verify_each=False).run(block)
    assert [r.name for r in records] == ["decompose", "drop_norm_eps", "specialize_decode"]


def test_pass_manager_verifies_its_input() -> None:
    block = build_block_graph(tiny_config(), BF16)
    broken = DropNormEps().apply(block).graph
    with pytest.raises(IRError, match="after pass 'import'"):
        PassManager([Decompose()]).run(broken)


def test_pass_manager_records_counts_and_op_numbers() -> None:
    block = build_block_graph(tiny_config(), BF16)
    graph, records = PassManager([SetPrecision("fp32"), Decompose(), SpecializeDecode()]).run(block)
    assert [r.name for r in records] == ["set_precision", "decompose", "specialize_decode"]
    assert records[0].counts["weights_retyped"] > 0
    assert records[1].counts == {"mamba2_mixer": 2, "attention": 1, "moe": 2, "mlp": 1}
    assert records[2].counts == {"ssd_state_update": 2}
    assert records[0].ops_before == records[0].ops_after == len(block.ops)
    assert records[1].ops_before == len(block.ops)
    assert records[1].ops_after == records[2].ops_before == records[2].ops_after == len(graph.ops)
    assert records[1].ops_after > records[1].ops_before
    assert all(r.seconds >= 0 for r in records)
    assert graph.meta("precision") == "fp32"


@pytest.mark.parametrize(("print_after", "printed"), [
    (frozenset({"all"}), ["set_precision", "decompose", "specialize_decode"]),
    (frozenset({"decompose"}), ["decompose"]),
    (frozenset(), []),
])
def test_pass_manager_prints_after_chosen_passes(print_after: frozenset[str], printed: list[str]) -> None:
    calls: list[tuple[str, str]] = []
    block = build_block_graph(tiny_config(), BF16)
    manager = PassManager([SetPrecision("bf16"), Decompose(), SpecializeDecode()], print_after,
                          lambda name, text: calls.append((name, text)))
    graph, _ = manager.run(block)
    assert [name for name, _ in calls] == printed
    if "decompose" in printed:
        text = dict(calls)["decompose"]
        assert "ssd_chunk_scan(" in text and "mamba2_mixer(" not in text
    if printed[-1:] == ["specialize_decode"]:
        assert parse_graph(calls[-1][1]) == graph


# ---------------------------------------------------------------- numerics: prefill + decode == prefill


def random_weights(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Small random weights of the graph's types: norms are ones, A_log = log(1..H), D = 1, and
    dt_bias the inverse softplus of step sizes in [0.05, 0.5] so every step is well above dt_min."""
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for weight in graph.weights:
        shape = [int(d) for d in weight.type.shape]
        dtype = torch_dtype(weight.type.dtype)
        leaf = weight.name.rsplit(".", 1)[-1]
        if weight.category == "norms":
            tensor = torch.ones(shape)
        elif leaf == "A_log":
            tensor = torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
        elif leaf == "D":
            tensor = torch.ones(shape)
        elif leaf == "dt_bias":
            step = torch.linspace(0.05, 0.5, shape[0])
            tensor = step + torch.log(-torch.expm1(-step))  # softplus^-1
        else:
            tensor = torch.randn(shape, generator=generator) * 0.1
        weights[weight.name] = tensor.to(dtype)
    return weights


@pytest.mark.parametrize("latent", [None, 8])
def test_prefill_then_decode_matches_one_prefill(latent: int | None) -> None:
    prefill = decomposed(tiny_config("M*EM-E", latent), F32)
    decode = SpecializeDecode().apply(prefill).graph
    weights = random_weights(prefill)
    batch, prompt, total = 2, 7, 12  # the prompt spans two chunks of 4, the last one partial
    ids = torch.randint(0, 48, (batch, total), generator=torch.Generator().manual_seed(1))
    device = torch.device("cpu")

    whole_cache = Cache.for_graph(prefill, batch, device)
    expected = Executor(prefill, weights).run(ids, whole_cache)["logits"]
    assert expected.shape == (batch, total, 48)
    assert expected.dtype == torch.float32

    cache = Cache.for_graph(prefill, batch, device)
    pieces = [Executor(prefill, weights).run(ids[:, :prompt], cache)["logits"]]
    stepper = Executor(decode, weights)
    for position in range(prompt, total):
        pieces.append(stepper.run(ids[:, position : position + 1], cache)["logits"])
    actual = torch.cat(pieces, dim=1)

    assert cache.length == whole_cache.length == total
    scale = expected.abs().max().item()
    assert scale > 0
    assert (actual - expected).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert cache.host_lengths == whole_cache.host_lengths == [total] * batch
    assert cache.lengths.tolist() == [total] * batch
    kv_slots = [slot.name for slot in prefill.states if slot.kind == "kv"]
    assert kv_slots
    for name, state in whole_cache.tensors.items():
        mine = cache.tensors[name]
        if name in kv_slots:  # preallocated: compare the positions written
            assert mine.shape[2] >= total and state.shape[2] >= total
            mine, state = mine[:, :, :total], state[:, :, :total]
        assert torch.allclose(mine, state, rtol=1e-5, atol=1e-6), name


# ---------------------------------------------------------------- plan mode


def test_ultra_builds_from_config_alone_without_reading_weight_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = load_config(Path("/work/shared/models/ultra.json"))

    def no_files(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"plan mode opened a file: {args!r}")

    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(os, "open", no_files)
    block = build_block_graph(config, BF16)
    core = Decompose().apply(block).graph
    monkeypatch.undo()

    assert all(w.sources == () for w in block.weights)
    assert len(config.layer_kinds) == 108
    assert len(block.meta("pattern") or "") == 108
    blocks = [op for op in block.ops if op.opname in BLOCKS]
    assert len(blocks) == 108
    assert [op.scope for op in blocks] == [f"layers.{i}.mixer" for i in range(108)]
    kinds = Counter(op.opname for op in blocks)
    assert kinds == {"mamba2_mixer": 48, "moe": 48, "attention": 12}
    assert len({op.scope for op in core.ops if op.scope.endswith(".mixer")}) == 108
    parameters = sum(math.prod(int(d) for d in w.type.shape) for w in block.weights)
    assert 4.0e11 < parameters < 6.0e11  # the ~550B model (MTP excluded)


# ---------------------------------------------------------------- provenance


def test_specialize_decode_keeps_the_provenance_of_ops_it_leaves_alone() -> None:
    # Each result is stamped with the pass that made it: an op whose name, operands, attributes and
    # types specialize_decode leaves as they were was not made by specialize_decode.
    prefill = decomposed(tiny_config(), BF16)
    decode = SpecializeDecode().apply(prefill).graph
    untouched = [(before, after) for before, after in zip(prefill.ops, decode.ops, strict=True)
                 if dataclasses.replace(after, origin=before.origin) == before]
    assert len(untouched) > len(prefill.ops) // 2
    assert [after.origin for _, after in untouched] == [before.origin for before, _ in untouched]
    changed = {after.opname for before, after in zip(prefill.ops, decode.ops, strict=True)
               if dataclasses.replace(after, origin=before.origin) != before}
    assert changed == {"ssd_state_update", "gated_rms_norm"}


# ---------------------------------------------------------------- rule-based passes reach a fixed point


def test_specialize_decode_twice_rewrites_nothing_the_second_time() -> None:
    once = SpecializeDecode().apply(decomposed(tiny_config(), BF16))
    twice = SpecializeDecode().apply(once.graph)
    assert once.counts == {"ssd_state_update": 2}
    assert twice.counts == {"ssd_state_update": 0}
    assert twice.graph == once.graph


def test_assign_precision_twice_adds_no_second_quantize() -> None:
    policy = PrecisionPolicy("bf16", {"routed_experts": "nvfp4_w4a4", "mamba_linears": "fp8_e4m3_w8a8"})
    once = AssignPrecision(policy).apply(decomposed(tiny_config(), BF16))
    twice = AssignPrecision(policy).apply(once.graph)
    # experts_up of 2 MoE layers (experts_down has input dim 8, not NVFP4: kept and said); Mamba in/out
    assert once.counts["act_nvfp4"] == 2 and once.counts["act_fp8"] == 4
    assert any("experts_down" in note and "divisible by 16" in note for note in once.notes)
    assert twice.counts["act_nvfp4"] == twice.counts["act_fp8"] == 0
    assert twice.graph.op_counts() == once.graph.op_counts()
    weights = once.graph.weight_map()
    for gemm in once.graph.ops_named("grouped_gemm"):  # W4A4 experts read their input through quantize
        if weights[str(gemm.operands[2])].type.dtype.name != "nvfp4":
            continue
        producer = once.graph.producer(str(gemm.operands[0]))
        assert producer is not None and producer.opname == "quantize"
        assert producer.operands[2] == gemm.operands[1]  # per-expert scales need the expert offsets
        assert gemm.attrs["out_dtype"] == "bf16" and gemm.result.type.dtype == BF16


# ---------------------------------------------------------------- the quantize op and GEMMs of quantized inputs


def _quantize_graph(x: TensorType, scale: TensorType, fmt: str, offsets: bool = False) -> Graph:
    b = GraphBuilder("q", origin="test")
    b.input("x", x)
    b.weight("s", scale, "activation_scales")
    operands = ["x", "s"]
    if offsets:
        operands.append(b.input("offsets", TensorType(I64, (5,))))
    b.output(b.op1("quantize", operands, {"format": fmt}))
    return b.build()


def test_quantize_types_its_result_in_the_format() -> None:
    graph = _quantize_graph(TensorType(BF16, ("batch", "seq", 32)), TensorType(F32, ()), "nvfp4")
    assert graph.value_types()[graph.outputs[0]] == TensorType(DTYPES["nvfp4"], ("batch", "seq", 32))
    grouped = _quantize_graph(TensorType(BF16, ("routed", 32)), TensorType(F32, (4,)), "fp8", offsets=True)
    assert grouped.value_types()[grouped.outputs[0]].dtype == DTYPES["fp8"]


@pytest.mark.parametrize(("x", "scale", "fmt", "offsets", "message"), [
    (TensorType(BF16, (4, 32)), TensorType(F32, ()), "int4", False, "format 'int4' is not one of nvfp4, fp8"),
    (TensorType(BF16, (4, 24)), TensorType(F32, ()), "nvfp4", False, "last dim divisible by 16"),
    (TensorType(BF16, (4, 32)), TensorType(F32, (4,)), "fp8", False, "input_scale must be an f32 scalar"),
    (TensorType(BF16, (4, 32)), TensorType(F32, ()), "fp8", True, "must be an f32 [experts] vector"),
    (TensorType(I64, (4, 32)), TensorType(F32, ()), "fp8", False, "input must be a float activation"),
])
def test_quantize_refuses_what_it_cannot_mean(x: TensorType, scale: TensorType, fmt: str, offsets: bool,
                                              message: str) -> None:
    with pytest.raises(IRError, match=re.escape(message)):
        _quantize_graph(x, scale, fmt, offsets)


def test_a_gemm_of_a_quantized_input_needs_the_same_format_and_an_out_dtype() -> None:
    b = GraphBuilder("g", origin="test")
    b.input("x", TensorType(BF16, (4, 32)))
    b.weight("s", TensorType(F32, ()), "activation_scales")
    b.weight("w8", TensorType(DTYPES["fp8"], (16, 32)), "mlp")
    b.weight("w4", TensorType(DTYPES["nvfp4"], (16, 32)), "mlp")
    q = b.op1("quantize", ["x", "s"], {"format": "fp8"})
    assert b.type_of(b.op1("linear", [q, "w8"], {"out_dtype": "bf16"})) == TensorType(BF16, (4, 16))
    with pytest.raises(IRError, match="needs out_dtype"):
        b.op1("linear", [q, "w8"])
    with pytest.raises(IRError, match="input is quantized to fp8 but its weight is nvfp4"):
        b.op1("linear", [q, "w4"], {"out_dtype": "bf16"})
    with pytest.raises(IRError, match="out_dtype only for a quantized input"):
        b.op1("linear", ["x", "w8"], {"out_dtype": "bf16"})
    with pytest.raises(IRError, match="out_dtype must be a float dtype"):
        b.op1("linear", [q, "w8"], {"out_dtype": "fp8"})
