"""ImageNette: a train/<wnid>/, val/<wnid>/ tree of ten ImageNet classes, resized (224 by default)."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import DataError
from .images import subdirs, tree_catalog
from .registry import Catalog, DatasetSpec, TrainingDefaults, register_dataset

# Standard ImageNette v2 classes (wnid -> name); class ids follow the sorted wnid order.
IMAGENETTE_NAMES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

IMAGENETTE_DEFAULT_SIZE = 224

_WNID_RE = re.compile(r"^n\d{8}$")


def has_imagenette(d: Path) -> bool:
    """Whether `d` holds train/ and val/ with at least one wnid class folder in train/."""
    if not ((d / "train").is_dir() and (d / "val").is_dir()):
        return False
    return any(p.is_dir() and _WNID_RE.match(p.name) for p in (d / "train").iterdir())


def read_imagenette(d: Path, image_size: int | None) -> Catalog:
    """ImageNette tree train/<wnid>/*, val/<wnid>/*; classes in sorted wnid order; RGB; resized."""
    size = IMAGENETTE_DEFAULT_SIZE if image_size is None else image_size
    wnids = [n for n in subdirs(d / "train") if _WNID_RE.match(n)]
    val = [n for n in subdirs(d / "val") if _WNID_RE.match(n)]
    if wnids != val:
        raise DataError(f"{d}: train/ and val/ hold different class folders "
                        f"({sorted(set(wnids) ^ set(val))} in only one); both need the same wnids")
    ids = list(range(len(wnids)))
    names = [IMAGENETTE_NAMES.get(w, w) for w in wnids]
    if d.name == "imagenette2-224-thunderInfy":
        note = "ImageNette (224px copy, 600 train images per class)"
    else:
        note = f"ImageNette ({d.name})" if d.name.startswith("imagenette") else "ImageNette"

    return tree_catalog(ids, names, f"{d} ({note})", d / "train", d / "val", wnids, size)


register_dataset(DatasetSpec(
    "imagenette", read_imagenette, detect=has_imagenette,
    subfolders=("imagenette/imagenette2-224-thunderInfy", "imagenette2-224-thunderInfy",
                "imagenette2-320", "imagenette2-160", "imagenette2", "imagenette"),
    expected="an ImageNette tree train/<wnid>/*.JPEG, val/<wnid>/*.JPEG",
    default_arch="resnet18", class_names=tuple(IMAGENETTE_NAMES[w] for w in sorted(IMAGENETTE_NAMES)),
    training=TrainingDefaults(epochs=5, batch_size=32, lr=1e-4, models=50)))  # paper schedule (Adam)
