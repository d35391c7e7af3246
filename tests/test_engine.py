"""Engines (certssb.smoothing.engine): every variant trains the models the plain loop trains.

float64 where the point is equality (the variants reorder float sums: 1e-8 as in
tests/test_training.py), float32 with a derived tolerance for bf16 autocast, CUDA-only
variants on a GPU (needs_cuda), a clear refusal of them on a CPU.
"""
import copy
import json

import pytest
import torch

from certssb.certify.votes import collect_votes
from certssb.errors import CertssbError
from certssb.models import build_model
from certssb.models.grouped import GroupedModel, set_conv_impl
from certssb.smoothing.engine import Engine, parse_engine, resolve_engine
from certssb.smoothing.sigma import SigmaSearch, optimize_sigma
from certssb.smoothing.training import Schedule, fixed_noise_fn, train_classifier, train_group


def _data(n, shape, classes=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    sigma = (0.1 + 0.3 * torch.rand(n, generator=g)).to(dtype)
    return x, y, sigma


def _inits(arch, shape, models, dtype):
    out = []
    for k in models:
        torch.manual_seed(100 + k)
        out.append(build_model(arch, shape[0], 3, shape[1:]).to(dtype))
    return out


def _max_diff(states_a, states_b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for sa, sb in zip(states_a, states_b)
               for a, b in [(sa, sb)] for k in a if a[k].is_floating_point())


def _moved_diff(states, ref, inits) -> float:
    """||(a - init) - (b - init)|| / ||b - init|| over every float parameter of every model."""
    num = den = 0.0
    for sa, sb, init in zip(states, ref, inits):
        i0 = init.state_dict()
        for key in sb:
            if sb[key].is_floating_point():
                num += float((sa[key].double() - sb[key].double()).norm() ** 2)
                den += float((sb[key].double() - i0[key].double()).norm() ** 2)
    return (num / den) ** 0.5


def test_parse_and_resolve():
    assert parse_engine("fp32") == Engine() and Engine().is_default
    e = parse_engine("bf16+bmm+nchw+compile")
    assert (e.precision, e.bmm, e.channels_last, e.compile, e.graph) == ("bf16", True, False, True, False)
    assert e.name == "bf16+bmm+nchw+compile" and parse_engine(e.name) == e
    assert e.as_dict()["conv"] == "bmm" and e.as_dict()["memory_format"] == "nchw"
    for bad in ("fp16", "bf16+fast", "fp32+bmm+bmm", "", "+bmm"):
        with pytest.raises(CertssbError):
            parse_engine(bad)
    # auto on a CPU is today's computation, whatever the architecture
    for arch in ("mnist-cnn", "resnet18", None):
        assert resolve_engine("auto", "cpu", arch) == Engine()
    assert resolve_engine(None, "cpu") == Engine()
    with pytest.raises(CertssbError, match="CUDA"):
        resolve_engine("bf16+graph", "cpu", "mnist-cnn")


def test_graph_engine_is_refused_on_a_cpu():
    x, y, sigma = _data(16, (1, 8, 8))
    group = GroupedModel(_inits("digits-cnn", (1, 8, 8), [0, 1], torch.float64))
    with pytest.raises(CertssbError, match="CUDA"):
        train_group(group, x, y, sigma, models=[0, 1], schedule=Schedule(1, 8, 1e-3), seed=0,
                    engine=parse_engine("fp32+graph"))


def test_bmm_convolution_equals_the_grouped_one():
    for arch, shape in (("mnist-cnn", (1, 16, 16)), ("cifar-preact-resnet", (3, 8, 8)), ("resnet18", (3, 8, 8))):
        group = GroupedModel(_inits(arch, shape, [0, 1, 2], torch.float64)).eval()
        x = torch.rand(3, 4, *shape, dtype=torch.float64)
        ref = group(x)
        set_conv_impl(group, "bmm")
        assert torch.allclose(group(x), ref, rtol=0, atol=1e-12), arch
        set_conv_impl(group, "grouped")


_FLOAT64_CASES = [  # (arch, shape, n, schedule, models, chunk, engine)
    ("mnist-cnn", (1, 16, 16), 24, Schedule(1, 8, 1e-3), [0, 1], None, "fp32+bmm"),
    ("mnist-cnn", (1, 16, 16), 24, Schedule(1, 8, 1e-3), [0, 1], 1, "fp32+nchw"),
    ("digits-cnn", (1, 8, 8), 40, Schedule(2, 16, 1e-3), [5, 6, 7], 2, "tf32+bmm+nchw"),
    ("cifar-preact-resnet", (3, 8, 8), 16, Schedule(1, 8, 1e-3), [0, 1], None, "fp32+bmm"),
]


@pytest.mark.parametrize("arch,shape,n,schedule,models,chunk,engine", _FLOAT64_CASES)
def test_engine_variants_train_the_plain_loops_models(arch, shape, n, schedule, models, chunk, engine):
    """float64: each variant equals the plain one-model loop to 1e-8 (only the order of sums differs;
    tests/test_training.py says why 1e-8 has orders of margin). tf32 on a CPU is plain float."""
    x, y, sigma = _data(n, shape)
    inits = _inits(arch, shape, models, torch.float64)
    plain = []
    for k, init in zip(models, inits):
        m = copy.deepcopy(init)
        train_classifier(m, x, y, schedule=schedule, seed=3, noise_fn=fixed_noise_fn(x, sigma, seed=3, k=k))
        plain.append(m.state_dict())
    group = train_group(GroupedModel(inits), x, y, sigma, models=models, schedule=schedule, seed=3, chunk=chunk,
                        engine=parse_engine(engine))
    assert all(m.impl == "grouped" for m in group.modules() if hasattr(m, "impl"))  # handed back as built
    assert _max_diff(group.state_dicts(), plain) < 1e-8


# bf16 autocast does not train the same models to float tolerance, and cannot: it trains other draws
# of the same procedure. What is bounded is one step. bf16 keeps 8 significant bits (unit roundoff
# u = 2^-9); every product of the forward and of the backward rounds its two operands (activation or
# gradient, weight) to bf16, float32 accumulation after: about 2u relative per product, so through the
# L = 4 parameter layers of mnist-cnn, forward then backward, the gradient carries up to 2 * 2L * u = 16u
# (3.1%) relative error from rounding, plus the ReLU / max-pool decisions that flip at near-ties
# (measured on this test's data: 4.9%). BF16_GRAD = 10% bounds it with twice that margin. Over many
# steps Adam amplifies any difference: its step lr * m / sqrt(v) is full-sized even where a gradient is
# near 0 and its sign is decided by rounding, so after 2 epochs the weights' movement differs by about
# a third (float32 against float64: 2e-5) and the models agree on most inputs, not all (measured 92%
# of argmax decisions on random inputs; BF16_AGREE = 80%). The certificate holds either way
# (docs/THEORY.md section 7.6): it covers the classifier that votes, whatever its precision.
BF16_GRAD = 0.10
BF16_AGREE = 0.80


def test_bf16_autocast_trains_within_its_rounding():
    import torch.nn.functional as F

    from certssb.smoothing.training import GroupNoise

    shape, models, schedule = (1, 16, 16), [0, 1, 2], Schedule(2, 16, 1e-3)
    x, y, sigma = _data(64, shape, dtype=torch.float32)
    inits = _inits("mnist-cnn", shape, models, torch.float32)
    # one step: the gradient within BF16_GRAD of float32's
    noise = GroupNoise(x, sigma, seed=3, models=models, device=torch.device("cpu"), cache=False)
    xb, yb = noise.batch(torch.arange(16)), y[:16]

    def gradient(engine):
        g = GroupedModel(inits).train()
        with engine.forward_context("cpu"):
            logits = g.forward_grouped(xb)
        F.cross_entropy(logits.float().reshape(48, -1), yb.repeat(3), reduction="sum").backward()
        return torch.cat([p.grad.flatten() for p in g.parameters()])

    g32, g16 = gradient(Engine()), gradient(parse_engine("bf16"))
    assert g16.dtype == torch.float32
    assert float((g16 - g32).norm() / g32.norm()) < BF16_GRAD
    # training: float32 master weights, models that decide like float32's on most inputs
    ref = train_group(GroupedModel(inits), x, y, sigma, models=models, schedule=schedule, seed=3)
    out = train_group(GroupedModel(inits), x, y, sigma, models=models, schedule=schedule, seed=3,
                      engine=parse_engine("bf16"))
    for p in out.parameters():  # float32 master weights (and so float32 Adam moments)
        assert p.dtype == torch.float32
    xt = torch.rand(200, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ref(xt.expand(3, *xt.shape)), out(xt.expand(3, *xt.shape))
    assert float((a.argmax(-1) == b.argmax(-1)).double().mean()) >= BF16_AGREE


def test_compiled_step_trains_the_same_models():
    """torch.compile of forward + loss (inductor on a CPU): float64, same models to 1e-8."""
    shape, models, schedule = (1, 8, 8), [0, 1], Schedule(1, 16, 1e-3)
    x, y, sigma = _data(32, shape)
    inits = _inits("digits-cnn", shape, models, torch.float64)
    ref = train_group(GroupedModel(inits), x, y, sigma, models=models, schedule=schedule, seed=3)
    out = train_group(GroupedModel(inits), x, y, sigma, models=models, schedule=schedule, seed=3,
                      engine=parse_engine("fp32+compile"))
    assert _max_diff(out.state_dicts(), ref.state_dicts()) < 1e-8


def test_votes_and_sigma_search_on_the_engine_forward():
    shape = (1, 16, 16)
    ks = [0, 1, 2, 3]
    x, _, _ = _data(20, shape)
    sig = torch.full((20,), 0.2, dtype=torch.float64)
    models = _inits("mnist-cnn", shape, ks, torch.float64)
    ref = collect_votes([(ks, GroupedModel(models))], x, sig, seed=1, num_classes=3)
    for name in ("fp32+bmm", "fp32+nchw", "tf32"):  # float64: the same votes (soft units to 1e-9 of a vote)
        v = collect_votes([(ks, GroupedModel(models))], x, sig, seed=1, num_classes=3, engine=parse_engine(name))
        assert torch.equal(v.hard_count, ref.hard_count), name
        assert int((v.soft_units - ref.soft_units).abs().max()) < 2 ** 40 * 1e-9, name
    # bf16: logits rounded to 8 bits; soft votes within 2% of a vote per model, hard votes mostly equal
    x32, sig32 = x.float(), sig.float()
    m32 = [copy.deepcopy(m).float() for m in models]
    ref32 = collect_votes([(ks, GroupedModel(m32))], x32, sig32, seed=1, num_classes=3)
    v16 = collect_votes([(ks, GroupedModel(m32))], x32, sig32, seed=1, num_classes=3, engine=parse_engine("bf16"))
    assert v16.models == ref32.models == len(ks)
    assert float((v16.soft_sum - ref32.soft_sum).abs().max()) < 0.02 * len(ks)
    # the sigma search on the same forward: bf16 sigmas within 2% (its gradient steps are lr-sized)
    base = m32[0]
    search = SigmaSearch(sigma0=0.25, steps=2, draws=2, lr=0.05)
    s_ref = optimize_sigma(copy.deepcopy(base), x32, torch.arange(20), search, seed=0)
    s_16 = optimize_sigma(copy.deepcopy(base), x32, torch.arange(20), search, seed=0, engine=parse_engine("bf16"))
    assert torch.allclose(s_16, s_ref, rtol=0.02)
    s_fp = optimize_sigma(copy.deepcopy(base), x32, torch.arange(20), search, seed=0, engine=parse_engine("fp32"))
    assert torch.equal(s_fp, s_ref)


def test_run_config_engine_is_checked_and_recorded(tmp_path):
    from certssb.runner import pipeline
    from certssb.runner.config import RunConfig

    with pytest.raises(CertssbError, match="engine"):
        RunConfig(dataset="digits", engine="fp16").resolve()
    with pytest.raises(CertssbError, match="CUDA"):
        pipeline.run(RunConfig(dataset="digits", engine="bf16+graph", device="cpu", models=2, epochs=1,
                               out=str(tmp_path / "g")), progress=False, log=lambda s: None)
    tiny = dict(dataset="digits", models=4, epochs=1, base_epochs=1, sigma_steps=1, sigma_draws=1, alpha=0.1,
                bound="clopper-pearson", method="rab", max_train=120, max_test=30, device="cpu")
    summary = pipeline.run(RunConfig(**tiny, out=str(tmp_path / "a")), progress=False, log=lambda s: None)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["config"]["engine"] == "auto" and cfg["engine"]["name"] == "fp32"
    assert summary["engine"] == cfg["engine"]
    manifest = json.loads((tmp_path / "a" / "models" / "rab" / "manifest.json").read_text())
    assert "engine" not in manifest  # fp32 manifests as before
    # a bf16 run records its engine; resuming its models with another engine is refused
    pipeline.run(RunConfig(**tiny, engine="bf16", out=str(tmp_path / "b")), train=True, certify=False,
                 progress=False, log=lambda s: None)
    manifest = json.loads((tmp_path / "b" / "models" / "rab" / "manifest.json").read_text())
    assert manifest["engine"] == "bf16"
    with pytest.raises(CertssbError, match="engine bf16"):
        pipeline.run(RunConfig(**dict(tiny, models=6), engine="fp32", out=str(tmp_path / "b")), train=True,
                     certify=False, progress=False, log=lambda s: None)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("engine", ["fp32+graph", "bf16+graph"])
def test_cuda_graph_step_trains_the_eager_models(engine):
    """On a GPU: the captured step replays the eager step (same kernels, same order): the models
    agree to float32 rounding amplified by Adam (moved-norm within 1e-3)."""
    shape, models, schedule = (1, 16, 16), [0, 1, 2], Schedule(2, 16, 1e-3)
    x, y, sigma = _data(72, shape, dtype=torch.float32)  # 72 = 4 full batches + 8: the eager tail runs too
    inits = _inits("mnist-cnn", shape, models, torch.float32)
    eager = parse_engine(engine.replace("+graph", ""))
    ref = train_group(GroupedModel(inits), x, y, sigma, models=models, schedule=schedule, seed=3,
                      device="cuda", engine=eager)
    out = train_group(GroupedModel(inits), x, y, sigma, models=models, schedule=schedule, seed=3,
                      device="cuda", engine=parse_engine(engine))
    assert _moved_diff(out.state_dicts(), ref.state_dicts(), inits) < 1e-3
