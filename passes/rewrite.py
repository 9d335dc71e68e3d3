"""Rewrite rules as data, and the engine that applies them.

A rule is a `Pattern` (an op name, patterns for some of its operands by name, required attribute
values, a predicate on a value's type, captures) and a `rewrite` function that emits the
replacement through a GraphBuilder. The engine walks the graph in program order, tries each rule
at each op (patterns match against the graph as rewritten so far, so a rule sees what earlier
rewrites made), re-emits every other op with its types re-inferred, removes dead ops, and repeats
until no rule fires. It returns how many rewrites each rule made.

A replacement keeps the names of the root op's results (`match.results`) that anything reads,
so the ops after it are untouched; ops the pattern matched below the root stay until dead-op
removal finds them unused. A fusion that must define the results of an op it absorbed (a
residual add whose sum later layers read, a conv whose state update is bound) takes that op back
with `builder.drop(op)` first, which is refused if anything emitted since reads it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

from nemocompile.base.errors import IRError
from nemocompile.graph.builder import GraphBuilder, rebuild_header
from nemocompile.graph.ir import AttrValue, Graph, Op
from nemocompile.graph.opdef import opdef
from nemocompile.graph.types import TensorType

from .base import Pass, PassOutput

# A predicate on a matched value: (the op producing it, None for inputs/weights/states; its type).
ValuePredicate = Callable[[Op | None, TensorType], bool]


@dataclass(frozen=True)
class Pattern:
    """What a value must be. `ops` None matches any value (an op result, input, weight or state);
    otherwise the value must be a result of an op named in `ops` whose operands match `operands`
    (by declared operand name) and whose attrs equal `attrs`. `absent` matches only a missing
    optional operand. `capture` names the matched value (and op) in the Match."""

    ops: frozenset[str] | None = None
    operands: tuple[tuple[str, Pattern], ...] = ()
    attrs: tuple[tuple[str, AttrValue], ...] = ()
    where: ValuePredicate | None = None
    capture: str | None = None
    absent: bool = False

    def __post_init__(self) -> None:
        if self.ops is not None:
            for name in self.ops:
                declared = opdef(name).operand_names
                unknown = [operand for operand, _ in self.operands if operand not in declared]
                assert not unknown, f"pattern on {name}: no operand {unknown[0]!r} (it has {declared})"
        assert not (self.absent and (self.ops or self.operands or self.capture)), "an absent operand matches nothing"


def op(opnames: str | Sequence[str], *, capture: str | None = None, attrs: Mapping[str, AttrValue] | None = None,
       where: ValuePredicate | None = None, **operands: Pattern) -> Pattern:
    """A pattern on an op: `op("linear", x=value("x"), weight=value("w"))`."""
    names = frozenset([opnames] if isinstance(opnames, str) else opnames)
    return Pattern(names, tuple(operands.items()), tuple(sorted((attrs or {}).items())), where, capture)


def value(capture: str | None = None, where: ValuePredicate | None = None) -> Pattern:
    """Any value, optionally captured and constrained by a predicate."""
    return Pattern(None, (), (), where, capture)


ABSENT = Pattern(absent=True)


@dataclass
class Match:
    """One match of a rule: the root op and the captures (value names; ops for op patterns)."""

    root: Op
    values: dict[str, str] = field(default_factory=dict)
    ops: dict[str, Op] = field(default_factory=dict)
    builder: GraphBuilder | None = None
    graph: Graph | None = None  # the graph being rewritten, for its def-use lookups

    @property
    def results(self) -> list[str]:
        """The root's result names: the replacement defines these."""
        return [r.name for r in self.root.results]

    def value(self, capture: str) -> str:
        return self.values[capture]

    def type(self, capture: str) -> TensorType:
        assert self.builder is not None
        return self.builder.type_of(self.values[capture])

    def users(self, capture: str) -> tuple[Op, ...]:
        """The ops that read the captured value in the graph being rewritten (a fusion that
        absorbs a producer checks it has no other user)."""
        assert self.graph is not None
        return self.graph.users(self.values[capture])


RewriteFn = Callable[[Match, GraphBuilder], None]


@dataclass(frozen=True)
class Rule:
    """A named rewrite: where `pattern` matches at an op (and `check`, if given, accepts the whole
    match), `rewrite` emits the replacement, which must define the root's result names."""

    name: str
    pattern: Pattern
    rewrite: RewriteFn
    check: Callable[[Match], bool] | None = None


def _match_value(pattern: Pattern, name: str | None, builder: GraphBuilder, found: Match) -> bool:
    if pattern.absent or name is None:
        return pattern.absent and name is None
    producer = builder.producer(name)
    if pattern.ops is not None and (producer is None or producer.opname not in pattern.ops):
        return False
    if pattern.where is not None and not pattern.where(producer, builder.type_of(name)):
        return False
    if pattern.ops is not None:
        assert producer is not None
        if not _match_op(pattern, producer, builder, found):
            return False
        if pattern.capture:
            found.ops[pattern.capture] = producer
    if pattern.capture:
        if found.values.get(pattern.capture, name) != name:  # one capture name binds one value
            return False
        found.values[pattern.capture] = name
    return True


def _match_op(pattern: Pattern, candidate: Op, builder: GraphBuilder, found: Match) -> bool:
    if any(candidate.attrs.get(key) != expected for key, expected in pattern.attrs):
        return False
    definition = opdef(candidate.opname)
    for operand_name, sub in pattern.operands:
        index = definition.index_of(operand_name)
        bound = candidate.operands[index] if index < len(candidate.operands) else None
        if not _match_value(sub, bound, builder, found):
            return False
    return True


def match(rule: Rule, candidate: Op, builder: GraphBuilder, graph: Graph | None = None) -> Match | None:
    """The match of `rule` rooted at `candidate`, whose operands are already in `builder`
    (patterns see the graph as rewritten so far); `graph` is the one being rewritten."""
    pattern = rule.pattern
    if pattern.ops is not None and candidate.opname not in pattern.ops:
        return None
    found = Match(candidate, builder=builder, graph=graph)
    if pattern.where is not None and not pattern.where(candidate, candidate.results[0].type):
        return None
    if not _match_op(pattern, candidate, builder, found):
        return None
    if pattern.capture:
        found.ops[pattern.capture] = candidate
        found.values[pattern.capture] = candidate.results[0].name
    if rule.check is not None and not rule.check(found):
        return None
    return found


def live_ops(graph: Graph) -> tuple[Op, ...]:
    """The ops whose results something uses: a graph output, a state slot's update, a later live
    op; an op that reads state is always kept."""
    needed = set(graph.outputs)
    needed.update(slot.update for slot in graph.states)
    kept: list[Op] = []
    for candidate in reversed(graph.ops):
        definition = opdef(candidate.opname)
        stateful = bool(definition.indices_with_role("state"))
        if stateful or any(r.name in needed for r in candidate.results):
            kept.append(candidate)
            needed.update(name for name in candidate.operands if name is not None)
    return tuple(reversed(kept))


def _read(graph: Graph, name: str) -> bool:
    """Whether something reads value `name`: an op, a graph output or a state slot's update."""
    return bool(graph.users(name)) or name in graph.outputs or any(slot.update == name for slot in graph.states)


def _sweep(graph: Graph, rules: Sequence[Rule], origin: str, counts: dict[str, int]) -> tuple[Graph, int]:
    builder = rebuild_header(graph, origin)
    fired = 0
    for candidate in graph.ops:
        for rule in rules:
            found = match(rule, candidate, builder, graph)
            if found is None:
                continue
            rule.rewrite(found, builder)
            missing = [name for name in found.results if not builder.has(name) and _read(graph, name)]
            if missing:
                raise IRError(f"rewrite rule {rule.name} at {candidate.scope or candidate.opname} did not define "
                              f"%{missing[0]}, a result of the {candidate.opname} it replaced")
            counts[rule.name] += 1
            fired += 1
            break
        else:
            builder.reemit(candidate)
    for name in graph.outputs:
        builder.output(name)
    built = builder.build()
    live = live_ops(built)
    if len(live) != len(built.ops):
        built = replace(built, ops=live)
    return built, fired


def rewrite(graph: Graph, rules: Sequence[Rule], origin: str, max_sweeps: int = 8) -> tuple[Graph, dict[str, int]]:
    """Apply `rules` until none fires; the new graph and how many rewrites each rule made."""
    names = [rule.name for rule in rules]
    assert len(set(names)) == len(names), f"rule names repeat: {names}"
    counts = dict.fromkeys(names, 0)
    for _ in range(max_sweeps):
        graph, fired = _sweep(graph, rules, origin, counts)
        if not fired:
            return graph, counts
    raise IRError(f"rewrite rules {', '.join(names)} still fired after {max_sweeps} sweeps; a rule must not "
                  "match its own replacement")


@dataclass(frozen=True)
class RewritePass(Pass):
    """A pass made of rules: its counts are the rule counts."""

    name: ClassVar[str] = "rewrite"

    def rules(self) -> Sequence[Rule]:
        raise NotImplementedError(f"pass {self.name} declares no rules")

    def apply(self, graph: Graph) -> PassOutput:
        rewritten, counts = rewrite(graph, self.rules(), self.name)
        return PassOutput(rewritten, counts)
