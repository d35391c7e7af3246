"""certssb: certified backdoor defense by sample-specific randomized smoothing.

Cert-SSB (Qiao et al., arXiv 2504.21730) and its fixed-noise baseline RAB
(Weber et al., IEEE S&P 2023), from poisoned data to certificates.

Public API::

    import certssb
    summary = certssb.run({"dataset": "digits", "models": 32, "out": "runs/demo"})
    cert = certssb.certify_models(models, x, sigma=0.25, num_classes=2)

See README.md for the CLI and docs/THEORY.md for what each number guarantees.
"""
from __future__ import annotations

from ._ops import build_info, has_cuda_kernels
from .attacks import TRIGGERS, make_trigger, poison_training_set, triggered_test_set
from .certify.bounds import (certified_radius, clopper_pearson_lower, conservative_radius, hoeffding_lower,
                     poison_budget, radius_proxy)
from .certify.votes import Certificates, Votes, certify_models, certify_votes, collect_votes
from .runner.config import RunConfig
from .data import DATASETS, TaskData, load_task
from .smoothing.ensemble import load_user_model, load_user_weights
from .errors import CertssbError, CheckpointError, DataError
from .models import ARCHS, build_model
from .smoothing.noise import Stream, noisy_copies, normal
from .runner.pipeline import run
from .certify.regions import RegionStore
from .smoothing.sigma import SigmaSearch, optimize_sigma

__version__ = build_info()["version"]

__all__ = [
    "__version__", "build_info", "has_cuda_kernels", "run", "RunConfig",
    "load_task", "TaskData", "DATASETS",
    "make_trigger", "poison_training_set", "triggered_test_set", "TRIGGERS",
    "build_model", "ARCHS",
    "normal", "noisy_copies", "Stream",
    "SigmaSearch", "optimize_sigma",
    "certify_models", "collect_votes", "certify_votes", "Votes", "Certificates",
    "load_user_weights", "load_user_model",
    "hoeffding_lower", "clopper_pearson_lower", "certified_radius", "conservative_radius",
    "poison_budget", "radius_proxy",
    "RegionStore",
    "CertssbError", "DataError", "CheckpointError",
]
