"""The `nemocompile` command end to end over the embedded demo model: build, run, inspect, plan.

Most tests drive the click group in-process with CliRunner; one runs the installed console
script as a real subprocess and checks it writes the same bytes as the in-process build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from nemocompile.api import load
from nemocompile.base.settings import override
from nemocompile.cli import main
from nemocompile.graph.text import parse_graph
from nemocompile.report import comparable_engine_bytes
from nemocompile.runtime.tokenizer import ByteTokenizer

MODELS = Path("/work/shared/models")
KNOWN_TARGETS = ("b200", "gb200", "h100", "h200")
DEMO_PATTERN_LAYERS = ["mamba", "attention", "moe", "mamba", "mlp", "moe"]
# select_kernels runs on the prefill graph, then again on the decode graph specialize_decode made.
FUSIONS = ["fuse_experts", "fuse_router", "fuse_add_rms_norm", "fuse_dequant_gemm", "fuse_mamba_chain"]
PIPELINE = ["set_precision", "decompose", "assign_precision", "assign_kv_cache", *FUSIONS, "select_kernels",
            "specialize_decode", "select_kernels"]
# every step of the build, the driver steps (calibrate, quantize_weights) included
STEPS = ["set_precision", "decompose", "assign_precision", "assign_kv_cache", *FUSIONS, "plan_memory", "calibrate",
         "quantize_weights", "select_kernels", "specialize_decode", "select_kernels"]
IR_HEADER = re.compile(r"^// ----- IR after (\S+) -----$", re.MULTILINE)


def invoke(*args: str | Path) -> Result:
    """Run the CLI in-process; `override()` undoes any global flag (--debug) the command sets."""
    with override():
        return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def invoke_ok(*args: str | Path) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def invoke_json(*args: str | Path) -> Any:
    return json.loads(invoke_ok(*args, "--json").stdout)


def file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones included) by relative POSIX path."""
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header: dict[str, Any] = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def safetensors_data_bytes(path: Path) -> int:
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
    return path.stat().st_size - 8 - length


def generated(engine: Path, *args: str) -> list[list[int]]:
    ids: list[list[int]] = invoke_json("run", engine, *args)["generated_ids"]
    return ids


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The demo engine built once by `build --target h100 -o OUT --json`, and its JSON summary."""
    out = tmp_path_factory.mktemp("cli-demo") / "engine"
    summary = invoke_json("build", "--target", "h100", "-o", out)
    return out, summary


@pytest.fixture(scope="session")
def demo_engine(demo_build: tuple[Path, dict[str, Any]]) -> Path:
    return demo_build[0]


# ---------------------------------------------------------------------------------------------
# build


def test_build_json_summary(demo_build: tuple[Path, dict[str, Any]]) -> None:
    out, summary = demo_build
    assert set(summary) == {"engine", "target", "precision", "policy", "params_total", "bytes_written",
                            "bits_per_element", "seconds", "passes", "quantization_errors", "agreement",
                            "world_size", "planned_world_size", "kernels", "phases", "calibration", "deviation",
                            "tensorrt", "kernel_configs", "skipped_tuning_entries", "rejected_configs", "bounds"}
    assert summary["tensorrt"] is None  # no ONNX export without --tensorrt
    # the demo fits the defaults, which the build took as the bounds it was not given
    assert summary["bounds"] == {"max_batch_size": 256, "max_context": 131072,
                                 "chosen_automatically": ["--max-batch-size", "--max-context"], "why": "",
                                 "fits": True}
    assert summary["world_size"] == summary["planned_world_size"] == 1
    # the routed experts' NVFP4 W4A16 GEMMs run on Triton kernels where triton is installed
    compiled = {name for name in summary["kernels"] if name != "reference"}
    assert "reference" in summary["kernels"] and all(name.startswith("triton_") for name in compiled)
    assert bool(compiled) == (importlib.util.find_spec("triton") is not None)
    assert summary["engine"] == str(out)
    assert summary["target"] == "h100"
    assert summary["precision"] == "auto"  # the target's policy: NVFP4 W4A16 experts, FP8 W8A8 on h100
    assert summary["policy"]["components"]["routed_experts"] == "nvfp4_w4a16"
    assert {e["format"] for e in summary["quantization_errors"]} == {"nvfp4", "fp8"}
    assert 0 < summary["agreement"]["mean_kl"] < 0.1
    assert summary["seconds"] >= 0
    assert summary["params_total"] == invoke_json("inspect", out)["params_total"] > 0
    assert summary["bytes_written"] == safetensors_data_bytes(out / "weights" / "rank0.safetensors")
    assert [entry["name"] for entry in summary["passes"]] == STEPS
    counts = {entry["name"]: entry["counts"] for entry in summary["passes"]}
    # The demo pattern M*EM-E: two Mamba2 mixers, one attention, two MoE and one MLP block.
    assert counts["decompose"] == {"mamba2_mixer": 2, "attention": 1, "moe": 2, "mlp": 1}
    assert counts["specialize_decode"] == {"ssd_state_update": 2}


def test_unknown_target_is_refused_listing_known_names(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = invoke("build", "--target", "h999", "-o", out)
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "h999" in message
    assert all(name in message for name in KNOWN_TARGETS), message
    assert "Traceback" not in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_plan_refuses_unknown_target() -> None:
    result = invoke("plan", MODELS / "nano.json", "--target", "a100")
    assert result.exit_code != 0
    assert "a100" in result.stderr and "h200" in result.stderr


def test_print_after_all_prints_ir_after_each_pass(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    result = invoke_ok("build", "--target", "h100", "-o", out, "--print-after", "all")
    assert IR_HEADER.findall(result.stderr) == PIPELINE
    assert "IR after" not in result.stdout
    chunks = dict(zip(IR_HEADER.findall(result.stderr), IR_HEADER.split(result.stderr)[2::2], strict=True))
    graphs = {name: parse_graph(text) for name, text in chunks.items()}
    assert graphs["set_precision"].op_counts().get("mamba2_mixer") == 2
    assert "mamba2_mixer" not in graphs["decompose"].op_counts()
    assert graphs["assign_precision"].op_counts()["quantize"] == 8  # W8A8 on h100: Mamba in/out, shared up/down
    # the fusions take every quantize: layer 3's norm quantizes its in_proj input (a quant_linear reads
    # the norm's E4M3 codes), the other 7 GEMMs quantize on load: 8 quant_linear
    fused = graphs["fuse_mamba_chain"].op_counts()
    assert fused == parse_graph((out / "graph.txt").read_text()).op_counts()
    assert "quantize" not in fused and fused["quant_linear"] == 8
    assert (graphs["specialize_decode"].op_counts()
            == parse_graph((out / "graph.decode.txt").read_text()).op_counts())


def test_print_after_one_pass_prints_only_that_pass(tmp_path: Path) -> None:
    result = invoke_ok("build", "--target", "h100", "-o", tmp_path / "engine", "--print-after", "decompose")
    assert IR_HEADER.findall(result.stderr) == ["decompose"]


def test_two_builds_are_byte_identical(demo_engine: Path, tmp_path: Path) -> None:
    # every byte but the phase times in report.md (and report.md's hash in the manifest)
    invoke_ok("build", "--target", "h100", "-o", tmp_path / "a")
    invoke_ok("build", "--target", "h100", "-o", tmp_path / "b")
    first, second = comparable_engine_bytes(tmp_path / "a"), comparable_engine_bytes(tmp_path / "b")
    assert "weights/rank0.safetensors" in first and "manifest.json" in first
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds of the same input"
    assert comparable_engine_bytes(demo_engine) == first


def test_console_script_builds_the_same_bytes(demo_engine: Path, tmp_path: Path) -> None:
    script = shutil.which("nemocompile")
    assert script is not None, "the nemocompile console script is not installed"
    out = tmp_path / "engine"
    completed = subprocess.run([script, "build", "--target", "h100", "-o", str(out), "--json"],
                               capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["engine"] == str(out)
    assert comparable_engine_bytes(out) == comparable_engine_bytes(demo_engine)


def test_fp32_precision_writes_f32_weights(demo_engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    summary = invoke_json("build", "--target", "h100", "-o", out, "--precision", "fp32")
    assert summary["precision"] == "fp32"
    header = safetensors_header(out / "weights" / "rank0.safetensors")
    assert header and {entry["dtype"] for entry in header.values()} == {"F32"}
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"
    # The bf16 engine of the same model stores its matrices in BF16, so the check above can fail.
    bf16_dtypes = {entry["dtype"] for entry in safetensors_header(demo_engine / "weights" / "rank0.safetensors").values()}
    assert "BF16" in bf16_dtypes
    assert summary["bytes_written"] > invoke_json("inspect", demo_engine)["bytes_total"]


# ---------------------------------------------------------------------------------------------
# run


def test_run_json_prints_only_the_generated_ids(demo_engine: Path) -> None:
    result = invoke_ok("run", demo_engine, "--input-ids", "1,2,3", "--max-new-tokens", "5", "--json")
    printed = json.loads(result.stdout)
    assert list(printed) == ["generated_ids"]
    (row,) = printed["generated_ids"]
    assert len(row) == 5 and all(isinstance(token, int) and 0 <= token < 260 for token in row)
    # The prompt is excluded: the CLI prints exactly what generate adds after it.
    full = load(demo_engine).generate([[1, 2, 3]], 5).tolist()
    assert full[0][:3] == [1, 2, 3]
    assert printed == {"generated_ids": [full[0][3:]]}


def test_run_batch_of_prompts(demo_engine: Path) -> None:
    batch = generated(demo_engine, "--input-ids", "1,2,3", "--input-ids", "4,5,6", "--max-new-tokens", "3")
    assert len(batch) == 2
    assert batch[0] == generated(demo_engine, "--input-ids", "1,2,3", "--max-new-tokens", "3")[0]
    assert batch[1] == generated(demo_engine, "--input-ids", "4,5,6", "--max-new-tokens", "3")[0]


def test_run_prompt_uses_the_byte_tokenizer(demo_engine: Path) -> None:
    from_text = generated(demo_engine, "--prompt", "hello", "--max-new-tokens", "4")
    ids = ",".join(map(str, ByteTokenizer().encode("hello")))
    assert from_text == generated(demo_engine, "--input-ids", ids, "--max-new-tokens", "4")
    plain = invoke_ok("run", demo_engine, "--prompt", "hello", "--max-new-tokens", "4")
    assert re.search(r"\d+ tokens in [\d.]+ s", plain.stderr)


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(demo_engine: Path) -> None:
    def sample(seed: int) -> list[int]:
        return generated(demo_engine, "--input-ids", "1,2,3", "--max-new-tokens", "8",
                         "--temperature", "0.8", "--top-p", "0.9", "--seed", str(seed))[0]

    first = sample(7)
    assert sample(7) == first
    # One other seed could by chance pick the same 8 tokens; four all doing so cannot plausibly happen.
    others = [sample(seed) for seed in (8, 9, 10, 11)]
    assert any(other != first for other in others), (first, others)
    greedy = generated(demo_engine, "--input-ids", "1,2,3", "--max-new-tokens", "8")[0]
    assert any(run != greedy for run in [first, *others])


def test_run_needs_exactly_one_of_ids_or_prompt(demo_engine: Path) -> None:
    result = invoke("run", demo_engine)
    assert result.exit_code == 2
    assert "--input-ids" in result.stderr and "--prompt" in result.stderr


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_json_layers_categories_and_file_hashes(demo_engine: Path) -> None:
    info = invoke_json("inspect", demo_engine)
    assert info["layers"] == DEMO_PATTERN_LAYERS
    assert info["target"]["name"] == "h100" and info["precision"] == "auto"
    categories = info["categories"]
    assert {"embeddings", "lm_head", "attention", "mamba_in_proj", "mlp", "shared_experts",
            "routed_experts", "router", "norms"} <= set(categories)
    assert sum(entry["params"] for name, entry in categories.items() if name != "mtp") == info["params_total"]
    # 8 routed experts, top-2: a quarter of the routed parameters are active per token.
    routed = categories["routed_experts"]
    assert routed["active"] == routed["params"] // 4
    on_disk = {name for name in file_bytes(demo_engine) if name != "manifest.json"}
    assert set(info["files"]) == on_disk
    for name, entry in info["files"].items():
        data = (demo_engine / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert entry["size"] == len(data), name


def test_inspect_table_names_every_layer(demo_engine: Path) -> None:
    text = invoke_ok("inspect", demo_engine).stdout
    assert "nemotron-h-demo" in text and "h100" in text
    for kind in set(DEMO_PATTERN_LAYERS):
        assert kind in text


# ---------------------------------------------------------------------------------------------
# plan


def test_plan_nano_matches_published_sizes() -> None:
    plan = invoke_json("plan", MODELS / "nano.json", "--precision", "bf16")
    assert plan["params_total"] == pytest.approx(31.6e9, rel=0.01)
    assert plan["params_active_without_embeddings"] == pytest.approx(3.2e9, rel=0.03)
    assert plan["params_mtp"] == 0
    assert plan["bits_per_element"] == pytest.approx(16, abs=0.1)
    assert plan["precision"] == "bf16" and plan["target"] == "h100"


def test_plan_nano_fp32_doubles_the_bits() -> None:
    plan = invoke_json("plan", MODELS / "nano.json", "--precision", "fp32")
    assert plan["bits_per_element"] == pytest.approx(32, abs=0.1)


def test_plan_ultra_matches_published_sizes() -> None:
    plan = invoke_json("plan", MODELS / "ultra.json")
    assert plan["params_total"] == pytest.approx(550e9, rel=0.01)
    assert plan["params_mtp"] > 0
    assert plan["layers"] == 108
