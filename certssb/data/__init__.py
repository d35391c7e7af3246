"""Dataset layer: find a dataset, read it, pick the task's classes, return [0, 1] float tensors.

Pipeline stage 1. Datasets live in a registry (`registry.py`); each module
below registers one when imported. To add a dataset, write a module that builds
a `DatasetSpec` and calls `register_dataset` (or decorates its reader with
`register_reader`), and add its import here. `DATASETS` is the tuple of the
names registered so far, read at each access.

Built-in formats: scikit-learn's 8x8 digits (embedded, no files), MNIST IDX
(.gz or plain), CIFAR-10 python batches (read with a restricted unpickler that
can only rebuild numpy arrays) or an image-folder copy, an ImageNette
`train/`/`val/` tree, any `train/<class>/` + `test/<class>/` image folder, and
an `.npz` file.
"""
from __future__ import annotations

from typing import Any

from .registry import (Catalog, DatasetSpec, Split, TrainingDefaults, dataset_names, get_dataset,
                       register_dataset, register_reader, training_defaults, unregister_dataset)
from .images import IMAGE_EXTENSIONS, list_images
from .locate import resolve_data_dir
from .task import TaskData, load_task, parse_classes

# The built-in datasets, in the order --dataset lists them: each import registers one.
from . import digits  # noqa: F401  isort: skip
from . import mnist  # noqa: F401  isort: skip
from . import cifar10  # noqa: F401  isort: skip
from . import imagenette  # noqa: F401  isort: skip
from . import folder  # noqa: F401  isort: skip
from . import numpy_arrays  # noqa: F401  isort: skip
from .cifar10 import CIFAR10_CLASSES
from .imagenette import IMAGENETTE_DEFAULT_SIZE, IMAGENETTE_NAMES

__all__ = ["DATASETS", "TaskData", "load_task", "parse_classes", "resolve_data_dir",
           "DatasetSpec", "TrainingDefaults", "Catalog", "Split", "register_dataset", "register_reader",
           "unregister_dataset", "get_dataset", "dataset_names", "training_defaults",
           "IMAGE_EXTENSIONS", "list_images", "CIFAR10_CLASSES", "IMAGENETTE_NAMES",
           "IMAGENETTE_DEFAULT_SIZE"]


def __getattr__(name: str) -> Any:
    if name == "DATASETS":  # live: includes datasets registered after this import
        return dataset_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
