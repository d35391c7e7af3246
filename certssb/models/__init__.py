"""Classifier architectures (one module each, registered by name) and grouped models.

All written here (no torchvision, no weight download). Adding an architecture: a new
module here that calls `register_arch` (see `certssb.models.registry`), plus its
import line below.
"""
from . import digits_cnn, mnist_cnn, preact_resnet, resnet18  # noqa: F401  (registers them, in this order)
from .grouped import (GroupedBatchNorm2d, GroupedConv2d, GroupedLinear, GroupedModel, activation_floats,
                      from_states, to_grouped_layout)
from .registry import (ArchSpec, arch_names, build_model, count_parameters, default_arch, get_arch,
                       register_arch, unregister_arch)

# The architectures of this package, as a tuple of names (`arch_names()` also lists
# ones registered later, e.g. by a test).
ARCHS = arch_names()

__all__ = ["ARCHS", "ArchSpec", "arch_names", "build_model", "count_parameters", "default_arch", "get_arch",
           "register_arch", "unregister_arch", "GroupedModel", "GroupedConv2d",
           "GroupedBatchNorm2d", "GroupedLinear", "activation_floats", "from_states", "to_grouped_layout"]
