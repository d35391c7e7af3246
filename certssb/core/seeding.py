"""Derived seeds: one run seed, many independent purposes.

Every random choice of a run (model initialisation, mini-batch order, data
subsampling, poisoning) takes a seed derived from the run's seed and a purpose
label with SHA-256, so adding a new purpose never shifts the others.
The Gaussian noise itself does not come from here but from `certssb.smoothing.noise`.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed that depends only on `seed` and the purpose labels."""
    text = "/".join([str(int(seed))] + [str(p) for p in purpose]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator(seed: int, *purpose: object) -> torch.Generator:
    """A CPU torch.Generator seeded with `derive_seed(seed, *purpose)`."""
    return torch.Generator().manual_seed(derive_seed(seed, *purpose))
