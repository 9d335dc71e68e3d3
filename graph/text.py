"""The IR's text form. `print_graph` and `parse_graph` round-trip: parse(print(g)) == g.

    graph nemotron_h {
      meta "model_type" = "nemotron_h"
      input %input_ids : tensor<i64, [batch, seq]>
      weight %embeddings : tensor<bf16, [64, 32]> category "embeddings" from bf16 "model.safetensors" : "backbone.embeddings.weight"
      dim ctx : [0, 131072]
      state %layers.1.k : kv tensor<bf16, [batch, 2, ctx, 8]> -> %layers.1.k.next
      %0 = embedding(%input_ids, %embeddings) : tensor<bf16, [batch, seq, 32]> scope "embeddings" by "import"
      %1, %2 = split(%0) {sizes = [8, 24]} : tensor<...>, tensor<...> scope "layers.0.mixer" by "decompose"
      output %logits
    }

Lines starting with `#` are comments. An absent optional operand prints as `_`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from nemocompile.base.errors import IRError

from .ir import Attrs, AttrValue, DimBound, Graph, Op, StateSlot, TensorSource, Value, Weight
from .types import Dim, Sharding, TensorType, dtype_named

# ---------------------------------------------------------------- printing


def format_attr(value: AttrValue) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(format_attr(v) for v in value) + "]"


def format_attrs(attrs: Attrs) -> str:
    if not attrs.items:
        return ""
    return " {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in attrs.items) + "}"


def format_op(op: Op) -> str:
    results = ", ".join(f"%{r.name}" for r in op.results)
    operands = ", ".join("_" if o is None else f"%{o}" for o in op.operands)
    types = ", ".join(str(r.type) for r in op.results)
    return (f"{results} = {op.opname}({operands}){format_attrs(op.attrs)} : {types}"
            f" scope {json.dumps(op.scope)} by {json.dumps(op.origin)}")


def format_weight(weight: Weight) -> str:
    line = f"weight %{weight.name} : {weight.type} category {json.dumps(weight.category)}"
    if weight.sources:
        assert weight.source_dtype is not None
        line += f" from {weight.source_dtype} " + ", ".join(f"{json.dumps(s.file)} : {json.dumps(s.tensor)}" for s in weight.sources)
    return line


def print_graph(graph: Graph) -> str:
    lines = [f"graph {graph.name} {{"]
    lines += [f"  meta {json.dumps(k)} = {json.dumps(v)}" for k, v in graph.metadata]
    lines += [f"  input %{v.name} : {v.type}" for v in graph.inputs]
    lines += [f"  {format_weight(w)}" for w in graph.weights]
    lines += [f"  dim {d.name} : [{d.low}, {d.high}]" for d in graph.dims]
    lines += [f"  state %{s.name} : {s.kind} {s.type}" + (f" -> %{s.update}" if s.update else "")
              for s in graph.states]
    lines += [f"  {format_op(op)}" for op in graph.ops]
    lines += [f"  output %{name}" for name in graph.outputs]
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- parsing

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<val>%[A-Za-z0-9_.]+)
      | (?P<num>-?(?:inf|nan)(?![A-Za-z0-9_])|-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
      | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>->|[{}()\[\]<>,:=/])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    line: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("#"):
            continue
        pos = 0
        while pos < len(line):
            if not line[pos:].strip():
                break
            match = _TOKEN.match(line, pos)
            if not match or match.end() == pos:
                raise IRError(f"line {line_no}: cannot read IR text at {line[pos:].strip()[:30]!r}")
            kind = match.lastgroup
            assert kind is not None
            tokens.append(_Token(kind, match.group(kind), line_no))
            pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def error(self, message: str) -> IRError:
        token = self.peek()
        where = f"line {token.line}" if token else "end of text"
        return IRError(f"{where}: {message}")

    def next(self) -> _Token:
        token = self.peek()
        if token is None:
            raise self.error("unexpected end of IR text")
        self.pos += 1
        return token

    def expect(self, text: str) -> None:
        token = self.next()
        if token.text != text:
            self.pos -= 1
            raise self.error(f"expected '{text}', found '{token.text}'")

    def accept(self, text: str) -> bool:
        token = self.peek()
        if token is not None and token.text == text:
            self.pos += 1
            return True
        return False

    def kind(self, kind: str) -> str:
        token = self.next()
        if token.kind != kind:
            self.pos -= 1
            raise self.error(f"expected a {kind}, found '{token.text}'")
        return token.text

    def string(self) -> str:
        return self.string_literal(self.kind("str"))

    def string_literal(self, text: str) -> str:
        try:
            return str(json.loads(text))
        except ValueError:  # a control character or a bad escape inside the quotes
            self.pos -= 1
            raise self.error(f"invalid string literal {text[:40]!r}") from None

    def value_name(self) -> str:
        return self.kind("val")[1:]

    def dim(self) -> Dim:
        token = self.next()
        if token.kind == "num" and token.text.isdigit():
            return int(token.text)
        if token.kind == "id":
            return token.text
        self.pos -= 1
        raise self.error(f"expected a dimension, found '{token.text}'")

    def type(self) -> TensorType:
        if self.kind("id") != "tensor":
            self.pos -= 1
            raise self.error("expected 'tensor<...>'")
        self.expect("<")
        dtype = dtype_named(self.kind("id"))
        self.expect(",")
        self.expect("[")
        dims: list[Dim] = []
        while not self.accept("]"):
            if dims:
                self.expect(",")
            dims.append(self.dim())
        sharding = self.sharding() if self.accept(",") else None
        self.expect(">")
        return TensorType(dtype, tuple(dims), sharding)

    def sharding(self) -> Sharding:
        if self.kind("id") != "shard":
            self.pos -= 1
            raise self.error("expected 'shard<...>'")
        self.expect("<")
        axis = self.kind("id")
        self.expect("=")
        parts = self.integer()
        dim: int | None = None
        partial = False
        pieces: int | None = None
        blocks: list[int] = []
        if self.accept(","):
            if self.accept("partial"):
                partial = True
            else:
                self.expect("dim")
                self.expect("=")
                dim = self.integer()
                if self.accept(",") and self.accept("pieces"):
                    self.expect("=")
                    pieces = self.integer()
                    self.accept(",")
                if self.accept("blocks"):
                    self.expect("=")
                    self.expect("[")
                    while not self.accept("]"):
                        if blocks:
                            self.expect(",")
                        blocks.append(self.integer())
        self.expect(">")
        return Sharding(axis, parts, dim, partial, pieces, tuple(blocks))

    def integer(self) -> int:
        text = self.kind("num")
        if not text.isdigit():
            self.pos -= 1
            raise self.error(f"expected a non-negative integer, found '{text}'")
        return int(text)

    def attr_value(self) -> AttrValue:
        token = self.next()
        if token.kind == "str":
            return self.string_literal(token.text)
        if token.kind == "num":
            text = token.text
            if any(c in text for c in ".eEn"):  # 'n' covers inf and nan
                return float(text)
            return int(text)
        if token.kind == "id" and token.text in ("true", "false", "none"):
            return {"true": True, "false": False, "none": None}[token.text]
        if token.text == "[":
            items: list[AttrValue] = []
            while not self.accept("]"):
                if items:
                    self.expect(",")
                items.append(self.attr_value())
            return tuple(items)
        self.pos -= 1
        raise self.error(f"expected an attribute value, found '{token.text}'")

    def attrs(self) -> Attrs:
        values: dict[str, AttrValue] = {}
        if self.accept("{"):
            while not self.accept("}"):
                if values:
                    self.expect(",")
                key = self.kind("id")
                self.expect("=")
                values[key] = self.attr_value()
        return Attrs.of(values)

    def op(self) -> Op:
        names = [self.value_name()]
        while self.accept(","):
            names.append(self.value_name())
        self.expect("=")
        opname = self.kind("id")
        self.expect("(")
        operands: list[str | None] = []
        while not self.accept(")"):
            if operands:
                self.expect(",")
            operands.append(None if self.accept("_") else self.value_name())
        attrs = self.attrs()
        self.expect(":")
        types = [self.type()]
        while self.accept(","):
            types.append(self.type())
        if len(types) != len(names):
            raise self.error(f"{opname} has {len(names)} results but {len(types)} types")
        self.expect("scope")
        scope = self.string()
        self.expect("by")
        origin = self.string()
        results = tuple(Value(n, t) for n, t in zip(names, types, strict=True))
        return Op(opname, tuple(operands), results, attrs, scope, origin)

    def weight(self) -> Weight:
        name = self.value_name()
        self.expect(":")
        type_ = self.type()
        self.expect("category")
        category = self.string()
        sources: list[TensorSource] = []
        source_dtype = None
        if self.accept("from"):
            source_dtype = dtype_named(self.kind("id"))
            while True:
                file = self.string()
                self.expect(":")
                sources.append(TensorSource(file, self.string()))
                if not self.accept(","):
                    break
        return Weight(name, type_, category, tuple(sources), source_dtype)

    def graph(self) -> Graph:
        self.expect("graph")
        name = self.kind("id")
        self.expect("{")
        metadata: list[tuple[str, str]] = []
        inputs: list[Value] = []
        weights: list[Weight] = []
        states: list[StateSlot] = []
        ops: list[Op] = []
        outputs: list[str] = []
        dims: list[DimBound] = []
        while not self.accept("}"):
            token = self.peek()
            if token is None:
                raise self.error("missing '}' at the end of the graph")
            try:
                self.statement(token, metadata, inputs, weights, states, ops, outputs, dims)
            except IRError as error:
                message = str(error)
                raise IRError(message if message.startswith("line ") else f"line {token.line}: {message}") from None
        if self.peek() is not None:
            raise self.error("text after the end of the graph")
        return Graph(name, tuple(inputs), tuple(weights), tuple(states), tuple(ops), tuple(outputs),
                     tuple(metadata), tuple(dims))

    def statement(self, token: _Token, metadata: list[tuple[str, str]], inputs: list[Value],
                  weights: list[Weight], states: list[StateSlot], ops: list[Op], outputs: list[str],
                  dims: list[DimBound]) -> None:
        if token.kind == "val":
            ops.append(self.op())
            return
        keyword = self.kind("id")
        if keyword == "meta":
            key = self.string()
            self.expect("=")
            metadata.append((key, self.string()))
        elif keyword == "input":
            value_name = self.value_name()
            self.expect(":")
            inputs.append(Value(value_name, self.type()))
        elif keyword == "weight":
            weights.append(self.weight())
        elif keyword == "state":
            slot_name = self.value_name()
            self.expect(":")
            kind = self.kind("id")
            type_ = self.type()
            update = self.value_name() if self.accept("->") else ""
            states.append(StateSlot(slot_name, kind, type_, update))
        elif keyword == "dim":
            dim_name = self.kind("id")
            self.expect(":")
            self.expect("[")
            low = self.integer()
            self.expect(",")
            high = self.integer()
            self.expect("]")
            dims.append(DimBound(dim_name, low, high))
        elif keyword == "output":
            outputs.append(self.value_name())
        else:
            self.pos -= 1
            raise self.error(f"unexpected '{keyword}'")


def parse_graph(text: str) -> Graph:
    """Parse IR text; raises IRError naming the line on bad text. Run `verify` to check meaning."""
    return _Parser(text).graph()
