"""Finding a dataset on disk: --data-dir, else $CERTSSB_DATA, else the default shared/data folders."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CertssbError, DataError
from .registry import get_dataset

__all__ = ["resolve_data_dir"]


def _repo_root() -> Path:
    """Parent of the `certssb` package folder (this file is certssb/data/locate.py)."""
    return Path(__file__).resolve().parents[2]


def _default_roots() -> list[Path]:
    """Fallback roots when neither --data-dir nor CERTSSB_DATA is given, in search order."""
    return [Path.cwd().parent / "shared" / "data", _repo_root().parent / "shared" / "data"]


def resolve_data_dir(dataset: str, data_dir: str | os.PathLike | None) -> Path:
    """Find the directory (or, for "numpy", the .npz file) that holds `dataset`.

    Roots: the explicit `data_dir` if given (only it); else env `CERTSSB_DATA` if
    set (only it); else `../shared/data` from the current directory, then
    `<repo root>/../shared/data`. Inside a root the dataset's files may lie
    directly or in a known subfolder (the spec's `subfolders`). Datasets with a
    `check_path` ("folder", "numpy") need an explicit `data_dir`; those with
    `no_files` ("digits") read no files. Nothing found -> `DataError` listing
    what was looked for where.
    """
    spec = get_dataset(dataset)
    if spec.no_files is not None:
        raise CertssbError(f"dataset {dataset!r} is {spec.no_files} and reads no files; "
                           "drop --data-dir, or use --dataset folder/numpy for your own files")
    if spec.check_path is not None:
        if data_dir is None:
            raise CertssbError(f"dataset {dataset!r} needs --data-dir pointing at {spec.expected}")
        return spec.check_path(Path(data_dir))

    if data_dir is not None:
        roots, how = [Path(data_dir)], "--data-dir"
        if not roots[0].is_dir():
            raise DataError(f"--data-dir {roots[0]} does not exist or is not a directory; "
                            f"pass the folder that holds {spec.expected}")
    elif os.environ.get("CERTSSB_DATA"):
        roots, how = [Path(os.environ["CERTSSB_DATA"])], "CERTSSB_DATA"
    else:
        roots, how = _default_roots(), "default locations"
    looked: list[str] = []
    for root in roots:
        for cand in [root] + [root / s for s in spec.subfolders]:
            looked.append(str(cand))
            if cand.is_dir() and spec.detect(cand):
                return cand
    raise DataError(
        f"could not find {dataset}: looked for {spec.expected} in ({how}) "
        f"{'; '.join(looked)}. Pass --data-dir DIR or set CERTSSB_DATA=DIR to the folder that "
        f"holds them (or its parent with one of the subfolders {', '.join(spec.subfolders)})")
