"""The region store's file: safetensors tensors plus JSON metadata, written streaming, read validated.

Tensors: centres float32 [n, D], labels int64 [n], radii float64 [n], queries int64 [n]
(the query number of each stored ball). Metadata under `META_KEY`: format name,
version, dim, n, and the counts of each update kind. `write_store_file` streams
the tensors given in pieces (a store rebuilt from many chunks is never
concatenated in memory); `read_store_file` refuses anything inconsistent.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..core.files import load_tensors, save_tensor_pieces
from ..errors import CheckpointError

UPDATE_KINDS = ("none", "trim", "align", "abstain")
# 2: adds the `queries` tensor (query number of each stored ball). Version-1 files still load
# (their query numbers are unknown: -1).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_KEY = "certssb_region_store"
FORMAT_NAME = "certssb.regions"
TENSOR_NAMES = ("centres", "labels", "radii", "queries")


def write_store_file(path: str | os.PathLike, dim: Optional[int], parts: dict[str, list[torch.Tensor]],
                     counts: dict[str, int]) -> str:
    """Write a store file from its tensors in pieces (`TENSOR_NAMES`, each the concatenation of
    its pieces along dim 0) atomically; returns the file's sha256."""
    n = sum(int(t.shape[0]) for t in parts["labels"])
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": dim, "n": n, "counts": counts}
    return save_tensor_pieces(path, parts, {META_KEY: json.dumps(meta)})


def read_store_file(path: str | os.PathLike) -> tuple[Optional[int], dict[str, int], dict[str, torch.Tensor]]:
    """(dim, counts, tensors) of a store file, validated; CheckpointError when the file is missing,
    not safetensors, of another format/version, or holds inconsistent shapes, wrong dtypes,
    non-finite values, negative labels or radii, or query numbers out of order."""
    tensors = load_tensors(path)
    meta_raw = read_metadata(path).get(META_KEY)
    if meta_raw is None:
        raise CheckpointError(f"{path} is not a certssb region store (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: region store metadata is not valid JSON ({e})") from None

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}; the file is corrupt or from another version, "
                               "rebuild the store")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise bad("metadata does not describe a certssb region store")
    version = meta.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise bad(f"unsupported format version {version!r} (this build reads "
                  f"{', '.join(map(str, READABLE_VERSIONS))})")
    n, dim, counts = meta.get("n"), meta.get("dim"), meta.get("counts")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise bad(f"invalid n {n!r}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise bad(f"invalid dim {dim!r}")
    if dim is None and n > 0:
        raise bad("dim is missing for a non-empty store")
    if (not isinstance(counts, dict) or set(counts) != set(UPDATE_KINDS)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts.values())):
        raise bad(f"invalid counts {counts!r}")
    names = {"centres", "labels", "radii"} | ({"queries"} if version >= 2 else set())
    if set(tensors) != names:
        raise bad(f"expected tensors {', '.join(sorted(names))}, found {sorted(tensors)}")
    cen, lab, rad = tensors["centres"], tensors["labels"], tensors["radii"]
    qry = tensors.get("queries", torch.full((n,), -1, dtype=torch.int64))
    if (cen.dtype != torch.float32 or lab.dtype != torch.int64 or rad.dtype != torch.float64
            or qry.dtype != torch.int64):
        raise bad(f"wrong dtypes (centres {cen.dtype}, labels {lab.dtype}, radii {rad.dtype}, queries "
                  f"{qry.dtype}; expected float32, int64, float64, int64)")
    exp_cen = (n, dim if dim is not None else 0)
    if (tuple(cen.shape) != exp_cen or tuple(lab.shape) != (n,) or tuple(rad.shape) != (n,)
            or tuple(qry.shape) != (n,)):
        raise bad(f"shapes centres {tuple(cen.shape)}, labels {tuple(lab.shape)}, radii "
                  f"{tuple(rad.shape)}, queries {tuple(qry.shape)} do not match n={n}, dim={dim}")
    if not bool(torch.isfinite(cen).all()) or not bool(torch.isfinite(rad).all()):
        raise bad("non-finite centres or radii")
    if bool((rad < 0).any()) or bool((lab < 0).any()):
        raise bad("negative radii or labels")
    known = qry[qry >= 0]
    total = sum(counts.values())
    if (bool((qry < -1).any()) or bool((known[1:] <= known[:-1]).any())
            or (known.numel() and int(known[-1]) >= total)):
        raise bad(f"query numbers must increase and stay below the {total} queries counted")
    return dim, {k: int(counts[k]) for k in UPDATE_KINDS}, {"centres": cen, "labels": lab, "radii": rad,
                                                            "queries": qry}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's __metadata__)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata()
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
    return dict(meta or {})
