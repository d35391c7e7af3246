"""Backdoor attacks: the triggers (one module each, registered by name) and poisoning.

Adding a trigger: a new module here that registers a `Trigger` subclass with
`register_trigger` (see `certssb.attacks.registry`), plus its import line below.
"""
from . import onepixel, fourpixel, blending, badnets, blended  # noqa: F401  (registers them, in this order)
from .base import Trigger, make_trigger
from .poisoning import (PoisonedTrainingSet, TriggeredTestSet, input_trigger_norms, measured_l2, poison_training_set,
                        training_trigger_norm, triggered_test_set)
from .registry import (TriggerParam, TriggerSpec, additive_trigger_names, check_trigger_options,
                       get_trigger, register_trigger, trigger_names, unregister_trigger)

# The triggers of this package, as tuples of names (`trigger_names()` also lists ones
# registered later, e.g. by a test).
TRIGGERS = trigger_names()
# Triggers whose strength is the nominal L2 norm `delta`.
ADDITIVE_TRIGGERS = additive_trigger_names()

__all__ = ["TRIGGERS", "ADDITIVE_TRIGGERS", "Trigger", "make_trigger", "measured_l2", "poison_training_set",
           "triggered_test_set", "PoisonedTrainingSet", "TriggeredTestSet", "TriggerParam", "TriggerSpec",
           "register_trigger", "unregister_trigger", "get_trigger", "trigger_names", "additive_trigger_names",
           "check_trigger_options", "input_trigger_norms", "training_trigger_norm"]
