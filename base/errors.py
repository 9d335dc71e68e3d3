"""Errors a user can meet. Each carries one sentence naming the file, tensor or option at fault."""

from __future__ import annotations


class NemocompileError(Exception):
    """Base of every error that the CLI reports as one sentence with a non-zero exit. The exit code
    follows one rule (README, "Exit codes"): 1 a failed operation (an input that is missing,
    malformed or refused), 2 a usage error (the command line asks for something invalid)."""

    exit_code = 1


class ConfigError(NemocompileError):
    """config.json is missing, of another model type, or inconsistent."""


class CheckpointError(NemocompileError):
    """A checkpoint's tensors are missing, misshapen, of the wrong dtype, or its files are corrupt."""


class IRError(NemocompileError):
    """The IR text does not parse, or a graph does not verify."""


class EngineError(NemocompileError):
    """An engine directory is missing, tampered with, or built for another GPU."""


class StateError(NemocompileError):
    """A saved sequence state (snapshot) is missing, malformed, or was saved by another engine."""


class CompileError(NemocompileError):
    """A kernel does not compile ahead of time (Triton or ptxas refuses its specialisation), or its
    binary cannot be inspected."""


class TargetError(NemocompileError):
    """An unknown target name or a target that cannot run what was asked: the command line's
    --target or precision choice is at fault, so a usage error."""

    exit_code = 2


class UsageError(NemocompileError):
    """An option or argument is invalid."""

    exit_code = 2


def join_problems(header: str, problems: list[str], limit: int = 20) -> str:
    """One sentence that lists every problem found, so the user fixes them all in one go."""
    shown = problems[:limit]
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{header}: " + "; ".join(shown) + more + "."
