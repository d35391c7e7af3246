"""Training loops: a vectorized group equals the plain one-model loop; fixed noise per (model, sample)."""
import copy

import pytest
import torch

from certssb.errors import CertssbError
from certssb.models import build_model
from certssb.smoothing.noise import Stream, noisy_copies
from certssb.smoothing.training import (GroupNoise, Schedule, batch_order, fixed_noise_fn, predict, train_classifier,
                              train_group)
from certssb.models.grouped import GroupedModel


def _data(n, shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    sigma = 0.1 + 0.3 * torch.rand(n, generator=g)
    return x, y, sigma


def _rel_diff(a: dict, b: dict, init: dict) -> float:
    """||(a - init) - (b - init)|| / ||b - init|| over all float parameters: how differently they moved."""
    num = den = 0.0
    for key in b:
        if not b[key].is_floating_point():
            continue
        num += float((a[key].double() - b[key].double()).norm() ** 2)
        den += float((b[key].double() - init[key].double()).norm() ** 2)
    return (num / max(den, 1e-30)) ** 0.5


_GROUP_CASES = [
    ("digits-cnn", (1, 8, 8), 40, Schedule(epochs=2, batch_size=16, lr=1e-3), [5, 6, 7], None),
    ("digits-cnn", (1, 8, 8), 40, Schedule(epochs=2, batch_size=16, lr=1e-3), [5, 6, 7], 2),  # chunks 2 + 1
    ("mnist-cnn", (1, 16, 16), 24, Schedule(epochs=1, batch_size=8, lr=1e-3), [0, 1], 1),
    ("cifar-preact-resnet", (3, 8, 8), 24, Schedule(epochs=1, batch_size=8, lr=1e-3), [0, 1], None),
    ("resnet18", (3, 8, 8), 16, Schedule(epochs=1, batch_size=8, lr=1e-3), [2, 3], None),
]


def _train_both(arch, shape, n, schedule, models, chunk, dtype):
    """(group, plain models, inits, x_test) trained from the same seeds in `dtype`."""
    x, y, sigma = _data(n, shape, 3)
    x, sigma = x.to(dtype), sigma.to(dtype)
    inits = []
    for k in models:
        torch.manual_seed(100 + k)
        inits.append(build_model(arch, shape[0], 3, shape[1:]).to(dtype))
    plain = []
    for k, init in zip(models, inits):
        m = copy.deepcopy(init)
        train_classifier(m, x, y, schedule=schedule, seed=3, noise_fn=fixed_noise_fn(x, sigma, seed=3, k=k))
        plain.append(m)
    group = GroupedModel(inits)
    bar = _Counter()
    out = train_group(group, x, y, sigma, models=models, schedule=schedule, seed=3, progress=bar, chunk=chunk)
    assert out is group and not group.training
    assert bar.n == schedule.epochs
    return group, plain, inits, torch.rand(5, *shape, dtype=dtype)


@pytest.mark.parametrize("arch,shape,n,schedule,models,chunk", _GROUP_CASES)
def test_group_training_equals_the_plain_loop(arch, shape, n, schedule, models, chunk):
    """Same seeds -> same models: init, fixed training noise, batch order, Adam; BN statistics per model.

    Compared in float64, where the two paths differ only by the order of their float64 sums
    (about 1e-16 relative). Adam amplifies a gradient difference dg by at most lr * dg / eps
    (eps = 1e-8) per step, so a 1e-16 rounding difference moves a weight by about 1e-11 at
    most: 1e-8 leaves three orders of margin on any CPU. (In float32 the same amplification
    turns 1e-7 roundings into weight differences of order lr, on whichever weights happen to
    have near-zero gradients on that CPU's oneDNN path: that is no test of equality.)
    """
    group, plain, inits, x_test = _train_both(arch, shape, n, schedule, models, chunk, torch.float64)
    logits = group(x_test.expand(len(models), *x_test.shape))
    for j, (state, m, init) in enumerate(zip(group.state_dicts(), plain, inits)):
        ref = m.state_dict()
        assert set(state) == set(ref)
        for key in ref:  # parameters and buffers (running statistics, batch counts)
            assert state[key].dtype == ref[key].dtype, key
            assert torch.allclose(state[key], ref[key], rtol=1e-8, atol=1e-8), (arch, j, key)
        assert torch.allclose(logits[j], m(x_test), rtol=1e-8, atol=1e-8), (arch, j)


@pytest.mark.parametrize("arch,shape,n,schedule,models,chunk", _GROUP_CASES[:1] + _GROUP_CASES[3:4])
def test_group_training_in_float32_moves_weights_like_the_plain_loop(arch, shape, n, schedule, models, chunk):
    """The production dtype: the two paths' weight updates agree in norm (a loose, machine-independent
    bound: Adam can move a near-zero-gradient weight by up to lr per step either way, so only the
    total relative difference of the updates is bounded, not each weight)."""
    group, plain, inits, _ = _train_both(arch, shape, n, schedule, models, chunk, torch.float32)
    for state, m, init in zip(group.state_dicts(), plain, inits):
        assert _rel_diff(state, m.state_dict(), init.state_dict()) < 5e-2, arch


class _Counter:
    def __init__(self):
        self.n = 0

    def update(self, k=1):
        self.n += k


def test_models_in_a_group_differ_only_by_seed_and_noise():
    x, y, sigma = _data(32, (1, 8, 8), 2)
    torch.manual_seed(0)
    base = build_model("digits-cnn", 1, 2, (8, 8))
    group = GroupedModel([base, copy.deepcopy(base)])  # same init: only the noise (k) differs
    train_group(group, x, y, sigma, models=[0, 1], schedule=Schedule(1, 8, 1e-3), seed=1)
    a, b = group.state_dicts()
    assert not torch.equal(a["features.0.weight"], b["features.0.weight"])
    # same init and same noise index -> identical models
    twins = GroupedModel([base, copy.deepcopy(base)])
    solo = GroupedModel([copy.deepcopy(base)])
    train_group(twins, x, y, sigma, models=[4, 5], schedule=Schedule(1, 8, 1e-3), seed=1)
    train_group(solo, x, y, sigma, models=[5], schedule=Schedule(1, 8, 1e-3), seed=1)
    for key, v in solo.state_dicts()[0].items():
        assert torch.allclose(twins.state_dicts()[1][key], v, atol=1e-5), key


def test_group_noise_is_fixed_per_model_and_sample_and_cache_agnostic():
    x, _, sigma = _data(10, (2, 3, 3), 2)
    models = [7, 8, 9]
    idx = torch.tensor([4, 0, 9])
    fresh = GroupNoise(x, sigma, seed=5, models=models, device=torch.device("cpu"), cache=False)
    cached = GroupNoise(x, sigma, seed=5, models=models, device=torch.device("cpu"), cache=True, chunk=3)
    a, b = fresh.batch(idx), cached.batch(idx)
    assert a.shape == (3, 6, 3, 3)  # [b, Mc*C, H, W]
    assert torch.equal(a, b)
    assert torch.equal(fresh.batch(idx), a)  # the same every epoch
    expect = noisy_copies(x[idx], sigma[idx], seed=5, stream=int(Stream.TRAIN), models=models, ids=idx)
    for j in range(3):
        assert torch.equal(a[:, 2 * j:2 * j + 2], expect[j])
    # the plain loop's noise for model k is slot k of the group
    fn = fixed_noise_fn(x, sigma, seed=5, k=8)
    assert torch.equal(fn(x[idx], idx, 0), expect[1])
    assert torch.equal(fn(x[idx], idx, 3), expect[1])
    assert GroupNoise.nbytes(x, 3) == 10 * 18 * 3 * 4


def test_batch_order_is_shared_and_seeded():
    assert torch.equal(batch_order(1, 0, 50), batch_order(1, 0, 50))
    assert not torch.equal(batch_order(1, 0, 50), batch_order(1, 1, 50))
    assert sorted(batch_order(2, 3, 50).tolist()) == list(range(50))


def test_train_group_errors():
    x, y, sigma = _data(8, (1, 8, 8), 2)
    group = GroupedModel([build_model("digits-cnn", 1, 2, (8, 8)) for _ in range(2)])
    with pytest.raises(CertssbError, match="3 model indices for a group of 2"):
        train_group(group, x, y, sigma, models=[0, 1, 2], schedule=Schedule(1, 4, 1e-3), seed=0)
    with pytest.raises(CertssbError, match="must agree in N"):
        train_group(group, x, y[:5], sigma, models=[0, 1], schedule=Schedule(1, 4, 1e-3), seed=0)


def test_train_classifier_learns_and_predicts():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()  # top half brighter
    torch.manual_seed(0)
    model = build_model("digits-cnn", 1, 2, (8, 8))
    train_classifier(model, x, y, schedule=Schedule(15, 16, 3e-3), seed=0)
    assert (predict(model, x, batch_size=10) == y).double().mean() > 0.9
    assert predict(model, x[:0]).shape == (0,)


@pytest.mark.needs_cuda
def test_group_training_on_cuda_matches_the_plain_loop_on_cuda():
    x, y, sigma = _data(40, (1, 8, 8), 3)
    schedule = Schedule(epochs=2, batch_size=16, lr=1e-3)
    inits = []
    for k in (0, 1, 2):
        torch.manual_seed(k)
        inits.append(build_model("digits-cnn", 1, 3, (8, 8)))
    plain = []
    for k, init in enumerate(inits):
        m = copy.deepcopy(init)
        train_classifier(m, x, y, schedule=schedule, seed=3, noise_fn=fixed_noise_fn(x, sigma, seed=3, k=k,
                                                                                     device="cuda"),
                         device="cuda")
        plain.append(m.cpu())
    group = GroupedModel(inits)
    train_group(group, x, y, sigma, models=[0, 1, 2], schedule=schedule, seed=3, device="cuda")
    for state, m, init in zip(group.state_dicts(), plain, inits):
        assert _rel_diff(state, m.state_dict(), init.state_dict()) < 1e-2
