"""Private key files (the audit's keys, TLS's key): created 0600 from the first byte,
refused when group or others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class KeyFileError(Exception):
    """A key file cannot be used as it is; the message says how to fix it."""


def check_private(path: Path) -> None:
    """Refuse a key file that group or others can read or write."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} has mode {mode:04o}: it must not be readable by group or "
            f"others; run: chmod 600 {path}"
        )


def fsync_dir(path: Path) -> None:
    """Make a new name in ``path`` durable (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Create a key file with mode 0600 from the first byte (never a wider window)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)
