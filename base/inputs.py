"""Opening the files a user names as inputs (config.json, safetensors files, a policy file,
calibration data): only regular files, and never more bytes than such a file can sensibly hold.

A FIFO would block the build forever and a device such as /dev/zero never ends, so both are
refused by name before a byte is read. The file is opened non-blocking and checked on the open
descriptor, so a path swapped between a check and the open cannot slip a FIFO or device past it.
A symbolic link to a regular file is followed (the Hugging Face cache links every file).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import NemocompileError

MIB = 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular_file(path: Path, what: str, error: type[NemocompileError]) -> Iterator[BinaryIO]:
    """`path` opened for binary reading, or `error` naming `what` and the path when it is missing,
    unreadable, or anything but a regular file (a directory, FIFO, device or socket)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None
    try:
        mode = os.fstat(descriptor).st_mode
    except OSError as failure:
        os.close(descriptor)
        raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise error(f"{what} {path} is {_kind(mode)}, not a regular file")
    # O_NONBLOCK means nothing for a regular file, so reads behave as usual.
    with os.fdopen(descriptor, "rb") as handle:
        yield handle


def read_regular_bytes(path: Path, what: str, error: type[NemocompileError], limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes (see `open_regular_file`)."""
    with open_regular_file(path, what, error) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as failure:
            raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit:,} bytes, more than such a file ever holds")
    return data


def read_regular_text(path: Path, what: str, error: type[NemocompileError], limit: int) -> str:
    """A regular UTF-8 text file of at most `limit` bytes."""
    data = read_regular_bytes(path, what, error, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise error(f"{what} {path} is not UTF-8 text (byte {failure.start})") from None
