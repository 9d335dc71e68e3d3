"""Resumable builds: a build killed (SIGKILL, in a child process) at five different points and
then run with --resume gives an engine byte-identical to an uninterrupted build (report.md's phase
times aside, as between any two builds), continuing after the last weight whose bytes hash to the
journal; a resume against a changed checkpoint or other options is refused, naming what changed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import nemocompile
import nemocompile.driver
from nemocompile.base.errors import UsageError
from nemocompile.base.settings import override
from nemocompile.report import comparable_engine_bytes
from nemocompile.weight_stream import WeightStream

transformers = pytest.importorskip("transformers", reason="the checkpoint is saved by NemotronHForCausalLM")

CONFIG = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E-", num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, intermediate_size=32, mamba_num_heads=4, mamba_head_dim=8,
              n_groups=2, ssm_state_size=8, chunk_size=4, conv_kernel=4, n_routed_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16, moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1)
# where the child kills itself: (module, attribute, the call that dies). The weights file of this
# model holds 33 weights (6 of them calibrated input scales); a stacked expert weight is quantized
# and written one expert at a time, so the second expert's quantization comes after the first
# expert's bytes were written.
KILL_POINTS = {
    "calibration, before its result is saved": ("nemocompile.driver", "save_calibration", 1),
    "quantize-and-write, at the first weight": ("nemocompile.weight_stream", "WeightStream._write_weight", 1),
    "quantize-and-write, inside an expert tensor": ("nemocompile.weight_stream", "quantize_nvfp4_measured", 2),
    "quantize-and-write, before the last weight": ("nemocompile.weight_stream", "WeightStream._write_weight", 33),
    "agreement check": ("nemocompile.driver", "measure_agreement", 1),
    "writing the report": ("nemocompile.driver", "write_report", 1),
}
WEIGHTS = 33
CHILD = textwrap.dedent("""
    import importlib, os, signal, sys
    module_name, attribute, fatal = sys.argv[1], sys.argv[2], int(sys.argv[3])
    module = importlib.import_module(module_name)
    owner, name = (getattr(module, attribute.split(".")[0]), attribute.split(".")[1]) if "." in attribute \\
        else (module, attribute)
    original = getattr(owner, name)
    calls = 0
    def dying(*args, **kwargs):
        global calls
        calls += 1
        if calls == fatal:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(owner, name, dying)
    import nemocompile
    nemocompile.build(sys.argv[4], sys.argv[5], target="b200", calibrate=3, world_size=int(sys.argv[6]))
""")


def tiny_moe_model() -> torch.nn.Module:
    """The seeded tiny model (fp32), its router weights widened so routing is not uniform."""
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**CONFIG, dtype="float32"))
    with torch.no_grad():
        model.model.layers[2].mixer.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_moe_model()
    directory = tmp_path_factory.mktemp("resume") / "tiny"
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="20KB")
    return directory


@pytest.fixture(scope="module")
def uninterrupted(checkpoint: Path) -> dict[str, bytes]:
    out = checkpoint.parent / "uninterrupted"
    nemocompile.build(checkpoint, out, target="b200", calibrate=3)
    return comparable_engine_bytes(out)


def killed_build(checkpoint: Path, out: Path, point: str, world_size: int = 1,
                 env: dict[str, str] | None = None) -> Path:
    """Run the build in a child that SIGKILLs itself at `point`; returns the staging directory it left."""
    module, attribute, fatal = KILL_POINTS[point]
    child = subprocess.run([sys.executable, "-c", CHILD, module, attribute, str(fatal), str(checkpoint), str(out),
                            str(world_size)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, **(env or {})})
    assert child.returncode == -9, child.stderr[-2000:]
    assert not out.exists()
    (staging,) = out.parent.glob(f".{out.name}.partial-*")
    return staging


def count_written_weights(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the weights the next build writes, appended as it writes them."""
    written: list[str] = []
    original = WeightStream._write_weight

    def counting(stream: WeightStream, writer: object, weight: object) -> None:
        written.append(getattr(weight, "name", ""))
        original(stream, writer, weight)  # type: ignore[arg-type]

    monkeypatch.setattr(WeightStream, "_write_weight", counting)
    return written


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_and_resumed_build_is_byte_identical(checkpoint: Path, uninterrupted: dict[str, bytes], point: str,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "engine"
    staging = killed_build(checkpoint, out, point)
    journal = staging / "weights.journal"
    journaled = len(journal.read_text().splitlines()) if journal.exists() else 0
    rewritten = count_written_weights(monkeypatch)
    result = nemocompile.build(checkpoint, out, target="b200", calibrate=3, resume=True)
    assert comparable_engine_bytes(out) == uninterrupted
    assert not staging.exists() and not list(tmp_path.glob(".engine.*"))
    assert not {"resume.json", "weights.journal", "calibration.safetensors"} & {p.name for p in out.iterdir()}
    # only the weights after the last journaled one were written again
    assert len(rewritten) == WEIGHTS - journaled
    print(f"killed at {point}: {journaled} weights kept, {len(rewritten)} written on resume, "
          f"{result.bytes_written:,} bytes, engine identical")


@pytest.mark.parametrize("checked", [False, True])
def test_a_sharded_build_resumes_its_rank_files_or_rewrites_them_when_it_keeps_a_whole_copy(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checked: bool) -> None:
    """Two ranks, each rank's pieces written straight into its file. Too big for the agreement check
    (as any real model is), the rank files are continued after the last weight every one of them
    verifies; small enough for it, the build also wrote a whole copy, and writes the weights again."""
    limit = {} if checked else {"reference_check_max_params": 0}
    with override(**limit):
        nemocompile.build(checkpoint, tmp_path / "whole", target="b200", calibrate=3, world_size=2)
    expected = comparable_engine_bytes(tmp_path / "whole")
    out = tmp_path / "engine"
    env = {} if checked else {"NEMOCOMPILE_REFERENCE_CHECK_MAX_PARAMS": "0"}
    staging = killed_build(checkpoint, out, "quantize-and-write, before the last weight", 2, env)
    journaled = len((staging / "weights.journal").read_text().splitlines())
    assert journaled == WEIGHTS - 1
    assert all(len(json.loads(line)["sha256"].split(",")) == 2
               for line in (staging / "weights.journal").read_text().splitlines())
    rewritten = count_written_weights(monkeypatch)
    with override(**limit):
        result = nemocompile.build(checkpoint, out, target="b200", calibrate=3, world_size=2, resume=True)
    resumed = comparable_engine_bytes(out)
    # report.md's phase summary says the weights were written again; everything else is identical
    resumed["report.md"] = re.sub(rb"; written again, not resumed: [^|\n]*", b" ", resumed["report.md"])
    assert resumed == expected
    assert len(rewritten) == (WEIGHTS if checked else 1)
    (quantize,) = [phase for phase in result.phases if phase.name == "quantize-and-write"]
    assert ("written again, not resumed" in quantize.summary) == checked
    assert sorted(p.name for p in (out / "weights").iterdir()) == ["rank0.safetensors", "rank1.safetensors"]


def test_resume_against_a_changed_checkpoint_or_options_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in checkpoint.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "engine"
    staging = killed_build(changed, out, "quantize-and-write, before the last weight")
    with pytest.raises(UsageError, match=r"cannot resume the build of .* with calibrate 3, this build has 4"):
        nemocompile.build(changed, out, target="b200", calibrate=4, resume=True)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 2e-5
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=rf"cannot resume the build of {out} from {staging}: the config.json "
                                         "changed since it was made; build without resume=True to start over"):
        nemocompile.build(changed, out, target="b200", calibrate=3, resume=True)
    # a changed tensor file changes the checkpoint's fingerprint
    shard = sorted(changed.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(UsageError, match="the checkpoint changed since it was made"):
        nemocompile.build(changed, out, target="b200", calibrate=3, resume=True)
    assert staging.exists() and not out.exists()  # refused: left as it was
    # without --resume the build starts over, removing it
    shard.write_bytes(shard.read_bytes()[:-1])
    nemocompile.build(changed, out, target="b200", calibrate=3)
    assert not staging.exists() and (out / "manifest.json").is_file()


def test_resume_with_nothing_to_resume_builds_from_scratch(checkpoint: Path, uninterrupted: dict[str, bytes],
                                                           tmp_path: Path) -> None:
    nemocompile.build(checkpoint, tmp_path / "engine", target="b200", calibrate=3, resume=True)
    assert comparable_engine_bytes(tmp_path / "engine") == uninterrupted


def test_a_weight_whose_bytes_changed_is_written_again(checkpoint: Path, uninterrupted: dict[str, bytes],
                                                       tmp_path: Path) -> None:
    """The journal is trusted only as far as the bytes still hash to it."""
    out = tmp_path / "engine"
    staging = killed_build(checkpoint, out, "quantize-and-write, before the last weight")
    entries = [json.loads(line) for line in (staging / "weights.journal").read_text().splitlines()]
    weights = staging / "weights" / "rank0.safetensors"
    data = bytearray(weights.read_bytes())
    start = len(data) - entries[-1]["end"]  # the data region starts after the header
    damaged = 10  # flip a byte of the eleventh weight
    data[start + entries[damaged]["end"] - 1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = nemocompile.build(checkpoint, out, target="b200", calibrate=3, resume=True)
    assert comparable_engine_bytes(out) == uninterrupted
    print(f"a damaged byte in weight {entries[damaged]['weight']}: resumed from there, {result.bytes_written:,} bytes")


@pytest.mark.parametrize("damage", ["a changed scale", "no recorded hash"])
def test_a_saved_calibration_that_no_longer_hashes_to_its_record_is_recomputed(
        checkpoint: Path, uninterrupted: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        damage: str) -> None:
    """calibration.safetensors is verified like the weights: a tampered one (still a valid file, with a
    scale changed) or one without its recorded sha256 is not taken: calibration runs again and says
    why, and the engine is the uninterrupted build's."""
    out = tmp_path / "engine"
    staging = killed_build(checkpoint, out, "quantize-and-write, at the first weight")
    saved = staging / "calibration.safetensors"
    if damage == "a changed scale":
        with safe_open(str(saved), framework="pt") as file:
            metadata = file.metadata()
            scales = {name: file.get_tensor(name) for name in file.keys()}
        first = sorted(scales)[0]
        scales[first] = scales[first] * 2
        save_file(scales, str(saved), metadata=metadata)
    else:
        (staging / "calibration.sha256").unlink()
    calibrations: list[int] = []
    original = nemocompile.driver.calibrate_streamed

    def counting(*args: object, **kwargs: object) -> object:
        calibrations.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nemocompile.driver, "calibrate_streamed", counting)
    result = nemocompile.build(checkpoint, out, target="b200", calibrate=3, resume=True)
    assert calibrations == [1]
    (calibration,) = [phase for phase in result.phases if phase.name == "calibration"]
    why = ("does not match the sha256 recorded when it was saved" if damage == "a changed scale" else
           "has no recorded sha256")
    note = f"; recomputed: calibration.safetensors in the staging directory {why}"
    assert calibration.summary.endswith(note)
    engine = comparable_engine_bytes(out)
    assert note.encode() in engine["report.md"]  # the report says so; otherwise the same engine
    engine["report.md"] = engine["report.md"].replace(note.encode(), b"")
    assert engine == uninterrupted
