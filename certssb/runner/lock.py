"""The run-directory lock: one certssb process writes into a run directory at a time.

`run_lock(out, command)` holds an exclusive `fcntl.flock` on `<out>/.lock` for
the whole of a run, train, certify or report. A second process that asks for
the same directory gets a `CertssbError` naming the holder (pid, host, command,
start time) and saying to wait or pass another --out. The lock belongs to the
open file, so the operating system releases it when the holder exits in any
way, SIGKILL and crashes included: a lock can never be left behind (a dead
holder's record stays in the file, but nobody holds the lock). The file is
never deleted (deleting a lock file lets two processes lock two different
inodes); it is rewritten in place with the holder's details, the one file of
a run directory not written by `certssb.core.files`'s atomic writers.

Nested use in one process (the CLI's certify around `pipeline.run`) is
re-entrant. Under torchrun only rank 0 takes the lock (`Dist.is_main`): the
other ranks write only their own model groups. Where flock is unavailable
(no fcntl, or a filesystem that refuses locks) a warning is printed and the
run goes on unlocked.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

from ..errors import CertssbError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"

# Locks this process holds: real path of the lock file -> [fd, depth].
_held: dict[str, list[int]] = {}
_guard = threading.Lock()


def holder(out: str | os.PathLike) -> Optional[dict]:
    """The details recorded in `<out>/.lock` by its last holder (None if absent or unreadable).

    The record stays after the holder exits; whether it still holds the lock is
    what `run_lock` finds out.
    """
    try:
        text = (Path(out) / LOCK_NAME).read_text(encoding="utf-8")
        info = json.loads(text)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: Optional[dict]) -> str:
    if not info:
        return "another process (its details are not recorded yet)"
    host = info.get("host", "?")
    here = "" if host == socket.gethostname() else " (another machine sharing this folder)"
    return (f"pid {info.get('pid', '?')} on host {host}{here}, running `{info.get('command', '?')}` since "
            f"{info.get('started', '?')}")


def _open_lock_file(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CertssbError(f"{path} is a symlink; a run directory's lock file must be a plain file: "
                               f"delete {path} (or use a fresh --out directory)") from None
        raise CertssbError(f"cannot create the lock file {path} ({e.strerror}); check that --out "
                           f"{path.parent} is a writable folder") from None


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, command: str, *, enabled: bool = True) -> Iterator[Optional[dict]]:
    """Hold the exclusive lock of run directory `out` for the enclosed block.

    out: the run directory (created if missing). command: what this process does
    (recorded for whoever is refused, e.g. "certssb run"). enabled: False does
    nothing (torchrun ranks other than 0). Yields the record written to the lock
    file ({"pid", "host", "command", "started", "argv"}), or None when not locked.
    Raises CertssbError when another process holds the lock.

    Example::

        with run_lock("runs/demo", "certssb report"):
            ...  # no other certssb process writes into runs/demo meanwhile
    """
    if not enabled:
        yield None
        return
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CertssbError(f"cannot create the run directory {out} ({e.strerror}); pass a writable "
                           "--out folder") from None
    if not out.is_dir():
        raise CertssbError(f"--out {out} is a file, not a folder; pass a run directory")
    path = out / LOCK_NAME
    key = os.path.realpath(path)
    with _guard:
        if key in _held:  # re-entrant within this process
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield holder(out)
        finally:
            with _guard:
                _held[key][1] -= 1
        return
    if fcntl is None:  # pragma: no cover - not POSIX
        warnings.warn(f"no fcntl on this platform: {out} is not locked against a second certssb process")
        yield None
        return
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CertssbError(
                f"run directory {out} is in use by {_describe(holder(out))}; wait for it to finish, "
                "or pass another --out directory") from None
        except OSError as e:  # a filesystem without locks (some network mounts)
            warnings.warn(f"cannot lock {path} ({e.strerror}); a second certssb process writing into "
                          f"{out} at the same time would not be stopped")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "argv": list(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        with _guard:
            _held[key] = [fd, 1]
        try:
            yield info
        finally:
            with _guard:
                _held.pop(key, None)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


__all__ = ["LOCK_NAME", "run_lock", "holder"]
