"""Tests for certssb.attacks: trigger pixels and norms, poisoning, triggered test sets, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from certssb.attacks import (
    TRIGGERS,
    PoisonedTrainingSet,
    Trigger,
    make_trigger,
    measured_l2,
    poison_training_set,
    triggered_test_set,
)
from certssb.errors import CertssbError

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
SHAPES = [MNIST, CIFAR]


def _changed(a: torch.Tensor, b: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(i.tolist()) for i in torch.nonzero(a != b)}


# ---------------------------------------------------------------- triggers


@pytest.mark.parametrize("shape", SHAPES)
def test_onepixel_exact(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    delta = 0.5
    trig = make_trigger("onepixel", delta, shape)
    x = torch.zeros(2, c, h, w)
    out = trig.apply(x)
    assert torch.equal(x, torch.zeros_like(x))  # input untouched
    assert _changed(x, out) == {(n, ch, h // 2, w // 2) for n in range(2) for ch in range(c)}
    torch.testing.assert_close(out[:, :, h // 2, w // 2],
                               torch.full((2, c), delta / math.sqrt(c)))
    l2 = measured_l2(x, out)
    assert l2["mean"] == pytest.approx(delta, rel=1e-6)
    assert l2["min"] == pytest.approx(delta, rel=1e-6)
    assert trig.nominal_l2 == delta


@pytest.mark.parametrize("shape", SHAPES)
def test_onepixel_clipped(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    trig = make_trigger("onepixel", 1.0, shape)
    x = torch.full((1, c, h, w), 0.9)
    out = trig.apply(x)
    assert out.max().item() == 1.0
    expected = min(0.9 + 1.0 / math.sqrt(c), 1.0)
    torch.testing.assert_close(out[0, :, h // 2, w // 2], torch.full((c,), expected))
    measured = measured_l2(x, out)["mean"]
    assert measured < 1.0
    assert measured == pytest.approx(math.sqrt(c) * (expected - 0.9), rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_fourpixel_exact(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    delta = 0.3
    trig = make_trigger("fourpixel", delta, shape)
    x = torch.zeros(3, c, h, w)
    out = trig.apply(x)
    ch, cw = h // 2, w // 2
    pixels = [(ch - 1, cw), (ch + 1, cw), (ch, cw - 1), (ch, cw + 1)]
    assert _changed(x, out) == {(n, k, p, q) for n in range(3) for k in range(c) for p, q in pixels}
    for p, q in pixels:
        torch.testing.assert_close(out[:, :, p, q], torch.full((3, c), delta / math.sqrt(4 * c)))
    assert out[:, :, ch, cw].abs().sum() == 0  # the centre itself is untouched
    assert measured_l2(x, out)["max"] == pytest.approx(delta, rel=1e-6)
    # clipped at 1
    y = trig.apply(torch.ones(1, c, h, w))
    assert torch.equal(y, torch.ones(1, c, h, w))


@pytest.mark.parametrize("shape", SHAPES)
def test_blending_norm_and_seed(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    delta = 0.7
    t1 = make_trigger("blending", delta, shape, seed=3)
    t2 = make_trigger("blending", delta, shape, seed=3)
    t3 = make_trigger("blending", delta, shape, seed=4)
    assert t1.pattern is not None and t1.pattern.shape == shape
    assert t1.pattern.dtype == torch.float32
    assert t1.pattern.double().norm().item() == pytest.approx(delta, rel=1e-6)
    assert torch.equal(t1.pattern, t2.pattern)
    assert not torch.equal(t1.pattern, t3.pattern)
    # the pattern is the seeded standard Gaussian, rescaled
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(t1.pattern.double(), raw * delta / raw.norm(), rtol=1e-6, atol=1e-7)
    # added as is (clipping is tested below)
    x = torch.full((2, c, h, w), 0.5)
    out = t1.apply(x)
    torch.testing.assert_close(out, x + t1.pattern)
    l2 = measured_l2(x, out)
    assert l2["min"] == pytest.approx(delta, rel=1e-5)
    assert l2["max"] == pytest.approx(delta, rel=1e-5)


def test_blending_not_clipped_outside_range() -> None:
    trig = make_trigger("blending", 5.0, MNIST, seed=0)
    out = trig.apply(torch.zeros(1, *MNIST))
    assert out.min() < 0  # negative pattern values stay negative
    torch.testing.assert_close(out[0], trig.pattern)
    assert measured_l2(torch.zeros(1, *MNIST), out)["mean"] == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize("shape,patch", [(CIFAR, 3), (MNIST, 3), ((1, 8, 8), 1), ((3, 64, 64), 6)])
def test_badnets_default_patch(shape: tuple[int, int, int], patch: int) -> None:
    c, h, w = shape
    trig = make_trigger("badnets", 0.0, shape)
    assert trig.patch_size == patch
    x = torch.rand(2, c, h, w) * 0.5
    out = trig.apply(x)
    assert torch.equal(out[:, :, h - patch:, w - patch:], torch.ones(2, c, patch, patch))
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[h - patch:, w - patch:] = False
    assert torch.equal(out[:, :, mask], x[:, :, mask])
    assert trig.nominal_l2 is None
    expected = (1 - x[:, :, h - patch:, w - patch:]).flatten(1).norm(dim=1)
    assert measured_l2(x, out)["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)


def test_badnets_custom_patch() -> None:
    trig = make_trigger("badnets", 0.1, CIFAR, patch_size=5)
    out = trig.apply(torch.zeros(1, *CIFAR))
    assert out.sum().item() == 3 * 25
    assert out[0, :, 27:, 27:].min().item() == 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_blended_values(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    trig = make_trigger("blended", 0.0, shape, seed=7)
    g = torch.Generator().manual_seed(7)
    pattern = torch.rand(shape, generator=g)
    assert torch.equal(trig.pattern, pattern)
    x = torch.rand(2, c, h, w)
    out = trig.apply(x)
    torch.testing.assert_close(out, 0.8 * x + 0.2 * pattern)
    assert out.min() >= 0 and out.max() <= 1
    alpha1 = make_trigger("blended", 0.0, shape, seed=7, blend_alpha=1.0).apply(x)
    torch.testing.assert_close(alpha1, pattern.expand_as(x))
    other = make_trigger("blended", 0.0, shape, seed=8)
    assert not torch.equal(other.pattern, pattern)


def test_apply_preserves_dtype_and_input() -> None:
    x = torch.rand(4, *CIFAR, dtype=torch.float64)
    before = x.clone()
    for name in TRIGGERS:
        out = make_trigger(name, 0.5, CIFAR).apply(x)
        assert out.dtype == torch.float64 and out.shape == x.shape
        assert not torch.equal(out, x)
        assert torch.equal(x, before)


def test_describe_json() -> None:
    for name in TRIGGERS:
        d = make_trigger(name, 0.25, CIFAR).describe()
        json.dumps(d)
        assert d["name"] == name and d["image_shape"] == [3, 32, 32]
        assert "parameters" in d
    assert make_trigger("onepixel", 0.25, CIFAR).describe()["delta"] == 0.25
    assert make_trigger("onepixel", 0.25, CIFAR).describe()["parameters"]["pixels"] == [[16, 16]]
    assert make_trigger("badnets", 0.25, CIFAR).describe()["parameters"]["patch_size"] == 3
    assert make_trigger("blended", 0.25, CIFAR).describe()["delta"] is None


def test_trigger_errors() -> None:
    with pytest.raises(CertssbError, match="unknown trigger 'patch'.*onepixel, fourpixel"):
        make_trigger("patch", 0.1, CIFAR)
    for name in ("onepixel", "fourpixel", "blending"):
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(CertssbError, match="finite L2 norm delta > 0"):
                make_trigger(name, bad, CIFAR)
    make_trigger("badnets", float("nan"), CIFAR)  # delta unused: accepted
    with pytest.raises(CertssbError, match="does not fit an image of 8x8.*at most 8"):
        make_trigger("badnets", 0.1, (1, 8, 8), patch_size=9)
    with pytest.raises(CertssbError, match="patch_size must be a positive integer"):
        make_trigger("badnets", 0.1, (1, 8, 8), patch_size=0)
    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(CertssbError, match=r"blend_alpha must be in \(0, 1\]"):
            make_trigger("blended", 0.1, CIFAR, blend_alpha=alpha)
    with pytest.raises(CertssbError, match="at least 3x3"):
        make_trigger("fourpixel", 0.1, (1, 2, 8))
    make_trigger("fourpixel", 0.1, (1, 3, 3))
    with pytest.raises(CertssbError, match=r"image_shape must be \(C, H, W\)"):
        make_trigger("onepixel", 0.1, (28, 28))
    trig = make_trigger("onepixel", 0.1, MNIST)
    with pytest.raises(CertssbError, match=r"made for images of shape \(1, 28, 28\)"):
        trig.apply(torch.zeros(1, *CIFAR))
    with pytest.raises(CertssbError, match=r"float tensor \[N, C, H, W\]"):
        trig.apply(torch.zeros(1, 28, 28))
    with pytest.raises(CertssbError, match=r"float tensor \[N, C, H, W\]"):
        trig.apply(torch.zeros(1, *MNIST, dtype=torch.uint8))


def test_measured_l2_errors() -> None:
    with pytest.raises(CertssbError, match="same shape"):
        measured_l2(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(CertssbError, match="at least one sample"):
        measured_l2(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4))


# ---------------------------------------------------------------- poisoning


def _dataset(n: int = 100, k: int = 2, shape: tuple[int, int, int] = MNIST, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g) * 0.5
    y = torch.arange(n, dtype=torch.int64) % k
    return x, y


def test_poison_all_to_one() -> None:
    x, y = _dataset(100, 2)
    x0, y0 = x.clone(), y.clone()
    trig = make_trigger("onepixel", 0.2, MNIST)
    ps = poison_training_set(x, y, trig, rate=0.1, target=0, all_to_all=False, num_classes=2, seed=5)
    assert isinstance(ps, PoisonedTrainingSet)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert ps.x.shape == x.shape and ps.y.shape == y.shape
    assert ps.poison_idx.dtype == torch.int64 and ps.poison_idx.numel() == 10
    assert torch.equal(ps.poison_idx, torch.sort(ps.poison_idx).values)
    assert len(set(ps.poison_idx.tolist())) == 10
    # only non-target samples were chosen, and all are relabelled to the target
    assert (y[ps.poison_idx] != 0).all()
    assert (ps.y[ps.poison_idx] == 0).all()
    # the rest is unchanged
    rest = torch.ones(100, dtype=torch.bool)
    rest[ps.poison_idx] = False
    assert torch.equal(ps.x[rest], x[rest]) and torch.equal(ps.y[rest], y[rest])
    torch.testing.assert_close(ps.x[ps.poison_idx], trig.apply(x[ps.poison_idx]))
    assert ps.trigger_l2["nominal"] == 0.2
    for key in ("mean", "min", "max"):
        assert ps.trigger_l2[key] == pytest.approx(0.2, rel=1e-5)  # no clipping below 0.5 + 0.2


def test_poison_reports_clipped_norm() -> None:
    x = torch.full((20, *MNIST), 0.9)
    y = torch.arange(20) % 2
    trig = make_trigger("onepixel", 0.5, MNIST)
    ps = poison_training_set(x, y, trig, rate=0.25, target=1, all_to_all=False, num_classes=2, seed=0)
    assert ps.trigger_l2["nominal"] == 0.5
    assert ps.trigger_l2["max"] == pytest.approx(0.1, rel=1e-4)


def test_poison_seed_determinism() -> None:
    x, y = _dataset(200, 4, CIFAR)
    trig = make_trigger("blending", 0.3, CIFAR, seed=1)
    kw = dict(rate=0.05, target=2, all_to_all=False, num_classes=4)
    a = poison_training_set(x, y, trig, seed=11, **kw)
    b = poison_training_set(x, y, trig, seed=11, **kw)
    c = poison_training_set(x, y, trig, seed=12, **kw)
    assert torch.equal(a.poison_idx, b.poison_idx) and torch.equal(a.x, b.x)
    assert not torch.equal(a.poison_idx, c.poison_idx)
    # the documented choice: randperm over the candidates with a seeded generator
    cand = torch.nonzero(y != 2).flatten()
    perm = torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(11))[:10]
    assert torch.equal(a.poison_idx, torch.sort(cand[perm]).values)


def test_poison_all_to_all() -> None:
    x, y = _dataset(60, 3)
    trig = make_trigger("badnets", 0.0, MNIST)
    ps = poison_training_set(x, y, trig, rate=0.5, target=None, all_to_all=True, num_classes=3, seed=0)
    assert ps.poison_idx.numel() == 30
    assert torch.equal(ps.y[ps.poison_idx], (y[ps.poison_idx] + 1) % 3)
    # all classes can be chosen, including the ones a target would exclude
    assert set(y[ps.poison_idx].tolist()) == {0, 1, 2}
    assert ps.trigger_l2["nominal"] is None and ps.trigger_l2["mean"] > 0


def test_poison_all_candidates() -> None:
    # the rate may select every non-target sample
    x, y = _dataset(10, 2)
    trig = make_trigger("onepixel", 0.2, MNIST)
    ps = poison_training_set(x, y, trig, rate=0.5, target=1, all_to_all=False, num_classes=2, seed=0)
    assert torch.equal(ps.poison_idx, torch.nonzero(y == 0).flatten())
    assert (ps.y == 1).all()


def test_poison_errors() -> None:
    x, y = _dataset(1347, 2)
    trig = make_trigger("onepixel", 0.2, MNIST)
    kw = dict(target=0, all_to_all=False, num_classes=2, seed=0)
    with pytest.raises(CertssbError, match=r"poison rate 0.0001 of 1347 training samples selects "
                                           r"no sample .* the smallest rate that works is just above "
                                           r"0.5/1347 = 0.000371: use e.g. a rate of 0.000742 \(1/1347: one sample\)"):
        poison_training_set(x, y, trig, rate=0.0001, **kw)
    for rate in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(CertssbError, match=r"poison rate must be in \(0, 1\)"):
            poison_training_set(x, y, trig, rate=rate, **kw)
    with pytest.raises(CertssbError, match="selects 943 samples but only 673 non-target"):
        poison_training_set(x, y, trig, rate=0.7, **kw)
    with pytest.raises(CertssbError, match=r"target 2 is not a task label; use a label in 0\.\.1"):
        poison_training_set(x, y, trig, rate=0.1, target=2, all_to_all=False, num_classes=2, seed=0)
    with pytest.raises(CertssbError, match="target -1 is not a task label"):
        poison_training_set(x, y, trig, rate=0.1, target=-1, all_to_all=False, num_classes=2, seed=0)
    with pytest.raises(CertssbError, match="not both"):
        poison_training_set(x, y, trig, rate=0.1, target=0, all_to_all=True, num_classes=2, seed=0)
    with pytest.raises(CertssbError, match="no attack target given"):
        poison_training_set(x, y, trig, rate=0.1, target=None, all_to_all=False, num_classes=2,
                            seed=0)
    with pytest.raises(CertssbError, match=r"labels must be task labels in 0\.\.1"):
        poison_training_set(x, y + 1, trig, rate=0.1, **kw)
    with pytest.raises(CertssbError, match="1347 images but 10 labels"):
        poison_training_set(x, y[:10], trig, rate=0.1, **kw)
    with pytest.raises(CertssbError, match="int64 tensor"):
        poison_training_set(x, y.to(torch.int32), trig, rate=0.1, **kw)
    with pytest.raises(CertssbError, match=r"made for images of shape \(3, 32, 32\)"):
        poison_training_set(x, y, make_trigger("onepixel", 0.2, CIFAR), rate=0.1, **kw)
    with pytest.raises(CertssbError, match="num_classes must be an integer >= 2"):
        poison_training_set(x, y, trig, rate=0.1, target=0, all_to_all=False, num_classes=1,
                            seed=0)
    with pytest.raises(CertssbError, match="training set is empty"):
        poison_training_set(x[:0], y[:0], trig, rate=0.1, **kw)


# ---------------------------------------------------------------- triggered test sets


def test_triggered_test_all_to_one() -> None:
    x, y = _dataset(30, 3)
    x0 = x.clone()
    trig = make_trigger("fourpixel", 0.4, MNIST)
    ts = triggered_test_set(x, y, trig, target=1, all_to_all=False, num_classes=3)
    expected_idx = torch.nonzero(y != 1).flatten()
    assert torch.equal(ts.idx, expected_idx) and ts.idx.dtype == torch.int64
    assert torch.equal(ts.y_true, y[expected_idx])
    assert (ts.y_true != 1).all()
    assert (ts.y_target == 1).all() and ts.y_target.dtype == torch.int64
    torch.testing.assert_close(ts.x, trig.apply(x[expected_idx]))
    assert torch.equal(x, x0)


def test_triggered_test_all_to_all() -> None:
    x, y = _dataset(12, 4, CIFAR)
    trig = make_trigger("blended", 0.0, CIFAR)
    ts = triggered_test_set(x, y, trig, target=None, all_to_all=True, num_classes=4)
    assert torch.equal(ts.idx, torch.arange(12))
    assert torch.equal(ts.y_true, y)
    assert torch.equal(ts.y_target, (y + 1) % 4)
    assert torch.equal(ts.y_target[y == 3], torch.zeros(3, dtype=torch.int64))
    torch.testing.assert_close(ts.x, trig.apply(x))


def test_triggered_test_errors() -> None:
    x, y = _dataset(10, 2)
    trig = make_trigger("onepixel", 0.2, MNIST)
    with pytest.raises(CertssbError, match="no sample to trigger"):
        triggered_test_set(x, torch.zeros(10, dtype=torch.int64), trig, target=0,
                           all_to_all=False, num_classes=2)
    with pytest.raises(CertssbError, match="not both"):
        triggered_test_set(x, y, trig, target=0, all_to_all=True, num_classes=2)
    with pytest.raises(CertssbError, match="no attack target given"):
        triggered_test_set(x, y, trig, target=None, all_to_all=False, num_classes=2)
    with pytest.raises(CertssbError, match="target 5 is not a task label"):
        triggered_test_set(x, y, trig, target=5, all_to_all=False, num_classes=2)
    with pytest.raises(CertssbError, match="trigger must be a Trigger"):
        triggered_test_set(x, y, "onepixel",  # type: ignore[arg-type]
                           target=0, all_to_all=False, num_classes=2)


def test_trigger_dataclass_direct() -> None:
    # constructing the dataclass directly validates like make_trigger
    t = Trigger(name="onepixel", delta=1, image_shape=[1, 5, 5])  # type: ignore[arg-type]
    assert t.image_shape == (1, 5, 5) and isinstance(t.delta, float)
    with pytest.raises(CertssbError, match="unknown trigger"):
        Trigger(name="x", delta=1.0, image_shape=(1, 5, 5))


def test_pixel_position_moves_pixel_triggers():
    x = torch.zeros(2, 1, 28, 28)
    one = make_trigger("onepixel", 1.0, (1, 28, 28), pixel=(23, 23)).apply(x)
    assert one[:, 0, 23, 23].tolist() == [1.0, 1.0] and float(one.sum()) == 2.0
    four = make_trigger("fourpixel", 1.0, (1, 28, 28), pixel=(19, 19)).apply(x)
    changed = {tuple(p) for p in (four[0, 0] > 0).nonzero().tolist()}
    assert changed == {(18, 19), (20, 19), (19, 18), (19, 20)}
    with pytest.raises(CertssbError, match="does not fit an image of 28x28"):
        make_trigger("onepixel", 1.0, (1, 28, 28), pixel=(28, 0))
    with pytest.raises(CertssbError, match="with its four neighbours"):
        make_trigger("fourpixel", 1.0, (1, 28, 28), pixel=(0, 5))
