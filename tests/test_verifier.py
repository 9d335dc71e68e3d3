"""The verifier: each way a graph can be malformed is rejected with an IRError that names the graph
and quotes the op at fault (marked `>>`) between its neighbours."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nemocompile.base.errors import IRError
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.config import config_from_dict, load_config
from nemocompile.graph.ir import Attrs, AttrValue, Graph, Op, StateSlot, Value, Weight
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.opdef import opdef
from nemocompile.graph.text import format_op
from nemocompile.graph.types import (
    BF16,
    F32,
    FP8_E4M3,
    FP8_SCALED,
    I64,
    NVFP4,
    NVFP4_CODES,
    DType,
    Sharding,
    TensorType,
)
from nemocompile.graph.verifier import verify
from nemocompile.passes.decompose import Decompose
from nemocompile.passes.specialize_decode import SpecializeDecode

TINY = {
    "model_type": "nemotron_h", "hybrid_override_pattern": "M*E-", "vocab_size": 64, "hidden_size": 16,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 24,
    "mamba_num_heads": 4, "mamba_head_dim": 4, "n_groups": 2, "ssm_state_size": 8, "conv_kernel": 4,
    "chunk_size": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    "moe_shared_expert_intermediate_size": 12,
}


@pytest.fixture(scope="module")
def core() -> Graph:
    """A well-formed core-op graph with every kind of op and state slot."""
    return Decompose().apply(build_block_graph(config_from_dict(TINY), BF16)).graph


def _index(graph: Graph, opname: str) -> int:
    return next(i for i, op in enumerate(graph.ops) if op.opname == opname)


def _with_attrs(op: Op, **changes: AttrValue) -> Op:
    values = {k: v for k, v in op.attrs.items if k not in changes}
    values.update({k: v for k, v in changes.items() if v is not None})
    return dataclasses.replace(op, attrs=Attrs.of(values))


def _replace_op(graph: Graph, index: int, op: Op) -> Graph:
    return dataclasses.replace(graph, ops=(*graph.ops[:index], op, *graph.ops[index + 1 :]))


def assert_rejected(graph: Graph, index: int, op: Op, message: str, after: str | None = None) -> str:
    """Replace op `index` with `op`; the verifier must reject it, quoting it and its neighbours."""
    broken = _replace_op(graph, index, op)
    with pytest.raises(IRError) as info:
        verify(broken, after=after)
    text = str(info.value)
    assert f"graph {graph.name}" in text
    assert message in text, text
    lines = text.splitlines()
    assert f">> {format_op(op)}" in lines, text
    for neighbour in (index - 2, index - 1, index + 1, index + 2):
        if 0 <= neighbour < len(broken.ops):
            assert f"   {format_op(broken.ops[neighbour])}" in lines, text
    assert sum(line.startswith(">>") for line in lines) == 1
    return text


# ---------------------------------------------------------------- rejections of one op


def test_use_before_def(core: Graph) -> None:
    i = _index(core, "ssd_chunk_scan")
    later = core.ops[i + 1].result.name
    op = core.ops[i]
    assert_rejected(core, i, dataclasses.replace(op, operands=(later, *op.operands[1:])),
                    f"%{later} is used before it is defined")


def test_use_of_a_name_defined_nowhere(core: Graph) -> None:
    i = _index(core, "add")
    op = core.ops[i]
    assert_rejected(core, i, dataclasses.replace(op, operands=("nowhere", op.operands[1])),
                    "%nowhere is used before it is defined")


def test_unknown_op(core: Graph) -> None:
    i = _index(core, "gated_rms_norm")
    assert_rejected(core, i, dataclasses.replace(core.ops[i], opname="frobnicate"), "unknown op 'frobnicate'")


def test_wrong_operand_count(core: Graph) -> None:
    i = _index(core, "linear")
    op = core.ops[i]
    assert op.operands[2] is None
    declared = len(opdef("linear").operands)
    assert_rejected(core, i, dataclasses.replace(op, operands=op.operands[:2]), f"linear takes {declared} operands")
    assert_rejected(core, i, dataclasses.replace(op, operands=(*op.operands, op.operands[0])),
                    f"got {declared + 1}")


def test_missing_required_operand(core: Graph) -> None:
    i = _index(core, "ssd_chunk_scan")
    op = core.ops[i]
    operands = list(op.operands)
    operands[2] = None
    assert_rejected(core, i, dataclasses.replace(op, operands=tuple(operands)),
                    "operand 'A_log' of ssd_chunk_scan is required")


def test_missing_attribute(core: Graph) -> None:
    i = _index(core, "rms_norm")
    op = core.ops[i]
    assert_rejected(core, i, dataclasses.replace(op, attrs=Attrs()), "missing attribute 'eps'")


def test_unknown_attribute(core: Graph) -> None:
    i = _index(core, "rms_norm")
    assert_rejected(core, i, _with_attrs(core.ops[i], epsilon=1e-5), "unknown attribute 'epsilon'")


@pytest.mark.parametrize(
    ("opname", "attr", "value"),
    [
        ("rms_norm", "eps", "small"),
        ("rms_norm", "eps", True),
        ("ssd_chunk_scan", "num_heads", 4.0),
        ("moe_router", "top_k", True),
        ("moe_router", "norm_topk_prob", 1),
        ("split", "sizes", 16),
        ("causal_conv1d", "activation", 3),
        ("cast", "dtype", None),
    ],
)
def test_wrong_typed_or_absent_attribute(core: Graph, opname: str, attr: str, value: AttrValue) -> None:
    i = _index(core, opname)
    expected = f"missing attribute '{attr}'" if value is None else f"attribute '{attr}' must be"
    assert_rejected(core, i, _with_attrs(core.ops[i], **{attr: value}), expected)


@pytest.mark.parametrize(
    ("opname", "new_type"),
    [
        ("linear", TensorType(F32, ("batch", "seq", 68))),  # wrong dtype
        ("linear", TensorType(BF16, ("batch", "seq", 69))),  # wrong width
        ("ssd_chunk_scan", TensorType(BF16, ("batch", "seq", 16))),  # the scan returns f32
        ("embedding", TensorType(BF16, ("batch", "seq", 16), Sharding("tp", 2, 2))),  # wrong sharding
    ],
)
def test_declared_result_type_disagrees_with_inference(core: Graph, opname: str, new_type: TensorType) -> None:
    i = _index(core, opname)
    op = core.ops[i]
    bad = dataclasses.replace(op, results=(Value(op.results[0].name, new_type), *op.results[1:]))
    assert_rejected(core, i, bad, f"{opname} declares result types {new_type}")


def test_wrong_number_of_results(core: Graph) -> None:
    i = _index(core, "split")
    op = core.ops[i]
    assert_rejected(core, i, dataclasses.replace(op, results=op.results[:2]), "split declares 2 results, its operands give 3")


def _with_operand(op: Op, name: str, value: str) -> Op:
    operands = list(op.operands)
    operands[opdef(op.opname).index_of(name)] = value
    return dataclasses.replace(op, operands=tuple(operands))


def test_state_operand_must_be_a_state_slot(core: Graph) -> None:
    i = _index(core, "causal_conv1d")
    activation = core.ops[i].operands[0]
    assert activation is not None
    assert_rejected(core, i, _with_operand(core.ops[i], "conv_state", activation),
                    f"operand 'conv_state' of causal_conv1d must be a state slot of the graph, not %{activation}")


@pytest.mark.parametrize(("opname", "operand_name", "slot", "message"),
                         [("causal_conv1d", "conv_state", "layers.0.ssm", "causal_conv1d state"),
                          ("ssd_chunk_scan", "ssm_state", "layers.1.k", "ssm_state tensor<"),
                          ("attention_gqa", "k_cache", "layers.0.conv", "k_cache tensor<")])
def test_state_slot_of_the_wrong_shape(core: Graph, opname: str, operand_name: str, slot: str,
                                       message: str) -> None:
    i = _index(core, opname)
    assert_rejected(core, i, _with_operand(core.ops[i], operand_name, slot), message)


def test_state_without_update_or_with_a_mistyped_one(core: Graph) -> None:
    slot = core.states[0]
    no_update = dataclasses.replace(core, states=(dataclasses.replace(slot, update=""), *core.states[1:]))
    with pytest.raises(IRError, match=rf"state %{slot.name} has no update"):
        verify(no_update)
    wrong = dataclasses.replace(core, states=(dataclasses.replace(slot, update="logits"), *core.states[1:]))
    with pytest.raises(IRError, match=rf"state %{slot.name} is .* but its update %logits is"):
        verify(wrong)


def test_every_symbolic_dim_is_bounded(core: Graph) -> None:
    assert {d.name for d in core.dims} == {"batch", "seq", "ctx", "routed"}
    unbounded = dataclasses.replace(core, dims=tuple(d for d in core.dims if d.name != "ctx"))
    with pytest.raises(IRError, match="symbolic dim 'ctx', which has no bound"):
        verify(unbounded)


def test_duplicate_definition_of_an_op_result(core: Graph) -> None:
    i = _index(core, "add")
    op = core.ops[i]
    earlier = core.ops[i - 1].result.name
    assert_rejected(core, i, dataclasses.replace(op, results=(Value(earlier, op.result.type),)),
                    f"%{earlier} is defined twice")


def test_op_result_that_shadows_a_weight(core: Graph) -> None:
    i = _index(core, "rms_norm")
    op = core.ops[i]
    assert_rejected(core, i, dataclasses.replace(op, results=(Value("norm_f", op.result.type),)),
                    "%norm_f is defined twice")


def test_verify_hook_rejections(core: Graph) -> None:
    i = _index(core, "activation")
    assert_rejected(core, i, _with_attrs(core.ops[i], kind="gelu"), "activation kind 'gelu'")
    i = _index(core, "ssd_chunk_scan")
    assert_rejected(core, i, _with_attrs(core.ops[i], num_heads=3), "expected num_heads * head_dim = 12")
    i = _index(core, "moe_router")
    assert_rejected(core, i, _with_attrs(core.ops[i], top_k=5), "top_k 5 exceeds the 4 experts")


def test_shape_inference_errors_are_quoted(core: Graph) -> None:
    i = _index(core, "split")
    assert_rejected(core, i, _with_attrs(core.ops[i], sizes=(16, 48, 5)), "do not sum to the last dim")
    i = _index(core, "cast")
    assert_rejected(core, i, _with_attrs(core.ops[i], dtype="f8"), "unknown dtype 'f8'")


def test_split_sizes_that_are_not_ints_are_an_irerror(core: Graph) -> None:
    i = _index(core, "split")
    assert_rejected(core, i, _with_attrs(core.ops[i], sizes=("a", "b", "c")), "sizes")


def test_operand_of_the_wrong_rank_is_an_irerror(core: Graph) -> None:
    # A 1-D embedding table: shape inference must report it, not crash with an IndexError.
    table = Weight("flat_table", TensorType(BF16, (64,)), "embeddings")
    graph = dataclasses.replace(core, weights=(*core.weights, table))
    op = core.ops[0]
    assert op.opname == "embedding"
    assert_rejected(graph, 0, dataclasses.replace(op, operands=(op.operands[0], "flat_table")), "")


def test_verify_after_a_pass_names_the_pass(core: Graph) -> None:
    i = _index(core, "rms_norm")
    text = assert_rejected(core, i, dataclasses.replace(core.ops[i], attrs=Attrs()), "missing attribute",
                           after="fuse_router")
    assert text.startswith(f"graph {core.name} after pass 'fuse_router': ")


# ---------------------------------------------------------------- graph-level rejections


def test_undefined_output(core: Graph) -> None:
    with pytest.raises(IRError, match=r"graph nemotron_h: output %missing is not defined"):
        verify(dataclasses.replace(core, outputs=(*core.outputs, "missing")))


def test_graph_without_outputs(core: Graph) -> None:
    with pytest.raises(IRError, match="has no outputs"):
        verify(dataclasses.replace(core, outputs=()))


def test_weight_defined_twice(core: Graph) -> None:
    with pytest.raises(IRError, match=r"%norm_f is defined twice"):
        verify(dataclasses.replace(core, weights=(*core.weights, core.weight_map()["norm_f"])))


def test_input_and_weight_with_the_same_name(core: Graph) -> None:
    clash = Weight("input_ids", TensorType(I64, (4,)), "embeddings")
    with pytest.raises(IRError, match=r"%input_ids is defined twice"):
        verify(dataclasses.replace(core, weights=(*core.weights, clash)))


def test_state_declared_twice(core: Graph) -> None:
    with pytest.raises(IRError, match=r"state layers\.0\.ssm is declared twice"):
        verify(dataclasses.replace(core, states=(*core.states, core.state_map()["layers.0.ssm"])))


def test_weight_with_a_symbolic_shape(core: Graph) -> None:
    bad = Weight("dynamic", TensorType(BF16, ("batch", 4)), "mlp")
    with pytest.raises(IRError, match=r"weight has a symbolic shape: weight %dynamic"):
        verify(dataclasses.replace(core, weights=(*core.weights, bad)))


# ---------------------------------------------------------------- acceptance


def test_accepts_block_core_and_decode_graphs(core: Graph) -> None:
    block = build_block_graph(config_from_dict(TINY), BF16)
    decode = SpecializeDecode().apply(core).graph
    for graph in (block, core, decode):
        assert verify(graph) is graph
        assert verify(graph, after="anything") is graph


@pytest.mark.parametrize("name", ["nano", "super", "ultra"])
def test_accepts_published_models(name: str) -> None:
    config, _ = load_config(Path(f"/work/shared/models/{name}.json"))
    block = build_block_graph(config, BF16)
    assert verify(block) is block
    core = Decompose().apply(block).graph
    assert verify(core) is core


def test_accepts_a_hand_built_graph_with_optional_operands_left_out() -> None:
    b = GraphBuilder("hand")
    x = b.input("x", TensorType(F32, ("batch", 8)))
    w = b.weight("w", TensorType(F32, (4, 8)), "mlp")
    bias = b.weight("b", TensorType(F32, (4,)), "mlp")
    b.state("s", "kv", TensorType(F32, ("batch", 1, "ctx", 4)), update="s")
    y = b.op1("linear", [x, w])
    z = b.op1("linear", [x, w, bias])
    b.output(b.op1("add", [y, z]))
    graph = b.build()
    assert verify(graph) is graph
    assert graph.ops[0].operands == ("x", "w", *(None,) * (len(opdef("linear").operands) - 2))
    assert isinstance(graph.states[0], StateSlot)


@pytest.mark.parametrize(("act_format", "weight_dtype", "codes_dtype", "other", "unscaled"), [
    ("fp8", FP8_SCALED, FP8_E4M3, "nvfp4", "E4M3 codes"),
    ("nvfp4", NVFP4, NVFP4_CODES, "fp8", "NVFP4 codes"),
])
def test_a_fused_norms_codes_are_read_only_by_a_quant_linear_of_their_format(
        act_format: str, weight_dtype: DType, codes_dtype: DType, other: str, unscaled: str) -> None:
    """add_rms_norm {act_format} types its output as codes (fp8: E4M3 codes; nvfp4: nvfp4codes, packed
    E2M1 codes and E4M3 block scales); a quant_linear of that act_format reads them with the input_scale
    (result in its out_dtype), while a plain linear, which has no scale, or a quant_linear of another
    format, is refused, and the verifier quotes a graph that has one."""
    b = GraphBuilder("codes")
    x = b.input("x", TensorType(BF16, ("batch", 32)))
    residual = b.input("residual", TensorType(BF16, ("batch", 32)))
    norm = b.weight("norm", TensorType(BF16, (32,)), "norms")
    w = b.weight("w", TensorType(weight_dtype, (4, 32)), "mlp")
    scale = b.weight("scale", TensorType(F32, ()), "activation_scales")
    codes, summed = b.op("add_rms_norm", [x, residual, norm, scale], {"eps": 1e-5, "act_format": act_format})
    assert b.type_of(codes) == TensorType(codes_dtype, ("batch", 32))
    y = b.op1("quant_linear", [codes, w, scale], {"act_format": act_format, "out_dtype": "bf16"})
    assert b.type_of(y) == TensorType(BF16, ("batch", 4))
    with pytest.raises(IRError, match=f"{unscaled} .* carry no"):
        b.op1("linear", [codes, w], {"out_dtype": "bf16"})
    with pytest.raises(IRError, match=f"needs act_format {act_format}"):
        b.op1("quant_linear", [codes, w, scale], {"act_format": other, "out_dtype": "bf16"})
    b.output(y)
    b.output(summed)
    graph = verify(b.build())
    assert graph.ops[1].opname == "quant_linear"
    linear = Op("linear", (codes, "w", None), graph.ops[1].results, Attrs.of({"out_dtype": "bf16"}))
    assert_rejected(graph, 1, linear, "carry no")
    assert_rejected(graph, 1, linear, unscaled)
