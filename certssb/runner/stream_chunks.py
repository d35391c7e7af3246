"""The files of a streaming job: chunk files, the progress record, recovery and the store rebuilt from chunks.

Per chunk, in this order, each written atomically:

    <out>/chunks/chunk-NNNNN.safetensors  the chunk's certificates and the store rows it added
    <out>/progress.json                   the commit record: inputs done, per-chunk sha256 of
                                          the file and of the inputs it was computed from

`load_progress` verifies the committed chunks of an earlier run of the same job (a
missing or altered chunk is redone, with every chunk after it) and, when progress.json
itself is damaged, recovers the chunks from their own embedded checksums.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..certify.region_file import write_store_file
from ..certify.regions import RegionStore
from ..core.files import load_tensors, read_json, sha256_file
from ..errors import CertssbError, CheckpointError

PROGRESS_FORMAT = "certssb.stream-progress"
CHUNK_FORMAT = "certssb.stream-chunk"
FORMAT_VERSION = 1


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def chunk_path(out: Path, i: int) -> Path:
    return out / "chunks" / f"chunk-{i:05d}.safetensors"


def read_chunk(path: str | os.PathLike, expected_sha256: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a chunk file, verified against the file checksum (if given) and its
    embedded content checksum; CheckpointError when it is missing, truncated or altered."""
    from safetensors import safe_open

    tensors = load_tensors(path, expected_sha256=expected_sha256)
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["certssb"])
    except Exception:
        raise CheckpointError(f"{path} is not a certssb stream chunk (no metadata); delete it") from None
    if not isinstance(info, dict) or info.get("format") != CHUNK_FORMAT or info.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a stream chunk of this certssb version; delete it")
    if content_sha256(tensors) != info.get("content_sha256"):
        raise CheckpointError(f"{path} does not match its content checksum (altered); it will be redone")
    return tensors, info


# ============================================================================ progress and store
def sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _recover(out: Path, job_sha: str, log: Callable[[str], None]) -> list[dict]:
    """Progress entries rebuilt from the chunk files themselves (progress.json lost or corrupt):
    the longest run of consecutive chunks of this job whose content checksums hold."""
    entries: list[dict] = []
    start = 0
    while True:
        path = chunk_path(out, len(entries))
        if not path.is_file():
            break
        try:
            _, info = read_chunk(path)
        except CheckpointError as e:
            log(f"stream: {e}")
            break
        if info.get("job_sha256") != job_sha or info.get("index") != len(entries) or info.get("start") != start:
            break
        entries.append({"index": info["index"], "start": start, "n": info["n"],
                        "inputs_sha256": info["inputs_sha256"], "sha256": sha256_file(path),
                        "stored": info["stored"], "counts": info["counts"]})
        start += info["n"]
    return entries


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Names of the settings that differ between two job records (nested keys joined by dots)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix.rstrip(".") or "job"] if old != new else []
    out = []
    for k in sorted(set(old) | set(new)):
        out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
    return out


def load_progress(out: Path, job: dict, job_sha: str, log: Callable[[str], None]) -> tuple[list[dict], bool]:
    """(verified entries of finished chunks, finished flag) of an earlier run of this job."""
    path = out / "progress.json"
    entries: list[dict] = []
    finished = False
    if path.is_file():
        try:
            prog = read_json(path)
            ok = (isinstance(prog, dict) and prog.get("format") == PROGRESS_FORMAT
                  and isinstance(prog.get("chunks"), list))
        except CheckpointError:
            ok = False
        if not ok:
            log(f"stream: {path} is unreadable; recovering the finished chunks from their own checksums")
            entries = _recover(out, job_sha, log)
        else:
            if prog.get("job_sha256") != job_sha:
                diff = _diff_keys(prog.get("job", {}), job)
                raise CertssbError(f"{out} holds a stream job with other settings (differing: {', '.join(diff)}); "
                                   "rerun with the same arguments to continue it, or use another output folder")
            entries = prog["chunks"]
            finished = bool(prog.get("finished"))
    elif (out / "chunks").is_dir():
        entries = _recover(out, job_sha, log)
    good: list[dict] = []
    for e in entries:  # a chunk whose file is missing or altered is redone, with every chunk after it
        p = chunk_path(out, len(good))
        if e.get("index") != len(good) or not p.is_file() or sha256_file(p) != e.get("sha256"):
            log(f"stream: chunk {len(good)} is missing or does not match its checksum; redoing it and every "
                "chunk after it")
            finished = False
            break
        good.append(e)
    return good, finished and len(good) == len(entries)


def store_from_chunks(out: Path, base: Optional[RegionStore], dim: int, entries: list[dict]) -> RegionStore:
    """The store after the finished chunks: `base` (or empty) plus every chunk's appended rows.

    Rebuilt through the store's own file format and `RegionStore.load`, which validates it;
    decisions do not depend on how the store was built, so the continued stream is exact."""
    parts: dict[str, list[torch.Tensor]] = {
        "centres": [torch.zeros(0, dim, dtype=torch.float32)], "labels": [torch.zeros(0, dtype=torch.int64)],
        "radii": [torch.zeros(0, dtype=torch.float64)], "queries": [torch.zeros(0, dtype=torch.int64)]}
    if base is not None and len(base):
        for k, t in (("centres", base.centres), ("labels", base.labels), ("radii", base.radii),
                     ("queries", base.queries)):
            parts[k].append(t)
    for e in entries:
        tensors, _ = read_chunk(chunk_path(out, e["index"]), e["sha256"])
        for k in parts:
            parts[k].append(tensors[f"seg_{k}"])
    counts = entries[-1]["counts"] if entries else (base.counts if base is not None else None)
    tmp = out / ".store-resume.safetensors"
    write_store_file(tmp, dim, parts, counts)
    del parts
    try:
        store = RegionStore.load(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    store.source = None
    return store


def reserve_rows(store: RegionStore, n: int, total: Optional[int]) -> None:
    """Room for n more balls: the whole stream at once when its length is known (untouched pages
    cost no memory), else the next power of two, so the store is copied O(log N) times."""
    need = len(store) + n
    store.reserve(max(need, len(store) + total) if total else 1 << max(need - 1, 1).bit_length())
