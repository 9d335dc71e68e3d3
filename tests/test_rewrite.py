"""The rewrite-rule engine (passes/rewrite.py) on small hand-made graphs: what patterns match
(op names, operands by name, attrs, type predicates, captures, absent operands), the count per
rule, dead-op removal, re-inferred types downstream, fixed-point iteration, and the errors for a
rule that leaves a result undefined or keeps matching its own replacement."""

from __future__ import annotations

import pytest

from nemocompile.base.errors import IRError
from nemocompile.graph.builder import GraphBuilder, rebuild_header
from nemocompile.graph.ir import Graph
from nemocompile.graph.types import BF16, F16, F32, TensorType
from nemocompile.graph.verifier import verify
from nemocompile.passes.rewrite import ABSENT, Match, RewritePass, Rule, live_ops, match, op, rewrite, value

X = TensorType(F32, ("batch", "seq", 16))


def mlp_graph(kind: str = "relu2") -> Graph:
    """x -> linear(w1) -> activation -> linear(w2) -> add x"""
    b = GraphBuilder("mlp", origin="test")
    b.input("x", X)
    b.weight("w1", TensorType(F32, (16, 16)), "mlp")
    b.weight("w2", TensorType(F32, (16, 16)), "mlp")
    h = b.op1("linear", ["x", "w1"])
    a = b.op1("activation", [h], {"kind": kind})
    y = b.op1("linear", [a, "w2"])
    b.output(b.op1("add", [y, "x"]))
    return b.build()


def cast_graph() -> Graph:
    """x -> cast bf16 -> activation -> output: the activation's type follows the cast."""
    b = GraphBuilder("casts", origin="test")
    b.input("x", X)
    c = b.op1("cast", ["x"], {"dtype": "bf16"})
    b.output(b.op1("activation", [c], {"kind": "silu"}))
    return b.build()


def _relu2_to_silu(m: Match, b: GraphBuilder) -> None:
    b.reemit(m.root, attrs={"kind": "silu"})


RELU2_TO_SILU = Rule("relu2_to_silu", op("activation", attrs={"kind": "relu2"}), _relu2_to_silu)


def test_a_rule_rewrites_what_its_attrs_pattern_names_and_counts_it() -> None:
    graph, counts = rewrite(mlp_graph("relu2"), [RELU2_TO_SILU], "test")
    assert counts == {"relu2_to_silu": 1}
    assert [a.attrs.str("kind") for a in graph.ops_named("activation")] == ["silu"]
    assert next(graph.ops_named("activation")).origin == "test"
    assert verify(graph) is graph
    untouched, counts = rewrite(mlp_graph("silu"), [RELU2_TO_SILU], "test")
    assert counts == {"relu2_to_silu": 0}
    assert untouched == mlp_graph("silu")  # nothing matched: the same ops, provenance kept


def _skip_activation(m: Match, b: GraphBuilder) -> None:
    b.op("linear", [m.value("h"), m.value("w")], scope=m.root.scope, result_names=m.results)


SKIP_ACTIVATION = Rule("skip_activation", op("linear", x=op("activation", x=value("h"), capture="act"),
                                               weight=value("w")), _skip_activation)


def test_operand_sub_patterns_capture_values_and_dead_ops_are_removed() -> None:
    before = mlp_graph()
    graph, counts = rewrite(before, [SKIP_ACTIVATION], "test")
    assert counts == {"skip_activation": 1}
    assert graph.op_counts() == {"add": 1, "linear": 2}  # the activation no longer has a user
    second = list(graph.ops_named("linear"))[1]
    assert second.operands[:2] == (next(graph.ops_named("linear")).result.name, "w2")
    assert second.result.name == list(before.ops_named("linear"))[1].result.name  # root's name kept
    verify(graph)


def test_the_match_exposes_captured_ops_values_and_types() -> None:
    graph = mlp_graph()
    builder = rebuild_header(graph, "test")
    for candidate in graph.ops[:2]:
        builder.reemit(candidate)
    found = match(SKIP_ACTIVATION, graph.ops[2], builder)
    assert found is not None
    assert found.ops["act"] is graph.ops[1]
    assert found.values == {"h": graph.ops[0].result.name, "act": graph.ops[1].result.name, "w": "w2"}
    assert found.type("w") == TensorType(F32, (16, 16))
    assert match(SKIP_ACTIVATION, graph.ops[0], builder) is None  # x of the first linear is an input


def test_a_check_can_ask_the_graph_who_else_reads_a_captured_value() -> None:
    # linear(x=activation(h)) where the activation has one user: the skip may absorb it.
    only_user = Rule("only_user", SKIP_ACTIVATION.pattern, _skip_activation,
                     check=lambda m: m.users("act") == (m.root,))
    assert rewrite(mlp_graph(), [only_user], "test")[1] == {"only_user": 1}
    b = GraphBuilder("shared", origin="test")
    b.input("x", X)
    b.weight("w", TensorType(F32, (16, 16)), "mlp")
    a = b.op1("activation", ["x"], {"kind": "silu"})
    b.output(b.op1("add", [b.op1("linear", [a, "w"]), a]))  # the activation has a second user
    graph, counts = rewrite(b.build(), [only_user], "test")
    assert counts == {"only_user": 0} and graph.op_counts()["activation"] == 1


def test_a_type_predicate_and_a_whole_match_check_restrict_the_rule() -> None:
    wide_only = Rule("wide", op("linear", weight=value("w", where=lambda _, t: t.shape[0] > 16)), _skip_activation)
    assert rewrite(mlp_graph(), [wide_only], "test")[1] == {"wide": 0}
    refused = Rule("refused", SKIP_ACTIVATION.pattern, _skip_activation, check=lambda m: m.value("w") == "w1")
    assert rewrite(mlp_graph(), [refused], "test")[1] == {"refused": 0}


def test_one_capture_name_binds_one_value() -> None:
    same = Rule("same", op("add", a=value("v"), b=value("v")),
                lambda m, b: b.op("activation", [m.value("v")], {"kind": "silu"}, result_names=m.results))
    assert rewrite(mlp_graph(), [same], "test")[1] == {"same": 0}  # add(y, x): two different values
    b = GraphBuilder("double", origin="test")
    b.input("x", X)
    b.output(b.op1("add", ["x", "x"]))
    assert rewrite(b.build(), [same], "test")[1] == {"same": 1}


def test_absent_matches_only_a_missing_optional_operand() -> None:
    def add_bias(m: Match, b: GraphBuilder) -> None:
        weight = m.value("w")
        bias = f"{weight}.bias" if b.has(f"{weight}.bias") else b.weight(f"{weight}.bias", TensorType(F32, (16,)), "mlp")
        b.reemit(m.root, operands=[m.root.operands[0], weight, bias])

    no_bias = Rule("no_bias", op("linear", weight=value("w"), bias=ABSENT), add_bias)
    assert rewrite(mlp_graph(), [no_bias], "test")[1] == {"no_bias": 2}
    b = GraphBuilder("biased", origin="test")
    b.input("x", X)
    b.weight("w", TensorType(F32, (16, 16)), "mlp")
    b.weight("bias", TensorType(F32, (16,)), "mlp")
    b.output(b.op1("linear", ["x", "w", "bias"]))
    assert rewrite(b.build(), [no_bias], "test")[1] == {"no_bias": 0}


def test_types_after_a_rewrite_are_inferred_again() -> None:
    to_f16 = Rule("to_f16", op("cast", attrs={"dtype": "bf16"}), lambda m, b: b.reemit(m.root, attrs={"dtype": "f16"}))
    graph, counts = rewrite(cast_graph(), [to_f16], "test")
    assert counts == {"to_f16": 1}
    assert cast_graph().value_types()[cast_graph().outputs[0]].dtype == BF16
    assert graph.value_types()[graph.outputs[0]].dtype == F16
    verify(graph)


def test_rules_run_to_a_fixed_point_each_counted_once_per_rewrite() -> None:
    # relu2 -> silu makes the second rule's pattern appear; both fire, in the first sweep.
    silu_to_relu_free = Rule("silu_skip", op("linear", x=op("activation", attrs={"kind": "silu"}, x=value("h")),
                                             weight=value("w")), _skip_activation)
    graph, counts = rewrite(mlp_graph("relu2"), [RELU2_TO_SILU, silu_to_relu_free], "test")
    assert counts == {"relu2_to_silu": 1, "silu_skip": 1}
    assert "activation" not in graph.op_counts()


def test_a_rule_that_matches_its_own_replacement_is_refused() -> None:
    forever = Rule("forever", op("activation"), lambda m, b: b.reemit(m.root))
    with pytest.raises(IRError, match="still fired after 3 sweeps"):
        rewrite(mlp_graph(), [forever], "test", max_sweeps=3)


def test_a_rule_that_leaves_the_root_result_undefined_is_named() -> None:
    lossy = Rule("lossy", op("activation"), lambda m, b: None)
    with pytest.raises(IRError, match="rewrite rule lossy at activation did not define"):
        rewrite(mlp_graph(), [lossy], "test")


def test_rule_names_must_be_unique() -> None:
    with pytest.raises(AssertionError, match="rule names repeat"):
        rewrite(mlp_graph(), [RELU2_TO_SILU, RELU2_TO_SILU], "test")


def test_a_pattern_naming_an_unknown_operand_is_refused_when_written() -> None:
    with pytest.raises(AssertionError, match="no operand 'input'"):
        op("linear", input=value())


def test_live_ops_keeps_outputs_and_what_they_read() -> None:
    b = GraphBuilder("dead", origin="test")
    b.input("x", X)
    b.op1("activation", ["x"], {"kind": "silu"})  # no user
    b.output(b.op1("activation", ["x"], {"kind": "relu2"}))
    graph = b.build()
    assert [o.attrs.str("kind") for o in live_ops(graph)] == ["relu2"]


def test_a_rewrite_pass_reports_its_rule_counts() -> None:
    class Relu2ToSilu(RewritePass):
        name = "relu2_to_silu"

        def rules(self) -> tuple[Rule, ...]:
            return (RELU2_TO_SILU,)

    output = Relu2ToSilu().apply(mlp_graph())
    assert output.counts == {"relu2_to_silu": 1}
    assert {o.origin for o in output.graph.ops} == {"test", "relu2_to_silu"}


def test_builder_numbering_continues_after_existing_names() -> None:
    graph = mlp_graph()
    builder = rebuild_header(graph, "test")
    assert int(builder.fresh()) == max(int(o.result.name) for o in graph.ops) + 1
    builder.number_after(["7", "x", "41"])
    assert builder.fresh() == "42"
    assert F32 is X.dtype
