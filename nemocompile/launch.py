"""`nemocompile run ENGINE --world-size N`: start the N ranks of a sharded engine on this machine,
each a `nemocompile run` process of its own with the environment torchrun would give it (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: env:// rendezvous). Rank 0's output is the
command's; the other ranks print nothing but their errors. When a rank fails or dies, the others
are stopped at once and the command fails naming that rank; every rank also gives up on its own
when a collective waits longer than the process-group timeout (settings.distributed_timeout_s)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from nemocompile.base.errors import EngineError

POLL_S = 0.05
STOP_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spawn_ranks(world_size: int, arguments: Sequence[str]) -> int:
    """Run `nemocompile` with `arguments` as `world_size` ranks; the exit status of the run (rank 0's
    when every rank succeeds). Raises EngineError naming the first rank that failed (a failed run: exit 1)."""
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="nemocompile-ranks-") as logs:
        errors = [Path(logs) / f"rank{rank}.err" for rank in range(world_size)]
        try:
            for rank in range(world_size):
                env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                with errors[rank].open("wb") as err:
                    processes.append(subprocess.Popen(
                        [sys.executable, "-m", "nemocompile", *arguments], env=env, stdin=subprocess.DEVNULL,
                        stdout=None if rank == 0 else subprocess.DEVNULL, stderr=err))
            while True:
                codes = [process.poll() for process in processes]
                failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
                if failed:
                    _stop(processes)
                    rank = failed[0]
                    code = codes[rank]
                    assert code is not None
                    how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
                    message = _last_line(errors[rank]).removeprefix("error: ")
                    raise EngineError(f"rank {rank} of {world_size} {how}" + (f": {message}" if message else "")
                                     + "; the other ranks were stopped")
                if all(code == 0 for code in codes):
                    sys.stderr.write(errors[0].read_text(errors="replace"))
                    return 0
                time.sleep(POLL_S)
        except BaseException:
            _stop(processes)
            raise
