"""The IR text form: print -> parse gives an equal graph, golden text after decompose, and parse
errors that name the line."""

from __future__ import annotations

import dataclasses
import math
import re
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemocompile.base.errors import IRError
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.config import ModelConfig, config_from_dict, load_config
from nemocompile.graph.ir import (
    STATE_KINDS,
    Attrs,
    AttrValue,
    Graph,
    Op,
    StateSlot,
    TensorSource,
    Value,
    Weight,
)
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.text import parse_graph, print_graph
from nemocompile.graph.types import BF16, DTYPES, F32, Dim, Sharding, TensorType
from nemocompile.passes.decompose import Decompose

MODELS = Path("/work/shared/models")
PUBLISHED = ("nano", "super", "ultra")


def _published(name: str) -> ModelConfig:
    config, _ = load_config(MODELS / f"{name}.json")
    return config


def _strict(value: AttrValue) -> object:
    """An attribute value with its Python type spelled out (True == 1 and 1 == 1.0 in Python)."""
    if isinstance(value, tuple):
        return ("list", tuple(_strict(v) for v in value))
    if isinstance(value, float):
        return ("float", value, math.copysign(1.0, value))
    return (type(value).__name__, value)


def assert_round_trips(graph: Graph) -> None:
    text = print_graph(graph)
    parsed = parse_graph(text)
    assert parsed == graph
    for before, after in zip(graph.ops, parsed.ops, strict=True):
        assert [(k, _strict(v)) for k, v in after.attrs.items] == [(k, _strict(v)) for k, v in before.attrs.items]
    assert print_graph(parsed) == text


# ---------------------------------------------------------------- the published models


@pytest.mark.parametrize("name", PUBLISHED)
def test_block_and_decomposed_graphs_of_published_models_round_trip(name: str) -> None:
    block = build_block_graph(_published(name), BF16)
    core = Decompose().apply(block).graph
    assert any(op.opname == "mamba2_mixer" for op in block.ops)
    assert any(op.opname == "ssd_chunk_scan" for op in core.ops)
    assert_round_trips(block)
    assert_round_trips(core)


def test_comment_lines_are_ignored() -> None:
    graph = build_block_graph(_published("nano"), BF16)
    lines = print_graph(graph).splitlines()
    commented = [lines[0], "# a comment", *lines[1:4], "   # indented comment", *lines[4:]]
    assert parse_graph("\n".join(commented)) == graph


# ---------------------------------------------------------------- property: generated graphs


def _not_a_number_word(text: str) -> bool:
    # `inf` and `nan` tokenize as numbers; see test_symbolic_dims_that_spell_numbers_round_trip.
    return text not in ("inf", "nan")


_LOWER = string.ascii_lowercase + "_"
_WORD = string.ascii_letters + string.digits + "_"


def _name(first: str, rest: str, max_size: int) -> st.SearchStrategy[str]:
    return st.builds(str.__add__, st.sampled_from(first), st.text(rest, max_size=max_size))


_identifiers = _name(string.ascii_letters + "_", _WORD, 8).filter(_not_a_number_word)
_value_names = st.text(_WORD + ".", min_size=1, max_size=10)
_symbols = _name(_LOWER, _LOWER + string.digits, 6).filter(_not_a_number_word)
_dims: st.SearchStrategy[Dim] = st.integers(0, 4096) | _symbols
_types = st.builds(TensorType, st.sampled_from(list(DTYPES.values())),
                   st.lists(_dims, max_size=4).map(tuple), st.sampled_from([None, Sharding("tp", 8), Sharding("ep", 2, partial=True)]))
_texts = st.text(max_size=12) | st.sampled_from(['say "hi"', "back\\slash", "tab\tnew\nline", "ünï©ødé ✓ 𝔘", ""])
_scalars: st.SearchStrategy[AttrValue] = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False) | st.sampled_from([math.inf, -math.inf, 1e-5, -0.0, 1e300, 5e-324]) | _texts
)
_attr_values: st.SearchStrategy[AttrValue] = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=8)
_attrs = st.dictionaries(_identifiers, _attr_values, max_size=4).map(Attrs.of)
_ops = st.builds(
    Op,
    _identifiers,
    st.lists(st.none() | _value_names, max_size=4).map(tuple),
    st.lists(st.builds(Value, _value_names, _types), min_size=1, max_size=3).map(tuple),
    _attrs,
    _texts,
    _texts,
)
_sources = st.lists(st.builds(TensorSource, _texts, _texts), max_size=3).map(tuple)
_weights = st.builds(Weight, _value_names, _types, _texts, _sources)
_states = st.builds(StateSlot, _value_names, st.sampled_from(STATE_KINDS), _types)
_graphs = st.builds(
    Graph,
    _identifiers,
    st.lists(st.builds(Value, _value_names, _types), max_size=3).map(tuple),
    st.lists(_weights, max_size=3).map(tuple),
    st.lists(_states, max_size=2).map(tuple),
    st.lists(_ops, max_size=4).map(tuple),
    st.lists(_value_names, max_size=2).map(tuple),
    st.lists(st.tuples(_texts, _texts), max_size=2).map(tuple),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_graphs)
def test_generated_graphs_round_trip(graph: Graph) -> None:
    assert_round_trips(graph)


@pytest.mark.parametrize(
    "value",
    [math.inf, -math.inf, 1e-5, 0.1, -0.0, 1e300, 1.0, 0, -7, 2**80, True, False, None, "", 'q"uote',
     "back\\slash", "ünï©ødé\u2028", "\x00", (), (1, (2.5, ("x", None)), []), (True, 1, 1.0)],
)
def test_attribute_values_round_trip_with_their_types(value: AttrValue) -> None:
    b = GraphBuilder("g")
    x = b.input("x", TensorType(F32, (4,)))
    b.output(x)
    graph = b.build()
    op = Op("anything", (x,), (Value("y", TensorType(F32, (4,))),), Attrs.of({"v": value}))
    assert_round_trips(dataclasses.replace(graph, ops=(op,)))


def test_weights_with_several_sources_round_trip() -> None:
    sources = tuple(TensorSource(f"model-0000{i % 2 + 1}-of-00002.safetensors",
                                 f"backbone.layers.1.mixer.experts.{i}.up_proj.weight") for i in range(4))
    b = GraphBuilder("g", {"source_fingerprint": "abc"})
    b.weight("layers.1.mixer.experts_up", TensorType(BF16, (4, 8, 16)), "routed_experts", sources)
    b.weight("single", TensorType(F32, (3,)), "norms", (TensorSource("a b.safetensors", 'odd "name"'),))
    b.weight("planned", TensorType(F32, (3,)), "norms")
    x = b.input("x", TensorType(F32, (3,)))
    b.output(x)
    graph = b.build()
    assert_round_trips(graph)
    parsed = parse_graph(print_graph(graph)).weight_map()
    assert parsed["layers.1.mixer.experts_up"].sources == sources
    assert parsed["layers.1.mixer.experts_up"].stacked
    assert parsed["planned"].sources == ()


def _with_input_type(type_: TensorType) -> Graph:
    b = GraphBuilder("g")
    x = b.input("x", type_)
    b.output(x)
    return b.build()


@pytest.mark.parametrize("symbol", ["inf", "nan"])
def test_symbolic_dims_that_spell_numbers_are_refused(symbol: str) -> None:
    # `inf` and `nan` would read back as numbers, so they are not valid dim names.
    with pytest.raises(IRError, match="not a valid symbolic dimension"):
        TensorType(F32, (symbol, 8))


@pytest.mark.parametrize("sharding", [Sharding("tp", 8, 0), Sharding("ep", 4, 1), Sharding("tp", 2),
                                      Sharding("tp", 8, partial=True)])
def test_sharding_round_trips(sharding: Sharding) -> None:
    graph = _with_input_type(TensorType(BF16, (8, 8), sharding))
    assert str(sharding) in print_graph(graph)
    assert_round_trips(graph)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Sharding("pp", 2, 0), "not one of tp, ep"),
    (lambda: Sharding("tp", 0, 0), "positive rank count"),
    (lambda: Sharding("tp", 2, 0, partial=True), "partial-sum"),
    (lambda: TensorType(BF16, (6, 8), Sharding("tp", 4, 0)), "does not split into 4 equal parts"),
    (lambda: TensorType(BF16, (6, 8), Sharding("tp", 2, 2)), "splits dim 2 of a rank-2 tensor"),
])
def test_bad_sharding_is_refused(make: Any, message: str) -> None:
    with pytest.raises(IRError, match=message):
        make()


def test_local_shape_is_the_per_rank_piece() -> None:
    assert TensorType(BF16, (64, 32), Sharding("tp", 8, 0)).local_shape() == (8, 32)
    assert TensorType(BF16, (16, 64, 32), Sharding("ep", 4, 0)).local_shape() == (4, 64, 32)
    assert TensorType(BF16, (64, 32), Sharding("tp", 8)).local_shape() == (64, 32)


# ---------------------------------------------------------------- golden text after decompose

TINY = {
    "model_type": "nemotron_h", "hybrid_override_pattern": "M*E-", "vocab_size": 64, "hidden_size": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 24,
    "mamba_num_heads": 4, "mamba_head_dim": 4, "n_groups": 2, "ssm_state_size": 8, "conv_kernel": 4,
    "chunk_size": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    "moe_shared_expert_intermediate_size": 12,
}

GOLDEN_MAMBA_AND_MOE = """
%0 = embedding(%input_ids, %embeddings) : tensor<bf16, [batch, seq, 16]> scope "embeddings" by "import"
%1 = rms_norm(%0, %layers.0.norm) {eps = 1e-05} : tensor<bf16, [batch, seq, 16]> scope "layers.0.norm" by "import"
%15 = linear(%1, %layers.0.mixer.in_proj, _) : tensor<bf16, [batch, seq, 68]> scope "layers.0.mixer" by "decompose"
%16, %17, %18 = split(%15) {sizes = [16, 48, 4]} : tensor<bf16, [batch, seq, 16]>, tensor<bf16, [batch, seq, 48]>, tensor<bf16, [batch, seq, 4]> scope "layers.0.mixer" by "decompose"
%19, %layers.0.conv.next = causal_conv1d(%17, %layers.0.mixer.conv1d, %layers.0.mixer.conv1d_bias, %layers.0.conv, %seq_lens) : tensor<bf16, [batch, seq, 48]>, tensor<bf16, [batch, 48, 3]> scope "layers.0.mixer" by "decompose"
%20 = activation(%19) {kind = "silu"} : tensor<bf16, [batch, seq, 48]> scope "layers.0.mixer" by "decompose"
%21, %22, %23 = split(%20) {sizes = [16, 16, 16]} : tensor<bf16, [batch, seq, 16]>, tensor<bf16, [batch, seq, 16]>, tensor<bf16, [batch, seq, 16]> scope "layers.0.mixer" by "decompose"
%24, %layers.0.ssm.next = ssd_chunk_scan(%21, %18, %layers.0.mixer.A_log, %22, %23, %layers.0.mixer.D, %layers.0.mixer.dt_bias, %layers.0.ssm, %seq_lens) {chunk_size = 8, dt_max = inf, dt_min = 0.001, head_dim = 4, n_groups = 2, num_heads = 4, state_size = 8} : tensor<f32, [batch, seq, 16]>, tensor<f32, [batch, 4, 4, 8]> scope "layers.0.mixer" by "decompose"
%25 = gated_rms_norm(%24, %16, %layers.0.mixer.norm) {eps = 1e-05, group_size = 8} : tensor<f32, [batch, seq, 16]> scope "layers.0.mixer" by "decompose"
%26 = cast(%25) {dtype = "bf16"} : tensor<bf16, [batch, seq, 16]> scope "layers.0.mixer" by "decompose"
%2 = linear(%26, %layers.0.mixer.out_proj, _) : tensor<bf16, [batch, seq, 16]> scope "layers.0.mixer" by "decompose"
%3 = add(%0, %2) : tensor<bf16, [batch, seq, 16]> scope "layers.0" by "import"
%4 = rms_norm(%3, %layers.1.norm) {eps = 1e-05} : tensor<bf16, [batch, seq, 16]> scope "layers.1.norm" by "import"
%27 = linear(%4, %layers.1.mixer.q_proj, _) : tensor<bf16, [batch, seq, 16]> scope "layers.1.mixer" by "decompose"
%28 = linear(%4, %layers.1.mixer.k_proj, _) : tensor<bf16, [batch, seq, 8]> scope "layers.1.mixer" by "decompose"
%29 = linear(%4, %layers.1.mixer.v_proj, _) : tensor<bf16, [batch, seq, 8]> scope "layers.1.mixer" by "decompose"
%30, %layers.1.k.next, %layers.1.v.next = attention_gqa(%27, %28, %29, %layers.1.k, %layers.1.v, %cache_lens, _, _) {head_dim = 4, num_heads = 4, num_kv_heads = 2, scale = 0.5} : tensor<bf16, [batch, seq, 16]>, tensor<bf16, [batch, 2, ctx, 4]>, tensor<bf16, [batch, 2, ctx, 4]> scope "layers.1.mixer" by "decompose"
%5 = linear(%30, %layers.1.mixer.o_proj, _) : tensor<bf16, [batch, seq, 16]> scope "layers.1.mixer" by "decompose"
%6 = add(%3, %5) : tensor<bf16, [batch, seq, 16]> scope "layers.1" by "import"
%7 = rms_norm(%6, %layers.2.norm) {eps = 1e-05} : tensor<bf16, [batch, seq, 16]> scope "layers.2.norm" by "import"
%31, %32 = moe_router(%7, %layers.2.mixer.router, %layers.2.mixer.router_bias) {n_group = 1, norm_topk_prob = true, routed_scaling_factor = 1.0, top_k = 2, topk_group = 1} : tensor<f32, [batch, seq, 2]>, tensor<i64, [batch, seq, 2]> scope "layers.2.mixer" by "decompose"
%33, %34, %35 = moe_dispatch(%7, %32) {num_experts = 4} : tensor<bf16, [routed, 16]>, tensor<i64, [5]>, tensor<i64, [routed]> scope "layers.2.mixer" by "decompose"
%36 = grouped_gemm(%33, %34, %layers.2.mixer.experts_up) : tensor<bf16, [routed, 8]> scope "layers.2.mixer" by "decompose"
%37 = activation(%36) {kind = "relu2"} : tensor<bf16, [routed, 8]> scope "layers.2.mixer" by "decompose"
%38 = grouped_gemm(%37, %34, %layers.2.mixer.experts_down) : tensor<bf16, [routed, 16]> scope "layers.2.mixer" by "decompose"
%39 = moe_combine(%38, %35, %31) : tensor<bf16, [batch, seq, 16]> scope "layers.2.mixer" by "decompose"
%40 = linear(%7, %layers.2.mixer.shared_up, _) : tensor<bf16, [batch, seq, 12]> scope "layers.2.mixer" by "decompose"
%41 = activation(%40) {kind = "relu2"} : tensor<bf16, [batch, seq, 12]> scope "layers.2.mixer" by "decompose"
%42 = linear(%41, %layers.2.mixer.shared_down, _) : tensor<bf16, [batch, seq, 16]> scope "layers.2.mixer" by "decompose"
%8 = add(%39, %42) : tensor<bf16, [batch, seq, 16]> scope "layers.2.mixer" by "decompose"
%9 = add(%6, %8) : tensor<bf16, [batch, seq, 16]> scope "layers.2" by "import"
"""

GOLDEN_STATES = """
dim batch : [1, 256]
dim seq : [1, 131072]
dim ctx : [0, 131072]
dim routed : [0, 67108864]
state %layers.0.conv : conv tensor<bf16, [batch, 48, 3]> -> %layers.0.conv.next
state %layers.0.ssm : ssm tensor<f32, [batch, 4, 4, 8]> -> %layers.0.ssm.next
state %layers.1.k : kv tensor<bf16, [batch, 2, ctx, 4]> -> %layers.1.k.next
state %layers.1.v : kv tensor<bf16, [batch, 2, ctx, 4]> -> %layers.1.v.next
"""


def test_golden_text_of_a_tiny_model_after_decompose() -> None:
    graph = Decompose().apply(build_block_graph(config_from_dict(TINY), BF16)).graph
    lines = [line.strip() for line in print_graph(graph).splitlines()]
    ops = [line for line in lines if line.startswith("%")]
    golden = GOLDEN_MAMBA_AND_MOE.strip().splitlines()
    assert ops[: len(golden)] == golden
    assert [line for line in lines if line.startswith(("state ", "dim "))] == GOLDEN_STATES.strip().splitlines()


# ---------------------------------------------------------------- parse errors


GOOD = print_graph(_with_input_type(TensorType(F32, ("batch", 4))))  # line 2 is the input line


@pytest.mark.parametrize(
    ("replace", "with_", "line", "message"),
    [
        ("tensor<f32, [batch, 4]>", "tensor<f32, [batch, 4]> $", 2, "cannot read"),
        ("input", "inptu", 2, "unexpected 'inptu'"),
        ("[batch, 4]", "[batch, -4]", 2, "dimension"),
        ("[batch, 4]", "[batch 4]", 2, "expected ','"),
        ("output %x", "output x", 3, "expected a val"),
        ("}", "}\n}", 5, "after the end"),
        ("tensor<f32", "tensor<f8", 2, "dtype 'f8'"),
        ("[batch, 4]", "[Batch, 4]", 2, "Batch"),
    ],
)
def test_parse_errors_name_the_line(replace: str, with_: str, line: int, message: str) -> None:
    assert replace in GOOD
    with pytest.raises(IRError) as info:
        parse_graph(GOOD.replace(replace, with_, 1))
    assert re.match(rf"line {line}: ", str(info.value)), str(info.value)
    assert message in str(info.value)


def test_parse_error_for_a_state_of_unknown_kind_names_the_line() -> None:
    text = GOOD.replace("  output", "  state %s : cache tensor<f32, [4]>\n  output")
    with pytest.raises(IRError, match=r"^line 3: .*'cache'"):
        parse_graph(text)


def test_parse_error_for_result_and_type_counts_names_the_line() -> None:
    text = GOOD.replace("  output", '  %a, %b = split(%x) {sizes = [2, 2]} : tensor<f32, [2]> scope "" by "t"\n  output')
    with pytest.raises(IRError, match=r"^line 3: split has 2 results but 1 types"):
        parse_graph(text)


def test_unterminated_graph_is_reported_at_the_end_of_text() -> None:
    with pytest.raises(IRError, match="end of text"):
        parse_graph(GOOD.rstrip().removesuffix("}"))
    with pytest.raises(IRError, match="end of text"):
        parse_graph("")

