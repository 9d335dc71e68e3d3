"""Resumable builds. Every build records in its staging directory what it is building (`resume.json`:
the build key: the checkpoint's fingerprint, the hashes of config.json, the policy file and the
calibration data, every option that changes the engine, and the nemocompile version), the
calibration result once it has one (`calibration.safetensors`, with its sha256 in
`calibration.sha256`: taken on resume only while it still hashes to it, else recomputed, saying
why), and a journal line for each weight completely written (`weights.journal`: the weight, where
its bytes end, the sha256 of the weights file from its first byte through them, and its
quantization error). A build that is killed leaves that directory behind; `build --resume` adopts
it, refuses it when the key differs (naming what changed), and continues after the last weight
whose file prefix still hashes to what the journal recorded. The result is byte-identical to an
uninterrupted build. The resume files are removed before the manifest is written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemocompile.base.errors import NemocompileError, UsageError
from nemocompile.graph.checkpoint import Checkpoint

from . import __version__
from .options import BuildOptions
from .weight_stream import QuantizationError, WrittenWeight

RESUME_FILE = "resume.json"
JOURNAL_FILE = "weights.journal"
CALIBRATION_FILE = "calibration.safetensors"
CALIBRATION_HASH_FILE = "calibration.sha256"
RESUME_FILES = (RESUME_FILE, JOURNAL_FILE, CALIBRATION_FILE, CALIBRATION_HASH_FILE)
HASH_CHUNK = 1 << 24
# options that do not change the engine's bytes (where it goes, how it is shown, where it calibrates:
# calibration is bit-identical on the CPU only, so the device is part of the key)
_NOT_IN_KEY = ("force", "print_after", "resume")


def _file_sha256(path: Path | None) -> str | None:
    """The file's sha256; None when there is no regular file (a FIFO is never opened: the build
    refuses it by name where it reads it)."""
    if path is None or not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_key(model_dir: Path, options: BuildOptions) -> dict[str, Any]:
    """What decides the engine's bytes, as plain JSON (compared field by field on resume)."""
    try:
        with Checkpoint.open(model_dir) as checkpoint:
            fingerprint: str | None = checkpoint.fingerprint()
    except NemocompileError:  # the import reports what is wrong with it, in its own order
        fingerprint = None
    settings = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)
                if field.name not in _NOT_IN_KEY}
    settings = {name: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
                for name, value in settings.items()}
    return {
        "nemocompile": __version__,
        "checkpoint": fingerprint,
        "config.json": _file_sha256(model_dir / "config.json"),
        "tokenizer.json": _file_sha256(model_dir / "tokenizer.json"),
        "policy file": _file_sha256(options.policy_file),
        "calibration data": _file_sha256(options.calibration_data),
        "options": settings,
    }


def write_key(stage: Path, key: Mapping[str, Any]) -> None:
    (stage / RESUME_FILE).write_text(json.dumps(key, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def why_not_resumable(stage: Path, key: Mapping[str, Any]) -> str | None:
    """None when the staging directory was made by a build of this same key; else what differs."""
    try:
        found = json.loads((stage / RESUME_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it holds no readable {RESUME_FILE}"
    if not isinstance(found, dict):
        return f"its {RESUME_FILE} is not an object"
    for what in ("nemocompile", "checkpoint", "config.json", "tokenizer.json", "policy file", "calibration data"):
        if found.get(what) != key[what]:
            if what == "nemocompile":
                return f"it was made by nemocompile {found.get(what)}, this is {key[what]}"
            return f"the {what} changed since it was made" if key[what] else f"it was made with a {what}"
    options = found.get("options")
    if not isinstance(options, dict):
        return f"its {RESUME_FILE} names no options"
    for name, value in key["options"].items():
        if options.get(name) != value:
            flag = "--" + name.replace("_", "-")
            return f"it was made with {flag} {options.get(name)!r}, this build has {value!r}"
    return None


# ---------------------------------------------------------------------------------------------
# The weights journal


def _line(entry: WrittenWeight) -> str:
    error = None if entry.error is None else dataclasses.asdict(entry.error)
    if error is not None:  # JSON has no Infinity (an exact copy's SQNR): floats go as their repr
        error["rel_rms"], error["sqnr_db"] = repr(error["rel_rms"]), repr(error["sqnr_db"])
    return json.dumps({"weight": entry.weight, "tensors": entry.tensors, "end": entry.end, "sha256": entry.sha256,
                       "error": error}, sort_keys=True) + "\n"


def _entry(line: str) -> WrittenWeight:
    data = json.loads(line)
    error = data["error"]
    if error is not None:
        error = QuantizationError(str(error["weight"]), str(error["format"]), float(error["rel_rms"]),
                                  float(error["sqnr_db"]))
    return WrittenWeight(str(data["weight"]), int(data["tensors"]), int(data["end"]), str(data["sha256"]), error)


def read_journal(stage: Path) -> list[WrittenWeight]:
    """The journal's complete lines (a kill can cut the last one short: it is not counted)."""
    path = stage / JOURNAL_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            entries.append(_entry(line))
        except (ValueError, KeyError, TypeError):
            break
    return entries


def verified_prefix(entries: list[WrittenWeight], weights_file: Path, data_start: int,
                    order: list[str]) -> list[WrittenWeight]:
    """The journal's leading entries whose weights come in `order` and whose file, from its first byte
    through each entry's end, still hashes to what was recorded."""
    verified: list[WrittenWeight] = []
    if not weights_file.is_file():
        return verified
    size = weights_file.stat().st_size
    digest = hashlib.sha256()
    with weights_file.open("rb") as file:
        header = file.read(data_start)
        if len(header) < data_start:
            return verified
        digest.update(header)
        start = 0
        for index, entry in enumerate(entries):
            if index >= len(order) or entry.weight != order[index] or entry.end < start \
                    or data_start + entry.end > size:
                break
            remaining = entry.end - start
            while remaining:
                chunk = file.read(min(HASH_CHUNK, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
            if remaining or digest.copy().hexdigest() != entry.sha256:
                break
            verified.append(entry)
            start = entry.end
    return verified


def verified_rank_prefix(entries: list[WrittenWeight], files: list[Path], data_start: int,
                         order: list[str]) -> list[WrittenWeight]:
    """verified_prefix of files written in step (a sharded build's rank files, one position for all):
    each entry's sha256 is every file's, joined by ','; an entry counts when every file verifies it."""
    counts = []
    for index, path in enumerate(files):
        own = []
        for entry in entries:
            hashes = entry.sha256.split(",")
            if len(hashes) != len(files):
                break
            own.append(dataclasses.replace(entry, sha256=hashes[index]))
        counts.append(len(verified_prefix(own, path, data_start, order)))
    return entries[:min(counts, default=0)]


class Journal:
    """Appends one line per weight written; the lines already verified are kept."""

    def __init__(self, stage: Path, kept: list[WrittenWeight]) -> None:
        self.path = stage / JOURNAL_FILE
        self.kept = kept
        with self.path.open("w", encoding="utf-8") as file:  # rewritten: only the verified lines stay
            file.writelines(_line(entry) for entry in kept)

    def record(self, entry: WrittenWeight) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(_line(entry))
            file.flush()


# ---------------------------------------------------------------------------------------------
# The calibration result


def save_calibration(stage: Path, scales: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    """Written to a temporary name, its sha256 recorded beside it, then renamed, so a kill leaves it
    whole (with its hash) or absent."""
    partial = stage / f"{CALIBRATION_FILE}.partial"
    tensors = {name: value.contiguous() for name, value in scales.items()}
    save_file(tensors, str(partial), metadata={"info": json.dumps(dict(info), sort_keys=True)})
    digest = stage / f"{CALIBRATION_HASH_FILE}.partial"
    digest.write_text(f"{_file_sha256(partial)}\n", encoding="ascii")
    os.replace(digest, stage / CALIBRATION_HASH_FILE)
    os.replace(partial, stage / CALIBRATION_FILE)


def load_calibration(stage: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str | None:
    """The calibration a killed build saved; None when there is none; or, when it is there but not
    taken (to be recomputed), a sentence saying why: its bytes no longer hash to the sha256
    recorded when it was saved, or it cannot be read."""
    path = stage / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        recorded = (stage / CALIBRATION_HASH_FILE).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return f"{CALIBRATION_FILE} in the staging directory has no recorded sha256"
    if _file_sha256(path) != recorded:
        return f"{CALIBRATION_FILE} in the staging directory does not match the sha256 recorded when it was saved"
    try:
        with safe_open(str(path), framework="pt") as file:
            info = json.loads((file.metadata() or {})["info"])
            return {name: file.get_tensor(name) for name in file.keys()}, info
    except Exception:  # a damaged file of any kind is recomputed, never trusted
        return f"{CALIBRATION_FILE} in the staging directory cannot be read"


def remove_resume_files(stage: Path) -> None:
    for name in (*RESUME_FILES, f"{CALIBRATION_FILE}.partial", f"{CALIBRATION_HASH_FILE}.partial"):
        (stage / name).unlink(missing_ok=True)


def refuse(stage: Path, out: Path, reason: str) -> UsageError:
    return UsageError(f"cannot resume the build of {out} from {stage}: {reason}; build without --resume to "
                      "start over (that removes it)")
