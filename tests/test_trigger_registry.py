"""The trigger registry: declared parameters as options (API, RunConfig, CLI) and a new trigger plugging in."""
from __future__ import annotations

import pytest
import torch

from certssb.attacks import (ADDITIVE_TRIGGERS, TRIGGERS, Trigger, TriggerParam, additive_trigger_names,
                             make_trigger, register_trigger, trigger_names, unregister_trigger)
from certssb.cli import _config_from_args, build_parser
from certssb.errors import CertssbError
from certssb.runner.config import RunConfig

CIFAR = (3, 32, 32)


def test_names_keep_their_order() -> None:
    assert TRIGGERS == ("onepixel", "fourpixel", "blending", "badnets", "blended") == trigger_names()
    assert ADDITIVE_TRIGGERS == ("onepixel", "fourpixel", "blending") == additive_trigger_names()


def test_options_equal_the_keywords() -> None:
    x = torch.rand(2, *CIFAR)
    a = make_trigger("badnets", 0.0, CIFAR, options={"patch_size": 5})
    assert a.patch_size == 5 and a == make_trigger("badnets", 0.0, CIFAR, patch_size=5)
    assert torch.equal(a.apply(x), make_trigger("badnets", 0.0, CIFAR, patch_size=5).apply(x))
    b = make_trigger("blended", 0.0, CIFAR, seed=2, options={"blend_alpha": 1})
    assert b.blend_alpha == 1.0 and isinstance(b.blend_alpha, float)
    assert b.describe()["parameters"]["blend_alpha"] == 1.0
    with pytest.raises(CertssbError, match="blend_alpha must be in"):
        make_trigger("blended", 0.0, CIFAR, options={"blend_alpha": 2.0})
    with pytest.raises(CertssbError, match="unknown option 'size' for trigger 'badnets'; valid options: patch_size"):
        make_trigger("badnets", 0.0, CIFAR, options={"size": 2})
    with pytest.raises(CertssbError, match="valid options: none"):
        make_trigger("onepixel", 1.0, CIFAR, options={"patch_size": 2})


def test_runconfig_trigger_options() -> None:
    assert "trigger_options" not in RunConfig().to_dict()  # unchanged config.json / summary.json
    cfg = RunConfig(trigger="badnets", trigger_options={"patch_size": 2}).resolve()
    assert cfg.to_dict()["trigger_options"] == {"patch_size": 2}
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CertssbError, match="unknown option 'alpha' for trigger 'blended'; valid options: "
                                           "blend_alpha"):
        RunConfig(trigger="blended", trigger_options={"alpha": 0.5}).resolve()
    with pytest.raises(CertssbError, match="patch_size of 'badnets' must be an integer"):
        RunConfig(trigger="badnets", trigger_options={"patch_size": 2.5}).resolve()
    with pytest.raises(CertssbError, match="valid options: none"):
        RunConfig(trigger_options={"patch_size": 2}).resolve()  # digits default trigger: blending


def test_cli_trigger_option() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "--trigger", "blended", "--trigger-option", "blend_alpha=0.5"])
    assert _config_from_args(args).trigger_options == {"blend_alpha": 0.5}
    args = parser.parse_args(["run", "--trigger", "badnets", "--trigger-option", "patch_size=2",
                              "--trigger-option", "patch_size=4"])
    assert _config_from_args(args).trigger_options == {"patch_size": 4}
    assert _config_from_args(parser.parse_args(["run"])).trigger_options is None
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--trigger-option", "patch_size"])


def _check_value(v, shape):
    if not 0 <= v <= 1:
        raise CertssbError(f"value must be in [0, 1], got {v!r}")
    return float(v)


@pytest.fixture
def toy_trigger():
    @register_trigger("toy-corner", additive=False,
                      params=(TriggerParam("value", float, 1.0, _check_value, "corner value"),))
    class Corner(Trigger):
        def _apply(self, out):
            out[:, :, 0, 0] = self.value
            return out

        def _parameters(self):
            return {"value": self.value}
    try:
        yield "toy-corner"
    finally:
        unregister_trigger("toy-corner")


def test_registered_toy_trigger_plugs_in(toy_trigger: str) -> None:
    assert toy_trigger in trigger_names() and toy_trigger not in additive_trigger_names()
    t = make_trigger(toy_trigger, 0.0, (1, 4, 4), options={"value": 0.5})
    assert t.apply(torch.zeros(1, 1, 4, 4))[0, 0, 0, 0] == 0.5 and t.nominal_l2 is None
    assert Trigger(name=toy_trigger, delta=0.0, image_shape=(1, 4, 4)).value == 1.0
    cfg = RunConfig(trigger=toy_trigger, trigger_options={"value": 0.25}).resolve()
    assert cfg.trigger == toy_trigger
    args = build_parser().parse_args(["run", "--trigger", toy_trigger, "--trigger-option", "value=0.25"])
    assert _config_from_args(args).trigger_options == {"value": 0.25}
