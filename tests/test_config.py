"""Run configuration: per-dataset defaults, validation messages, radii parsing."""
import pytest

from certssb.runner.config import RunConfig, parse_radii
from certssb.errors import CertssbError


def test_paper_schedules_and_defaults():
    mnist = RunConfig(dataset="mnist").resolve()
    assert (mnist.epochs, mnist.batch_size, mnist.lr) == (20, 128, 1e-3)
    assert mnist.trigger == "onepixel" and mnist.poison_rate == 0.02
    assert mnist.trigger_pixel == [23, 23]  # RAB's MNIST position
    cifar = RunConfig(dataset="cifar10").resolve()
    assert (cifar.epochs, cifar.batch_size, cifar.lr) == (10, 64, 1e-3) and cifar.trigger_pixel is None
    inet = RunConfig(dataset="imagenette").resolve()
    assert (inet.epochs, inet.batch_size, inet.lr) == (5, 32, 1e-4)
    assert cifar.radii == [0.25 * i for i in range(11)]
    assert (cifar.sigma_min, cifar.sigma_max, cifar.sigma_lr) == (0.125, 0.5, 0.025)
    digits = RunConfig().resolve()
    assert digits.trigger == "blending" and digits.poison_rate == 0.05
    assert digits.methods == ["rab", "cert-ssb"]
    # explicit values win
    assert RunConfig(dataset="mnist", epochs=2, trigger="fourpixel").resolve().trigger_pixel == [19, 19]
    assert RunConfig(dataset="mnist", epochs=2).resolve().epochs == 2


def test_round_trip_through_dict():
    cfg = RunConfig(dataset="mnist", classes=[1, 0], models=16).resolve()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CertssbError, match="unknown config keys"):
        RunConfig.from_dict({"dataset": "mnist", "modles": 3})


@pytest.mark.parametrize("kwargs,message", [
    ({"dataset": "svhn"}, "unknown dataset"),
    ({"method": "cohen"}, "unknown method"),
    ({"trigger": "laser"}, "unknown trigger"),
    ({"bound": "wilson"}, "unknown bound"),
    ({"classes": [3]}, "at least two"),
    ({"classes": [1, 1]}, "repeats"),
    ({"delta": 0.0}, "delta"),
    ({"delta": float("nan")}, "delta"),
    ({"sigma0": -0.1}, "sigma0"),
    ({"sigma_min": 0.3}, "sigma-min <= sigma0"),
    ({"poison_rate": 1.5}, "poison-rate"),
    ({"alpha": 1.0}, "alpha"),
    ({"alpha": 0}, "alpha"),
    ({"models": 0}, "models"),
    ({"epochs": 1.5}, "epochs"),
    ({"radii": [-1.0]}, "radii"),
    ({"seed": -3}, "seed"),
    ({"device": "cuda:0"}, "no CUDA GPU"),
    ({"device": "quantum"}, "unknown device"),
    ({"all_to_all": True, "target": 0}, "all-to-all"),
    ({"region_order": "sorted"}, "region-order"),
    ({"trigger_pixel": [1]}, "trigger-pixel"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(CertssbError, match=message):
        RunConfig(**kwargs).resolve()


def test_parse_radii():
    assert parse_radii("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_radii("0,0.5, 2") == [0.0, 0.5, 2.0]
    for bad in ("0:1:0", "a,b", "1:2"):
        with pytest.raises(CertssbError, match="cannot read radii"):
            parse_radii(bad)
