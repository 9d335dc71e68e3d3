"""`nemocompile run --turns FILE`: one conversation fed turn by turn into one cache, each turn
costing only its own tokens (and the previous turn's last generated token, not yet in the state);
`--load-state` starts from a snapshot and `--save-state` writes one at the end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nemocompile.base.errors import UsageError

from .cache import Cache
from .engine import Engine
from .tokenizer import ByteTokenizer


@dataclass(frozen=True)
class TurnResult:
    """One turn: the tokens generated, the tokens the engine processed for it (its own and the
    previous turn's pending token), the tokens the sequence's state holds after it, and its time."""

    generated_ids: list[int]
    processed_tokens: int
    context_tokens: int
    seconds: float

    def as_json(self) -> dict[str, object]:
        return {"generated_ids": self.generated_ids, "processed_tokens": self.processed_tokens,
                "context_tokens": self.context_tokens, "seconds": round(self.seconds, 4)}


def read_turns(path: Path, tokenizer: ByteTokenizer | None, continuing: bool) -> list[list[int]]:
    """The turns of `path`, one per non-empty line: text, tokenized, for an engine with a tokenizer (the
    first turn of a new conversation gets its BOS); comma-separated token ids for one without."""
    if not path.is_file():
        raise UsageError(f"--turns {path} is not a readable file")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"--turns {path} is not UTF-8 text") from None
    if not lines:
        raise UsageError(f"--turns {path} holds no turn (one turn per non-empty line)")
    turns: list[list[int]] = []
    for number, line in enumerate(lines, start=1):
        if tokenizer is not None:
            turns.append(tokenizer.encode(line, add_bos=number == 1 and not continuing))
            continue
        try:
            turns.append([int(part) for part in line.replace(" ", "").split(",") if part])
        except ValueError:
            raise UsageError(f"--turns {path}, line {number}: an engine without a tokenizer takes comma-separated "
                             f"token ids, got '{line[:40]}'") from None
    return turns


def converse(engine: Engine, turns: Sequence[list[int]], cache: Cache, max_new_tokens: int, temperature: float,
             top_p: float, seed: int | None, stop_token_ids: Iterable[int] | None,
             on_token: Callable[[int], None] | None = None,
             on_turn: Callable[[int, TurnResult], None] | None = None) -> list[TurnResult]:
    """Feed `turns` one after the other into sequence 0 of `cache`, generating after each."""
    if cache.batch_size != 1:
        raise UsageError(f"a conversation continues one sequence, the cache holds {cache.batch_size}")
    results: list[TurnResult] = []
    for number, turn in enumerate(turns):
        processed = len(cache.pending[0]) + len(turn)
        start = time.perf_counter()
        generated: list[int] = []
        turn_seed = None if seed is None else seed + number
        stops = None if stop_token_ids is None else list(stop_token_ids)
        for step in engine.stream([turn], max_new_tokens, temperature, top_p, turn_seed, stops, cache=cache):
            token = step.tokens[0]
            if token is not None:
                generated.append(token)
                if on_token is not None:
                    on_token(token)
        result = TurnResult(generated, processed, cache.host_lengths[0], time.perf_counter() - start)
        results.append(result)
        if on_turn is not None:
            on_turn(number, result)
    return results
