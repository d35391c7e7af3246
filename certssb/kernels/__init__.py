"""Typed wrappers of the native ops (torch.ops.certssb.*), with their fake kernels and autograd.

One file per op family, each pairing the native kernel with its pure-PyTorch
reference (the reference lives with the stage that uses it: certssb.smoothing.noise,
certssb.certify.votes, certssb.core.radius and certssb.certify.bounds):

- `noise`:  fused noisy copies x + sigma * eps(seed, stream, k, id) for a block of models;
- `vote`:   streaming soft/hard vote accumulation and top-2 finalisation;
- `radius`: pA bounds, PhiInv, certified radius, and the radius proxy with its gradient.

`dispatch` decides, per call, whether the native op or the reference runs (`BACKENDS`
names the two compute backends); `noise_common` holds what the noise reference and
the noise op share.
"""
from __future__ import annotations

from .dispatch import (BACKENDS, DEFAULT_BACKEND, check_backend, current_backend, kernels_on, use_kernels,
                       use_native, using_backend)
from .noise_common import seed_to_int64

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "current_backend", "using_backend", "check_backend", "kernels_on",
           "use_kernels", "use_native", "seed_to_int64"]
