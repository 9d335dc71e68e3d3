"""Fuzz tests (hypothesis): whatever the IR text parser, the engine manifest, engine loading and
config.json are given, the only exceptions that escape are nemocompile's own error classes
(nemocompile.base.errors), each with a message (the CLI prints it as one line).

Inputs are mutations of real texts (a block graph, a quantized engine's graphs, a built engine's
manifest and config.json, the shipped model configs) and random JSON values and text. The default
run tries FUZZ_CASES cases per target; `python -m pytest -m slow tests/test_fuzz.py -s` runs
SLOW_FUZZ_CASES (>= 10,000) per target. Each test prints how many cases it ran."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemocompile.base.errors import NemocompileError
from nemocompile.graph.config import config_from_dict
from nemocompile.graph.nemotron_h import build_block_graph
from nemocompile.graph.text import parse_graph, print_graph
from nemocompile.graph.types import BF16
from nemocompile.graph.verifier import verify
from nemocompile.runtime.engine import load, read_engine
from nemocompile.runtime.engine_format import Manifest

FUZZ_CASES = 300
SLOW_FUZZ_CASES = 10_000
MODELS = Path("/work/shared/models")
MANIFEST_PATH = Path("/engines/fuzz/manifest.json")

# ---------------------------------------------------------------------------------------------
# strategies

EXTREME_INTS = st.sampled_from([0, 1, -1, 2, 3, 7, 16, 255, 256, 2**31, 2**53 + 1, 2**63, -(2**63), 10**9, 10**30])
EXTREME_FLOATS = st.sampled_from([0.0, -0.0, 1e-45, -1.0, 0.5, 1e308, float("inf"), float("-inf"), float("nan")])
SCALARS = (st.none() | st.booleans() | st.integers() | EXTREME_INTS | st.floats() | EXTREME_FLOATS
           | st.text(max_size=12))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
# Pieces of the IR text's own syntax, so insertions reach deep into the parser.
IR_PIECES = st.sampled_from([
    "%", "@", "{", "}", "<", ">", "[", "]", "(", ")", ",", "=", ":", "->", '"', "\\", "\n", " ", "#", "//",
    "tensor", "f32", "bf16", "nvfp4", "fp8", "u8", "i64", "batch", "seq", "ctx", "dim", "state", "input",
    "weight", "meta", "output", "graph", "kv", "ssm", "conv", "scope", "by", "inf", "nan", "-1", "0",
    "99999999999999999999", "1e999", "true", "none", "linear", "quantize", "attention_gqa", "embedding",
    "%0", "%input_ids", "%embeddings", "[batch, seq]", "tensor<f32, []>", "{kernel = \"reference\"}",
])


def _mutate_text(text: str, edits: list[tuple[int, int, int, str]]) -> str:
    """Apply (kind, position, length, payload) edits: 0 delete, 1 insert, 2 replace, 3 duplicate."""
    for kind, position, length, payload in edits:
        at = position % (len(text) + 1)
        end = min(len(text), at + length)
        if kind == 0:
            text = text[:at] + text[end:]
        elif kind == 1:
            text = text[:at] + payload + text[at:]
        elif kind == 2:
            text = text[:at] + payload + text[end:]
        else:
            text = text[:at] + text[at:end] + text[at:]
    return text


TEXT_EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 40),
                                IR_PIECES | st.text(max_size=6)), min_size=1, max_size=4)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _mutate_json(data: Any, draw: Callable[[Any], Any]) -> Any:
    """`data` with 1-3 nodes replaced by random JSON values, deleted, or given a new key."""
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        action = draw(st.integers(0, 2))
        if not path:
            if action == 0:
                data = draw(JSON_VALUES)
            continue
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if action == 0:
            parent[last] = draw(JSON_VALUES)
        elif action == 1:
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | st.sampled_from(sorted(map(str, parent))))] = draw(JSON_VALUES)
        else:
            parent.insert(last, draw(JSON_VALUES))
    return data


def _settings(cases: int) -> Callable[[Any], Any]:
    return settings(max_examples=cases, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _only_project_errors(run: Callable[[], object]) -> str:
    """Run `run`; return 'ok' or the error class name; anything but a NemocompileError fails."""
    try:
        run()
    except NemocompileError as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"  # the CLI folds it to one line
        return type(error).__name__
    return "ok"


def _report(name: str, outcomes: dict[str, int], wanted: int) -> None:
    total = sum(outcomes.values())
    print(f"\nfuzz {name}: {total} cases, " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert total >= wanted, f"only {total} cases ran, wanted {wanted}"


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemocompile.api import build

    out = tmp_path_factory.mktemp("fuzz") / "engine"
    build(None, out, target="b200")  # NVFP4 and FP8 weights, quantize ops, both graphs
    return out


@pytest.fixture(scope="module")
def graph_texts(engine: Path) -> list[str]:
    config = config_from_dict(json.loads((engine / "config.json").read_text()))
    block = print_graph(build_block_graph(config, BF16))
    return [block, (engine / "graph.txt").read_text(), (engine / "graph.decode.txt").read_text()]


@pytest.fixture(scope="module")
def configs(engine: Path) -> list[dict[str, Any]]:
    found = [json.loads((engine / "config.json").read_text())]
    found += [json.loads(path.read_text()) for path in sorted(MODELS.glob("*.json"))]
    return found


# ---------------------------------------------------------------------------------------------
# the IR text parser (and the verifier behind it, as the runtime calls them)


def _fuzz_parser(graph_texts: list[str], cases: int) -> None:
    outcomes: dict[str, int] = {}

    @_settings(cases)
    @given(st.integers(0, len(graph_texts) - 1), TEXT_EDITS, st.booleans(), st.text(max_size=60))
    def case(which: int, edits: list[tuple[int, int, int, str]], random_text: bool, text: str) -> None:
        source = text if random_text and which == 0 else _mutate_text(graph_texts[which], edits)
        outcome = _only_project_errors(lambda: verify(parse_graph(source)))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    case()
    _report("IR text parser", outcomes, cases)


def test_fuzz_ir_parser(graph_texts: list[str]) -> None:
    for text in graph_texts:  # the originals parse
        verify(parse_graph(text))
    _fuzz_parser(graph_texts, FUZZ_CASES)


@pytest.mark.slow
def test_fuzz_ir_parser_slow(graph_texts: list[str]) -> None:
    _fuzz_parser(graph_texts, SLOW_FUZZ_CASES)


# ---------------------------------------------------------------------------------------------
# the manifest


def _fuzz_manifest(engine: Path, cases: int) -> None:
    original = json.loads((engine / "manifest.json").read_text())
    outcomes: dict[str, int] = {}

    @_settings(cases)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        value = data.draw(JSON_VALUES) if data.draw(st.integers(0, 9)) == 0 else _mutate_json(original, data.draw)
        outcome = _only_project_errors(lambda: Manifest.from_json(value, MANIFEST_PATH))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    case()
    _report("manifest", outcomes, cases)


def test_fuzz_manifest(engine: Path) -> None:
    _fuzz_manifest(engine, FUZZ_CASES)


@pytest.mark.slow
def test_fuzz_manifest_slow(engine: Path) -> None:
    _fuzz_manifest(engine, SLOW_FUZZ_CASES)


# ---------------------------------------------------------------------------------------------
# engine loading: a file of a real engine changed (and, mostly, its hash recomputed so the change
# reaches the parser), then the engine read and, when that succeeds, loaded


def _rewrite(copy_dir: Path, manifest: dict[str, Any], relative: str, data: bytes, rehash: bool) -> None:
    (copy_dir / relative).write_bytes(data)
    manifest = copy.deepcopy(manifest)
    if rehash and isinstance(manifest.get("files"), dict) and relative in manifest["files"]:
        manifest["files"][relative] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    if relative != "manifest.json":
        (copy_dir / "manifest.json").write_text(json.dumps(manifest))


def _fuzz_engine(engine: Path, work: Path, cases: int) -> None:
    copy_dir = work / "engine"
    shutil.copytree(engine, copy_dir)
    files = {path.relative_to(engine).as_posix(): path.read_bytes() for path in engine.rglob("*") if path.is_file()}
    manifest = json.loads(files["manifest.json"])
    targets = ["manifest.json", "config.json", "graph.txt", "graph.decode.txt", "tokenizer.json",
               "weights/rank0.safetensors"]
    outcomes: dict[str, int] = {}

    @_settings(cases)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        for relative, content in files.items():  # start from the real engine each time
            (copy_dir / relative).write_bytes(content)
        relative = data.draw(st.sampled_from(targets))
        original = files[relative]
        if relative.endswith(".json") and data.draw(st.booleans()):
            changed = json.dumps(_mutate_json(json.loads(original), data.draw), allow_nan=True).encode()
        elif relative.endswith(".safetensors"):
            edits = data.draw(st.lists(st.tuples(st.integers(0, 4200), st.integers(0, 255)), min_size=1, max_size=4))
            buffer = bytearray(original)
            for at, byte in edits:  # the header and the start of the data
                buffer[at % len(buffer)] = byte
            changed = bytes(buffer)
        else:
            changed = _mutate_text(original.decode(), data.draw(TEXT_EDITS)).encode()
        _rewrite(copy_dir, manifest, relative, changed, rehash=data.draw(st.integers(0, 9)) > 0)

        def read_and_load() -> None:
            read_engine(copy_dir)
            load(copy_dir)

        outcome = _only_project_errors(read_and_load)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    case()
    _report("engine loading", outcomes, cases)


def test_fuzz_engine_loading(engine: Path, tmp_path: Path) -> None:
    _fuzz_engine(engine, tmp_path, FUZZ_CASES)


@pytest.mark.slow
def test_fuzz_engine_loading_slow(engine: Path, tmp_path: Path) -> None:
    _fuzz_engine(engine, tmp_path, SLOW_FUZZ_CASES)


# ---------------------------------------------------------------------------------------------
# config.json


def _fuzz_config(configs: list[dict[str, Any]], cases: int) -> None:
    outcomes: dict[str, int] = {}

    @_settings(cases)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        if data.draw(st.integers(0, 9)) == 0:
            raw = data.draw(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6))
        else:
            raw = _mutate_json(data.draw(st.sampled_from(configs)), data.draw)
            if not isinstance(raw, dict):
                raw = {"model_type": raw}
        outcome = _only_project_errors(lambda: config_from_dict(raw, "config.json"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    case()
    _report("config.json", outcomes, cases)


def test_fuzz_config(configs: list[dict[str, Any]]) -> None:
    for raw in configs:  # the originals are accepted
        config_from_dict(raw, "config.json")
    _fuzz_config(configs, FUZZ_CASES)


@pytest.mark.slow
def test_fuzz_config_slow(configs: list[dict[str, Any]]) -> None:
    _fuzz_config(configs, SLOW_FUZZ_CASES)
