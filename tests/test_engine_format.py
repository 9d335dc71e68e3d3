"""The engine format (runtime/engine_format.py): the manifest round-trips through its type, every
malformed field is refused naming the field and the manifest path, format-1 engines are refused
with one sentence, and a real build writes what the runtime reads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nemocompile.base.errors import EngineError
from nemocompile.runtime.engine_format import (
    FORMAT_VERSION,
    EngineBounds,
    FileEntry,
    GraphFiles,
    KernelUse,
    Manifest,
    PolicyInfo,
    RankFiles,
    SourceInfo,
    TargetInfo,
    weights_file,
)

PATH = Path("/engines/demo/manifest.json")
DIGEST = "ab" * 32


def _manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "nemocompile_version": "0.1.0",
        "target": TargetInfo("b200", "sm_100", (10, 0)),
        "ranks": (RankFiles(0, (weights_file(0),)),),
        "graphs": GraphFiles("graph.txt", "graph.decode.txt"),
        "config": "config.json",
        "kernels": (KernelUse("prefill", "linear", "reference", "reference", 19),
                    KernelUse("decode", "ssd_state_update", "reference", "reference", 2)),
        "tokenizer": "tokenizer.json",
        "precision": "auto",
        "policy": PolicyInfo("bf16", {"routed_experts": "nvfp4_w4a4", "router": "fp32"}, ("lm_head",), "error",
                             True),
        "source": SourceInfo("nemotron-h-demo", "c" * 64),
        "bounds": EngineBounds(256, 131072, ("--max-batch-size", "--max-context")),
    }
    fields.update(changes)
    files = ("config.json", "graph.txt", "graph.decode.txt", "tokenizer.json", weights_file(0))
    return Manifest(**fields).with_files({name: FileEntry(DIGEST, 10 + i) for i, name in enumerate(files)})


def _json() -> dict[str, Any]:
    return _manifest().to_json()


def test_weights_file_is_named_per_rank() -> None:
    assert [weights_file(r) for r in (0, 3)] == ["weights/rank0.safetensors", "weights/rank3.safetensors"]
    with pytest.raises(ValueError, match="non-negative"):
        weights_file(-1)


def test_manifest_round_trips_through_json() -> None:
    manifest = _manifest()
    data = manifest.to_json()
    assert data["format_version"] == FORMAT_VERSION == 2
    assert data["world_size"] == 1 and data["ranks"] == [{"rank": 0, "weights": ["weights/rank0.safetensors"]}]
    back = Manifest.from_json(json.loads(json.dumps(data)), PATH)
    assert back == manifest
    assert back.to_json() == data
    assert back.kernel_counts() == {"reference": 21} and back.backends == ("reference",)
    assert back.weight_files(0) == (weights_file(0),)


def test_bounds_are_optional_and_checked() -> None:
    data = _json()
    assert data["bounds"] == {"max_batch_size": 256, "max_context": 131072,
                              "chosen_automatically": ["--max-batch-size", "--max-context"], "why": ""}
    del data["bounds"]  # an engine built before the bounds were recorded
    assert Manifest.from_json(data, PATH).bounds is None
    for bad, message in ((["--max-tokens"], "may list only"), ("--max-context", "must be a list")):
        broken = {**_json()}
        broken["bounds"] = {**broken["bounds"], "chosen_automatically": bad}
        with pytest.raises(EngineError, match=message):
            Manifest.from_json(broken, PATH)


def test_world_size_is_the_number_of_ranks() -> None:
    two = _manifest(ranks=(RankFiles(0, (weights_file(0),)), RankFiles(1, (weights_file(1),))))
    assert two.world_size == 2
    files = dict(two.files) | {weights_file(1): FileEntry(DIGEST, 1)}
    data = two.with_files(files).to_json()
    assert Manifest.from_json(data, PATH).world_size == 2
    data["world_size"] = 8  # what a bytes-per-GPU plan asked for is not what the engine holds
    with pytest.raises(EngineError, match=r"field `world_size` is 8 but `ranks` lists 2"):
        Manifest.from_json(data, PATH)


def test_format_1_is_refused_in_one_sentence() -> None:
    old = {"format_version": 1, "weights": ["weights/rank0.safetensors"], "files": {}}
    with pytest.raises(EngineError) as caught:
        Manifest.from_json(old, PATH)
    message = str(caught.value)
    assert message.startswith(str(PATH)) and "format 1" in message and "rebuild it" in message
    assert message.count(". ") == 0 and "\n" not in message


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to a manifest's JSON: set the dotted `path` (list items by index) to `value`."""
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        del data[key]
    return change


# (what is wrong, the change, a phrase the error must hold: the field's name)
BAD_FIELDS = [
    ("format 3", _set("format_version", 3), "field `format_version` must be 2, got int 3"),
    ("format as text", _set("format_version", "2"), "field `format_version` must be 2, got str '2'"),
    ("unknown field", _set("weights", ["weights/rank0.safetensors"]), "unknown field `weights`"),
    ("version missing", _delete("nemocompile_version"), "field `nemocompile_version` is missing"),
    ("version a number", _set("nemocompile_version", 1), "field `nemocompile_version` must be a string"),
    ("target not an object", _set("target", "b200"), "field `target` must be an object"),
    ("target name empty", _set("target.name", ""), "field `target.name` must not be empty"),
    ("arch missing", lambda d: d["target"].pop("arch"), "field `target.arch` is missing"),
    ("capability short", _set("target.compute_capability", [10]), "field `target.compute_capability` must be"),
    ("capability text", _set("target.compute_capability", ["10", "0"]), "field `target.compute_capability`"),
    ("unknown target field", _set("target.sm_count", 148), "unknown field `target.sm_count`"),
    ("world size zero", _set("world_size", 0), "field `world_size` must be at least 1"),
    ("world size a bool", _set("world_size", True), "field `world_size` must be an integer, got the boolean"),
    ("ranks not a list", _set("ranks", {"0": []}), "field `ranks` must be a list"),
    ("ranks empty", _set("ranks", []), "field `ranks` must list ranks 0..n-1"),
    ("rank numbered 1", _set("ranks.0.rank", 1), "field `ranks` must list ranks 0..n-1 in order, got [1]"),
    ("rank negative", _set("ranks.0.rank", -1), "field `ranks[0].rank` must be at least 0"),
    ("rank weights empty", _set("ranks.0.weights", []), "field `ranks[0].weights` must name at least one file"),
    ("rank weights a number", _set("ranks.0.weights", [7]), "field `ranks[0].weights.0` must be a string"),
    ("rank weights outside", _set("ranks.0.weights", ["../w.safetensors"]),
     "names a path outside the engine directory: ../w.safetensors (field `ranks[0].weights.0`)"),
    ("rank weights unhashed", _set("ranks.0.weights", ["weights/rank9.safetensors"]),
     "field `ranks[0].weights` names weights/rank9.safetensors, which is not among the hashed `files`"),
    ("graphs missing decode", lambda d: d["graphs"].pop("decode"), "field `graphs.decode` is missing"),
    ("graph absolute", _set("graphs.prefill", "/etc/passwd"), "outside the engine directory: /etc/passwd"),
    ("graph backslash", _set("graphs.prefill", "..\\graph.txt"), "(field `graphs.prefill`)"),
    ("config missing", _delete("config"), "field `config` is missing"),
    ("config unhashed", _set("config", "other.json"), "field `config` names other.json, which is not among"),
    ("kernels not a list", _set("kernels", "reference"), "field `kernels` must be a list"),
    ("kernel entry not an object", _set("kernels", ["reference"]), "field `kernels[0]` must be an object"),
    ("kernel graph unknown", _set("kernels.0.graph", "train"), "field `kernels[0].graph` must be one of"),
    ("kernel count zero", _set("kernels.1.count", 0), "field `kernels[1].count` must be at least 1"),
    ("kernel name missing", lambda d: d["kernels"][0].pop("kernel"), "field `kernels[0].kernel` is missing"),
    ("kernel backend a number", _set("kernels.0.backend", 3), "field `kernels[0].backend` must be a string"),
    ("tokenizer a number", _set("tokenizer", 5), "field `tokenizer` must be a string"),
    ("tokenizer outside", _set("tokenizer", "../tok.json"), "(field `tokenizer`)"),
    ("tokenizer unhashed", _set("tokenizer", "tok.json"), "field `tokenizer` names tok.json"),
    ("precision missing", _delete("precision"), "field `precision` is missing"),
    ("policy base missing", lambda d: d["policy"].pop("base"), "field `policy.base` is missing"),
    ("policy component a number", _set("policy.components.router", 32),
     "field `policy.components.router` must be a string"),
    ("policy exclude numbers", _set("policy.exclude", [1]), "field `policy.exclude` must be a list of strings"),
    ("policy flag text", _set("policy.nvfp4_four_over_six", "yes"),
     "field `policy.nvfp4_four_over_six` must be true or false"),
    ("policy unknown", _set("policy.router", "fp32"), "unknown field `policy.router`"),
    ("source fingerprint missing", lambda d: d["source"].pop("fingerprint"),
     "field `source.fingerprint` is missing"),
    ("files a list", _set("files", []), "field `files` must be an object"),
    ("file entry a string", lambda d: d["files"].update({"graph.txt": "ab"}),
     "field `files.graph.txt` must be an object"),
    ("file digest short", lambda d: d["files"]["graph.txt"].update(sha256="abc"),
     "field `files.graph.txt.sha256` must be 64 lowercase hex digits"),
    ("file size negative", lambda d: d["files"]["graph.txt"].update(size=-1),
     "field `files.graph.txt.size` must be at least 0"),
    ("file size fractional", lambda d: d["files"]["graph.txt"].update(size=1.5),
     "field `files.graph.txt.size` must be an integer"),
    ("file entry extra", lambda d: d["files"]["graph.txt"].update(mode=420), "unknown field `files.graph.txt.mode`"),
    ("file outside", lambda d: d["files"].update({"../x": {"sha256": DIGEST, "size": 1}}),
     "outside the engine directory: ../x (field `files`)"),
]


@pytest.mark.parametrize(("change", "phrase"), [(c, p) for _, c, p in BAD_FIELDS], ids=[w for w, _, _ in BAD_FIELDS])
def test_every_bad_field_is_refused_naming_it(change: Callable[[dict[str, Any]], None], phrase: str) -> None:
    data = copy.deepcopy(_json())
    change(data)
    with pytest.raises(EngineError) as caught:
        Manifest.from_json(data, PATH)
    message = str(caught.value)
    assert phrase in message
    assert str(PATH) in message
    assert "\n" not in message


def test_a_manifest_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(EngineError, match=r"manifest\.json is not an engine manifest: it holds list"):
        Manifest.from_json([1, 2], PATH)


# ---------------------------------------------------------------------------------------------
# a real build writes the format the runtime reads


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemocompile.api import build

    out = tmp_path_factory.mktemp("format") / "engine"
    build(None, out, target="h100", precision="fp32")
    return out


def test_a_built_engine_has_a_format_2_manifest(demo_engine: Path) -> None:
    from nemocompile.api import load
    from nemocompile.runtime.engine_files import read_manifest

    data = json.loads((demo_engine / "manifest.json").read_text())
    assert data["format_version"] == 2
    # the fp32 demo's norms, conv, SSD and attention run on Triton kernels, each with its tuned config
    assert sorted(data) == sorted([*_json(), "kernel_configs"])
    manifest = read_manifest(demo_engine)
    assert manifest.to_json() == data
    assert manifest.world_size == 1 and manifest.weight_files(0) == ("weights/rank0.safetensors",)
    assert manifest.target == TargetInfo("h100", "sm_90", (9, 0))
    assert manifest.tokenizer == "tokenizer.json" and manifest.config == "config.json"
    assert {name for name, _ in manifest.named_files()} >= {"graphs.prefill", "ranks[0].weights", "config"}
    assert set(manifest.files) == {path.relative_to(demo_engine).as_posix() for path in demo_engine.rglob("*")
                                   if path.is_file() and path.name != "manifest.json"}
    assert {u.graph for u in manifest.kernels} == {"prefill", "decode"}
    assert load(demo_engine).manifest == manifest


def test_the_world_size_shards_the_engine(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nemocompile.cli import main

    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["build", "--target", "h100", "--precision", "fp32", "--world-size", "2",
                                       "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["world_size"], summary["planned_world_size"]) == (2, 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert [rank["weights"] for rank in manifest["ranks"]] == [["weights/rank0.safetensors"],
                                                               ["weights/rank1.safetensors"]]
    report = (out / "report.md").read_text()
    assert "- world size: 2 (ranks this engine holds)" in report
    assert "bytes per GPU at world size 2 (the weights split evenly; each rank's file is in the manifest)" in report


def test_a_format_1_engine_is_refused_by_load_and_the_cli(demo_engine: Path, tmp_path: Path) -> None:
    import shutil

    from nemocompile.api import load

    old = tmp_path / "old"
    shutil.copytree(demo_engine, old)
    data = json.loads((old / "manifest.json").read_text())
    data["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match=r"format 1.*rebuild it"):
        load(old)
    run = subprocess.run([sys.executable, "-m", "nemocompile.cli", "inspect", str(old)], capture_output=True,
                         text=True, check=False)
    assert run.returncode != 0
    assert "rebuild it" in run.stderr and "Traceback" not in run.stderr


def test_the_tokenizer_lives_in_the_runtime() -> None:
    import importlib.util

    from nemocompile.runtime.tokenizer import ByteTokenizer

    assert ByteTokenizer().decode(ByteTokenizer().encode("héllo")) == "héllo"
    assert importlib.util.find_spec("nemocompile.tokenizer") is None
