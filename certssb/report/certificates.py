"""Certificate CSV files: one row per certified input, the same bytes from every writer.

Columns (`CSV_COLUMNS`; docs/THEORY.md section 9 defines each): the prediction and
radius after the storage update (`predict`, `radius`) and before it (`predict_raw`,
`radius_raw`), the bound's pA_lower / pB_upper, sigma, the conservative radius,
the poison budget, the region update kind and query order, and the true and
attacker's labels. The pipeline and the streaming job both write through
`certificate_lines`, so a streamed file is byte-identical to the pipeline's.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..core.files import atomic_write_text
from ..errors import CheckpointError

CSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "sigma", "pA_lower", "pB_upper",
               "abstain", "radius_conservative", "poison_budget", "region_update", "query_order",
               "predict_raw", "radius_raw", "target")


def csv_cell(v):
    """A certificate CSV cell: bools as 0/1, floats to 6 significant digits (shared by every writer,
    so a streamed certificate file is byte-identical to the pipeline's)."""
    return int(v) if isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else v)



def certificate_lines(rows: Mapping[str, torch.Tensor], region_update: Sequence[str]) -> str:
    """The CSV rows (no header) of `rows` (columns by name, one entry per input).

    A column that is absent is left empty; so are `correct` for unlabelled inputs and
    a negative `query_order` (no storage update ran)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    n = int(rows["idx"].numel())
    cols = {k: rows[k].tolist() for k in CSV_COLUMNS if k != "region_update" and k in rows}
    labelled = "label" in cols
    for j in range(n):
        out = []
        for k in CSV_COLUMNS:
            if k == "region_update":
                out.append(region_update[j])
            elif k == "correct":
                out.append(int(cols["predict"][j] == cols["label"][j] and not cols["abstain"][j])
                           if labelled else "")
            elif k == "query_order" and k in cols and cols[k][j] < 0:
                out.append("")
            elif k not in cols:
                out.append("")
            else:
                out.append(csv_cell(cols[k][j]))
        w.writerow(out)
    return buf.getvalue()


def write_certificates_csv(path: str | Path, rows: Mapping[str, torch.Tensor],
                           region_update: Sequence[str]) -> None:
    """One row per test input, columns CSV_COLUMNS, written atomically."""
    atomic_write_text(path, ",".join(CSV_COLUMNS) + "\n" + certificate_lines(rows, region_update))


# Columns every certificate CSV must fill; "target" only on triggered splits.
REQUIRED_COLUMNS = ("idx", "label", "predict", "radius", "abstain", "predict_raw", "radius_raw",
                    "radius_conservative", "region_update")


def read_certificates_csv(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inverse of write_certificates_csv (float columns as float64, the rest int64/bool).

    A file that lacks a required column, holds a cell that is not a number, or a
    non-finite or negative radius raises CheckpointError (rerun `certssb certify`)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged ({why}); rerun `certssb certify --out "
                               f"{Path(path).parent}` to rewrite it")

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            records = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; rerun `certssb certify --out {Path(path).parent}`") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise bad(f"not a readable CSV: {e}") from None
    missing = [k for k in REQUIRED_COLUMNS if k not in header]
    if missing:
        raise bad(f"columns {missing} are missing")
    floats = ("radius", "sigma", "pA_lower", "pB_upper", "radius_conservative", "radius_raw")
    rows: dict[str, torch.Tensor] = {}
    for k in CSV_COLUMNS:
        if k in ("region_update", "correct"):
            continue
        vals = [r.get(k) or "" for r in records]
        if any(v == "" for v in vals):
            if k == "label" and all(v == "" for v in vals):
                continue  # unlabeled inputs (`certssb certify-stream` without labels)
            if k in REQUIRED_COLUMNS:
                raise bad(f"column {k!r} has empty cells (a truncated row?)")
            continue
        try:
            if k in floats:
                rows[k] = torch.tensor([float(v) for v in vals], dtype=torch.float64)
            elif k == "abstain":
                rows[k] = torch.tensor([int(v) for v in vals], dtype=torch.bool)
            else:
                rows[k] = torch.tensor([int(v) for v in vals], dtype=torch.int64)
        except ValueError:
            raise bad(f"column {k!r} holds a value that is not a number") from None
    for k in ("radius", "radius_raw", "radius_conservative"):
        if k in rows and rows[k].numel() and not bool((torch.isfinite(rows[k]) & (rows[k] >= 0)).all()):
            raise bad(f"column {k!r} holds a radius that is not finite and >= 0")
    return rows, [r["region_update"] for r in records]
