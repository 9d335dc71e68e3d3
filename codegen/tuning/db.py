"""The tuning database: SQLite with a versioned schema.

Two tables besides `meta` (which holds the schema version):
- `trials`: every config a sweep scored, measured or modelled (a failure is stored with its error
  and an infinite time). It is the sweep's journal: an interrupted sweep finds what it finished.
- `entries`: the chosen config per kernel problem, shape bucket and environment, with the time of
  the default config beside it and the result of the numerics gate.

Both are keyed by the template's hash, the kernel's problem (its constexprs less the tunable ones)
and formats, the shape bucket, the GPU name and arch, and the driver, CUDA, Triton and CUTLASS
versions. `Environment.mismatch` says why an entry recorded elsewhere may not be used; lookups
return those entries with their reasons instead of dropping them silently."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from nemocompile.base.errors import UsageError

from .space import Config, config_text, parse_config

SCHEMA_VERSION = 1
KEY_COLUMNS = ("kernel", "template_hash", "problem", "formats", "bucket", "gpu", "arch", "driver", "cuda", "triton",
               "cutlass")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials ({', '.join(f'{c} TEXT NOT NULL' for c in KEY_COLUMNS)},
    scorer TEXT NOT NULL, config TEXT NOT NULL, seconds REAL, error TEXT, created REAL NOT NULL,
    PRIMARY KEY ({', '.join(KEY_COLUMNS)}, scorer, config));
CREATE TABLE IF NOT EXISTS entries ({', '.join(f'{c} TEXT NOT NULL' for c in KEY_COLUMNS)},
    source TEXT NOT NULL, config TEXT NOT NULL, seconds REAL NOT NULL, default_seconds REAL,
    checked TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY ({', '.join(KEY_COLUMNS)}, source));
"""
TUNED, MODELLED = "tuned", "modelled"  # an entry's source: measured on the GPU, or ranked by the cost model


@dataclass(frozen=True)
class Environment:
    """Where a time was taken (or for which GPU it was modelled)."""

    gpu: str  # the target's name (h100, b200, ...)
    arch: str
    driver: str  # "" where there is no GPU (a modelled entry)
    cuda: str  # the CUDA of the ptxas that compiles the kernels
    triton: str
    cutlass: str = ""  # "" until CUTLASS candidates exist

    def mismatch(self, recorded: Environment) -> str | None:
        """Why an entry recorded in `recorded` may not be used here (None: it may). A driver is
        compared only where both sides have one (an entry modelled, or a build without a GPU)."""
        for name in ("gpu", "arch", "triton", "cuda", "cutlass"):
            mine, theirs = getattr(self, name), getattr(recorded, name)
            if mine != theirs:
                label = {"gpu": "GPU", "arch": "arch", "triton": "Triton", "cuda": "CUDA", "cutlass": "CUTLASS"}[name]
                return f"recorded for {label} {theirs or 'none'}, this build uses {mine or 'none'}"
        if self.driver and recorded.driver and self.driver != recorded.driver:
            return f"recorded with driver {recorded.driver}, this machine has {self.driver}"
        return None


@dataclass(frozen=True)
class KernelKey:
    """A kernel problem: which template (and its hash), what it computes, its formats."""

    kernel: str  # the template entry
    template_hash: str
    problem: str  # JSON of the constexprs less the config
    formats: str


@dataclass(frozen=True)
class Trial:
    config: Config
    seconds: float  # math.inf: failed
    error: str


@dataclass(frozen=True)
class Entry:
    key: KernelKey
    bucket: int
    environment: Environment
    source: str
    config: Config
    seconds: float
    default_seconds: float | None
    checked: str


def _row_key(key: KernelKey, bucket: int, env: Environment) -> tuple[str, ...]:
    return (key.kernel, key.template_hash, key.problem, key.formats, str(bucket), env.gpu, env.arch, env.driver,
            env.cuda, env.triton, env.cutlass)


class TuningDB:
    """One database file. `create` makes it when missing (the tune command); a build opens an
    existing one only."""

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        if not create and not path.is_file():
            raise UsageError(f"tuning database {path} does not exist (make one with `nemocompile tune`)")
        try:
            self.connection = sqlite3.connect(path, isolation_level=None)
            version = self._version()
        except sqlite3.DatabaseError as error:
            raise UsageError(f"{path} is not a nemocompile tuning database: {error}") from None
        # the journal commits every score; WAL without a sync per commit keeps that cheap (a killed
        # process loses nothing committed; only a power cut may lose the last commits)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        if version is None:
            if not create:
                raise UsageError(f"{path} is not a nemocompile tuning database (it has no schema version)")
            self.connection.executescript(_SCHEMA)
            self.connection.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif version != str(SCHEMA_VERSION):
            raise UsageError(f"tuning database {path} has schema version {version}; this nemocompile reads "
                             f"version {SCHEMA_VERSION} (tune again into a new file)")

    def _version(self) -> str | None:
        tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            return None
        row = self.connection.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.connection.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    # ---- the journal of a sweep ----

    def record_trial(self, key: KernelKey, bucket: int, env: Environment, scorer: str, trial: Trial) -> None:
        """One scored config, committed at once (a sweep killed after this keeps it)."""
        seconds = None if math.isinf(trial.seconds) else trial.seconds
        self.connection.execute(
            f"INSERT OR REPLACE INTO trials VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 5))})",
            (*_row_key(key, bucket, env), scorer, config_text(trial.config), seconds, trial.error or None,
             time.time()))

    def trials(self, key: KernelKey, bucket: int, env: Environment, scorer: str) -> dict[Config, Trial]:
        where = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)
        rows = self.connection.execute(f"SELECT config, seconds, error FROM trials WHERE {where} AND scorer = ?",
                                       (*_row_key(key, bucket, env), scorer))
        found = {}
        for text, seconds, error in rows:
            config = parse_config(text)
            found[config] = Trial(config, math.inf if seconds is None else float(seconds), error or "")
        return found

    # ---- chosen configs ----

    def record_entry(self, entry: Entry) -> None:
        self.connection.execute(
            f"INSERT OR REPLACE INTO entries VALUES ({', '.join('?' * (len(KEY_COLUMNS) + 6))})",
            (*_row_key(entry.key, entry.bucket, entry.environment), entry.source, config_text(entry.config),
             entry.seconds, entry.default_seconds, entry.checked, time.time()))

    def entries(self, kernel: str | None = None, problem: str | None = None, formats: str | None = None) -> list[Entry]:
        """Entries, all or those of one kernel problem (whatever their template hash and environment)."""
        where, args = [], []
        for column, value in (("kernel", kernel), ("problem", problem), ("formats", formats)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        query = "SELECT * FROM entries" + (f" WHERE {' AND '.join(where)}" if where else "") + \
            " ORDER BY kernel, problem, formats, CAST(bucket AS INTEGER), source"
        result = []
        for row in self.connection.execute(query, args):
            values = dict(zip([c for c in KEY_COLUMNS] + ["source", "config", "seconds", "default_seconds",
                                                           "checked", "created"], row, strict=True))
            env = Environment(*(str(values[f.name]) for f in fields(Environment)))
            result.append(Entry(KernelKey(str(values["kernel"]), str(values["template_hash"]),
                                          str(values["problem"]), str(values["formats"])),
                                int(values["bucket"]), env, str(values["source"]), parse_config(str(values["config"])),
                                float(values["seconds"]),
                                None if values["default_seconds"] is None else float(values["default_seconds"]),
                                str(values["checked"])))
        return result


def bucket_of(tokens: int) -> int:
    """The shape bucket of a call of `tokens` tokens: the power of two at or above it."""
    return 1 if tokens <= 1 else 1 << (tokens - 1).bit_length()


@dataclass(frozen=True)
class Lookup:
    """What the database holds for one kernel problem: the entry to use (or None), and the entries
    of the same problem it skipped, each with the reason."""

    entry: Entry | None
    skipped: tuple[tuple[Entry, str], ...]


def lookup(db: TuningDB, key: KernelKey, tokens: int, env: Environment) -> Lookup:
    """The usable entry nearest `tokens` (log scale; measured before modelled at equal distance)."""
    usable: list[Entry] = []
    skipped: list[tuple[Entry, str]] = []
    for entry in db.entries(key.kernel, key.problem, key.formats):
        if entry.key.template_hash != key.template_hash:
            skipped.append((entry, f"recorded for template hash {entry.key.template_hash}, this build's "
                                   f"{key.kernel} template hashes to {key.template_hash}"))
            continue
        reason = env.mismatch(entry.environment)
        if reason is not None:
            skipped.append((entry, reason))
        else:
            usable.append(entry)
    if not usable:
        return Lookup(None, tuple(skipped))
    target = math.log2(bucket_of(tokens))
    best = min(usable, key=lambda e: (abs(math.log2(e.bucket) - target), e.source != TUNED, e.bucket))
    return Lookup(best, tuple(skipped))
