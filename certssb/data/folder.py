"""Any image tree <root>/train/<class>/* and <root>/test/<class>/* (or val/); classes in sorted name order."""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .images import subdirs, tree_catalog
from .registry import Catalog, DatasetSpec, TrainingDefaults, register_dataset


def check_folder(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a directory; pass the root "
                        "of an image tree train/<class>/* and test/<class>/* (or val/)")
    if not (root / "train").is_dir() or not ((root / "test").is_dir() or (root / "val").is_dir()):
        raise DataError(f"{root} has no train/ and test/ (or val/) subfolders; an image folder "
                        "dataset is <root>/train/<class>/* and <root>/test/<class>/*")
    return root


def read_folder(d: Path, image_size: int | None) -> Catalog:
    """Generic image tree <root>/train/<class>/*, <root>/test|val/<class>/*; sorted class names."""
    test_dir = d / "test" if (d / "test").is_dir() else d / "val"
    names = subdirs(d / "train")
    test_names = subdirs(test_dir)
    if names != test_names:
        raise DataError(f"{d}: train/ and {test_dir.name}/ hold different class folders "
                        f"({sorted(set(names) ^ set(test_names))} in only one); give both the same classes")
    if not names:
        raise DataError(f"{d / 'train'} has no class folders; lay out images as train/<class>/*")
    ids = list(range(len(names)))

    return tree_catalog(ids, names, f"{d} (image folder)", d / "train", test_dir, names, image_size)


register_dataset(DatasetSpec(
    "folder", read_folder, check_path=check_folder,
    expected="an image tree <root>/train/<class>/* and <root>/test/<class>/*",
    training=TrainingDefaults(epochs=10, batch_size=64, lr=1e-3, models=100)))
