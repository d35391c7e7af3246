"""Atomic, pickle-free file writing and checksums.

Every file the package writes goes through `atomic_write_bytes` (write a
temporary file in the same folder, fsync, `os.replace`, fsync the folder), so
a crash leaves either the old file or the new one, never half of one. Tensors
are stored as safetensors, everything else as JSON: nothing is ever unpickled.
(The one exception is a run directory's `.lock`, see `certssb.runner.lock`: a lock
must stay on one inode, so it is rewritten in place; it holds no data.)

Every safetensors file carries its own content checksum (metadata key
`CHECKSUM_KEY`: sha256 of the parsed header without that key, then the data
buffer), so a truncated or altered file is refused on load even where no
manifest records its sha256 (sigma vectors, region stores). `safe_child`
checks a file name read from a run directory before it is followed.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

import torch

from ..errors import CheckpointError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file written in parts to a temporary file in its folder, then fsynced and renamed into
    place on `commit()` (`atomic_write_bytes` for content too large to hold in memory at once);
    `abort()` removes the temporary file. binary=False writes text (utf-8, no newline mangling).

    Example::

        f = AtomicFile(Path("big.csv"))
        try:
            for part in parts:
                f.write(part)
            f.commit()
        except BaseException:
            f.abort()
            raise
    """

    def __init__(self, path: str | os.PathLike, binary: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.f = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")

    def write(self, data: str | bytes | memoryview) -> None:
        self.f.write(data)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        Path(self.tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error that names the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); delete it and rerun") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


CHECKSUM_KEY = "certssb_sha256"
# A safetensors header larger than this is not one of ours (ours are a few KB).
_MAX_HEADER = 100 << 20


def _split_safetensors(data: bytes, path: Path) -> tuple[dict, memoryview]:
    """(parsed JSON header, data buffer) of a safetensors file; CheckpointError if unreadable."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is truncated ({len(data)} bytes, not a safetensors file); "
                              "delete it and rerun to rebuild it")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise CheckpointError(f"{path} is truncated or not a safetensors file (header of {n} bytes, "
                              f"file of {len(data)}); delete it and rerun to rebuild it")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({e}); "
                              "delete it and rerun to rebuild it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    return header, memoryview(data)[8 + n:]  # no copy of the tensor bytes


def content_digest(header: dict, pieces: Iterable[bytes | memoryview]) -> str:
    """The embedded checksum: sha256 of a safetensors header (without CHECKSUM_KEY, canonical
    JSON) and its data buffer, given in pieces (writers that stream their data use this too)."""
    head = dict(header)
    meta = dict(head.get("__metadata__") or {})
    meta.pop(CHECKSUM_KEY, None)
    if meta:
        head["__metadata__"] = meta
    else:
        head.pop("__metadata__", None)
    h = hashlib.sha256(json.dumps(head, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    h.update(b"\0")
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


def _content_digest(header: dict, buffer: bytes | memoryview) -> str:
    return content_digest(header, [buffer])


def _one_substitution(a: str, b: str) -> bool:
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically, with an embedded content checksum; return the file's sha256.

    metadata: string key/values stored in the header (`CHECKSUM_KEY` is reserved).
    Example::

        sha = save_tensors("w.safetensors", {"w": torch.zeros(3)})
        load_tensors("w.safetensors", expected_sha256=sha)["w"]  # tensor([0., 0., 0.])
    """
    from safetensors.torch import save

    meta = dict(metadata) if metadata else {}
    meta.pop(CHECKSUM_KEY, None)
    plain = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta or None)
    header, buffer = _split_safetensors(plain, Path(path))
    # the same file with the checksum added to its header (offsets are relative to the buffer)
    header["__metadata__"] = {**meta, CHECKSUM_KEY: _content_digest(header, buffer)}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes
    data = b"".join((struct.pack("<Q", len(head)), head, buffer))
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tensors(path: str | os.PathLike, expected_sha256: str | None = None, *,
                 require_checksum: bool = False) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle), refusing a truncated or altered one.

    expected_sha256: the whole file's sha256 as recorded elsewhere (a manifest);
    checked first. Otherwise the embedded content checksum (`CHECKSUM_KEY`, written by
    `save_tensors`) is verified. Files written before checksums were embedded have
    none and load unverified unless require_checksum=True. Raises CheckpointError
    (what was wrong and what to do) for a missing, truncated, corrupt or altered file.
    """
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a safetensors file") from None
    if expected_sha256 is not None:
        if sha256_bytes(data) != expected_sha256:
            raise CheckpointError(f"{path} does not match its recorded checksum (truncated or altered); "
                                  "rerun the same command to rebuild it")
    else:
        header, buffer = _split_safetensors(data, path)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path} is corrupt: its metadata is not a JSON object")
        recorded = meta.get(CHECKSUM_KEY)
        if recorded is None:
            if any(isinstance(k, str) and _one_substitution(k, CHECKSUM_KEY) for k in meta):
                raise CheckpointError(f"{path} is corrupt: its checksum entry is damaged; delete it and "
                                      "rerun to rebuild it")
            if require_checksum:
                raise CheckpointError(f"{path} carries no content checksum (written by an older certssb), "
                                      "so it cannot be verified; delete it and rerun to rebuild it")
        elif recorded != _content_digest(header, buffer):
            raise CheckpointError(f"{path} does not match its embedded checksum (truncated or altered); "
                                  "delete it and rerun to rebuild it")
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); delete it and rerun "
                              "to rebuild it") from None


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint8: "U8"}


def _pieces(parts: dict[str, list[torch.Tensor]], order: list[str]) -> Iterator[memoryview]:
    """The data buffer of a safetensors file, as the raw bytes of its tensors' pieces in file order."""
    for name in order:
        for t in parts[name]:
            if t.numel():
                yield t.detach().cpu().contiguous().numpy().data


def save_tensor_pieces(path: str | os.PathLike, parts: dict[str, list[torch.Tensor]],
                       metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically from tensors given in pieces (each entry the concatenation
    of its pieces along dim 0), streaming: no copy of the data is made. Returns the file's sha256.

    Lays the file out as safetensors (0.8) does (header: __metadata__, then the tensors by
    decreasing alignment, then name; compact JSON padded with spaces to 8 bytes), so the bytes
    equal `save_tensors` of the concatenated tensors (a test checks it)."""
    infos = {}
    for name, pieces in parts.items():
        t0 = pieces[0]
        rows = sum(int(t.shape[0]) for t in pieces)
        infos[name] = (t0.dtype, [rows, *t0.shape[1:]], t0.element_size())
    order = sorted(parts, key=lambda k: (-infos[k][2], k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        dtype, shape, size = infos[name]
        nbytes = int(np.prod(shape)) * size
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # the checksum `save_tensors` embeds (a first pass over the same memory: no copy)
    header["__metadata__"] = {**metadata, CHECKSUM_KEY: content_digest(header, _pieces(parts, order))}
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    f = AtomicFile(Path(path), binary=True)
    try:
        for data in [len(head).to_bytes(8, "little"), head, *_pieces(parts, order)]:
            f.write(data)
            h.update(data)
        f.commit()
    except BaseException:
        f.abort()
        raise
    return h.hexdigest()



def safe_child(root: str | os.PathLike, name: object, *, source: str | os.PathLike = "a record") -> Path:
    """`root / name` for a file name read from a file inside a run directory, if it stays inside `root`.

    Refuses (CheckpointError) anything but a relative path without "..": absolute
    paths, drive letters, backslashes, NUL, and names whose real path (symlinks
    followed) leaves `root`. source: the file that named it, for the message.
    Example: safe_child("run/models/rab", "model-00000.safetensors") -> that path;
    safe_child("run/models/rab", "../../etc/passwd") raises.
    """
    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{source} names {name!r}, {why}; refusing to follow it: the run directory "
                               f"was altered or comes from an untrusted source. Delete {source} and rerun "
                               "(or use a fresh --out directory)")

    if not isinstance(name, str) or not name or "\x00" in name:
        raise refuse("which is not a file name")
    if "\\" in name or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute():
        raise refuse(f"an absolute path (only names inside {root} are allowed)")
    rel = PurePosixPath(name)
    if ".." in rel.parts:
        raise refuse(f"a path that climbs out of {root} with '..'")
    root_real = Path(root).resolve()
    full = Path(root) / rel
    real = full.resolve()
    if real != root_real and root_real not in real.parents:
        raise refuse(f"which resolves (through a symlink) to {real}, outside {root}")
    return full
