"""scikit-learn's 8x8 digits: the embedded demo dataset (no files needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .images import array_catalog
from .registry import Catalog, TrainingDefaults, register_reader

DIGIT_NAMES = tuple(str(i) for i in range(10))


# Small and quick, with the blending trigger at 5%: the centre pixel of an 8x8 digit is
# mostly ink already, so one-pixel poisoning barely works there (attack success ~1-5%
# without any defense).
@register_reader(
    "digits", no_files="embedded in scikit-learn", default_arch="digits-cnn", class_names=DIGIT_NAMES,
    training=TrainingDefaults(epochs=20, batch_size=64, lr=1e-3, models=32, trigger="blending",
                              poison_rate=0.05, radii=tuple(round(0.025 * i, 3) for i in range(11))))
def read_digits(where: Optional[Path], image_size: int | None) -> Catalog:
    """sklearn's load_digits: 1797 images 8x8, pixel/16; fixed stratified 75/25 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8], values 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    # The split never depends on the task seed, so the test set is always the same.
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    ids = list(range(10))
    return array_catalog(ids, [str(i) for i in ids], "sklearn load_digits",
                         (x[tr], y[tr]), (x[te], y[te]), image_size)
