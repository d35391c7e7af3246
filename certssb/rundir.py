"""Run directory compatibility: refuse a run directory this certssb cannot safely continue.

`config.json` records the on-disk layout version ("format", `RUN_FORMAT`) and
the certssb version that wrote it. `check_compatible(out)` is called before a
command reads or writes a run directory (run, train, certify, report): a
directory of another format, or written by a newer certssb, is refused with a
message that says what to do, instead of being misread or half overwritten.
A folder without config.json (a new run) passes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .errors import CheckpointError

# On-disk layout of a run directory. Bump it when files change meaning; it also keys
# every stage's fingerprint (certssb.pipeline), so a bump retrains everything.
# 2: Gaussian noise from 53-bit uniforms (one Philox call per pair of normals).
RUN_FORMAT = 2


def package_version() -> str:
    """The installed certssb version ("unknown" when no metadata is found)."""
    try:
        from importlib.metadata import version
        return version("certssb")
    except Exception:
        return "unknown"


def _version_tuple(text: object) -> Optional[tuple[int, ...]]:
    """(major, minor, patch, ...) of a version string's leading release numbers, else None."""
    if not isinstance(text, str):
        return None
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _newer(saved: object, current: str) -> bool:
    a, b = _version_tuple(saved), _version_tuple(current)
    if a is None or b is None:
        return False  # "unknown" on either side: nothing to compare
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) > b + (0,) * (width - len(b))


def check_compatible(out: str | os.PathLike, current_version: Optional[str] = None) -> Optional[dict]:
    """Raise CheckpointError if `out` is a run directory this certssb must not touch.

    Refused: a config.json that is not valid JSON or not a certssb run record; a
    "format" other than RUN_FORMAT; a directory written by a newer certssb than
    `current_version` (default: the installed one). Returns the parsed config.json,
    or None when there is none (a new run directory).

    Example::

        check_compatible("runs/demo")  # None for a fresh folder, else its config.json
    """
    from .fileio import read_json

    out = Path(out)
    path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a run directory; pass a folder to --out")
    if not path.exists():
        return None
    saved = read_json(path)
    current = current_version if current_version is not None else package_version()
    if not isinstance(saved, dict) or "format" not in saved or not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{path} is not a certssb run record (no 'format' and 'config'); "
                              f"{out} is not a certssb run directory: pass another --out")
    fmt, by = saved.get("format"), saved.get("certssb", "unknown")
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise CheckpointError(f"{path} has an invalid run format {fmt!r}; the file is corrupt: "
                              "use a fresh --out directory")
    if fmt > RUN_FORMAT or _newer(by, current):
        raise CheckpointError(
            f"{out} was written by certssb {by} (run format {fmt}); this is certssb {current} "
            f"(run format {RUN_FORMAT}), which cannot safely read or continue it: upgrade certssb "
            f"(pip install -U certssb) or use a fresh --out directory")
    if fmt < RUN_FORMAT:
        raise CheckpointError(
            f"{out} was written by certssb {by} in the older run format {fmt}; this certssb "
            f"({current}) writes format {RUN_FORMAT} and cannot continue it: rerun into a fresh --out "
            f"directory, or use certssb {by} to work with this one")
    return saved


__all__ = ["RUN_FORMAT", "package_version", "check_compatible"]
