"""Private files and directories: 0600 files and 0700 directories from the
first byte, whatever the process umask.

Theory of operation
-------------------
A file is created by ``os.open(path, O_CREAT | ..., 0o600)``: the kernel
applies the umask, which can only *remove* bits, so the file is never more
open than 0600, not even for the instant between creation and the first
write. ``fchmod(fd, 0o600)`` then restores bits a strict umask removed (so
the owner can still read it), and tightens a file that already existed with
a looser mode *before* anything is written into it. Directories are made
with ``mkdir(mode=0o700)`` one level at a time and then ``chmod``-ed to 0700,
so existing directories are tightened too. :func:`write_private` writes to a
fresh ``O_EXCL`` temporary file and renames it into place, so readers see
either the old content or the new, never a partial secret.

Every writer of node state (journal, meta, snapshots, node configs, keys,
``cluster.toml``, logs) goes through here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) as 0700 directories; tighten it
    to 0700 if it exists. Returns it as a ``Path``. Parents that already
    existed are left as they are."""
    p = Path(path)
    missing: list[Path] = []
    q = p
    while not q.exists():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass
        os.chmod(d, DIR_MODE)
    os.chmod(p, DIR_MODE)
    return p


def open_private_fd(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open(path, flags | O_CREAT, 0o600)`` and ``fchmod`` to 0600
    before returning (see the module doc). ``flags`` may add ``O_EXCL``,
    ``O_TRUNC``, ``O_APPEND``; it must include an access mode."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> IO[Any]:
    """Like ``open(path, mode)`` for ``w``/``a`` modes (binary or text), but the
    file is 0600 from creation on."""
    access = os.O_RDWR if "+" in mode else os.O_WRONLY
    if mode.startswith("w"):
        flags = access | os.O_TRUNC
    elif mode.startswith("a"):
        flags = access | os.O_APPEND
    elif mode.startswith("x"):
        flags = access | os.O_EXCL
    else:
        raise ValueError(f"open_private: mode {mode!r} does not create a file")
    return os.fdopen(open_private_fd(path, flags), mode.replace("x", "w"), **kwargs)


def write_private(path: str | os.PathLike[str], data: bytes | str, *, fsync: bool = False) -> None:
    """Atomically replace ``path`` with ``data``, as a 0600 file: write a new
    ``O_EXCL`` temporary file next to it, then rename it over ``path``."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(6)}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = open_private_fd(tmp, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with_suppressed_unlink(tmp)
        raise


def with_suppressed_unlink(path: Path) -> None:
    """Remove ``path`` if it exists; ignore errors (cleanup of a temporary)."""
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "open_private",
    "open_private_fd",
    "private_dir",
    "write_private",
]
