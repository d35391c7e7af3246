"""--init-weights: models start from a ResNet-18 checkpoint in torchvision's key layout (built here from
random tensors of the right shapes; torchvision is not installed), heads re-initialised per model, bad
files refused with one message each, and the checkpoint's sha256 in the stage fingerprints only when set."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from certssb.errors import CertssbError
from certssb.models import GroupedModel, build_model
from certssb.runner.config import RunConfig
from certssb.smoothing.ensemble import EnsembleSpec
from certssb.smoothing.pretrained import PretrainedInit, torchvision_key
from certssb.smoothing.training import Schedule

SIZE = (128, 128)
HEAD = {"fc.weight", "fc.bias"}


def torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision resnet18().state_dict() look-alike: torchvision's names and shapes (fc: 1000
    classes), random values. Built from the explicit inverse of the key map."""
    g = torch.Generator().manual_seed(seed)
    names = {"conv1.weight": [64, 3, 7, 7], "fc.weight": [1000, 512], "fc.bias": [1000]}
    bn = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}

    def add_bn(prefix: str, c: int) -> None:
        for k in bn:
            names[f"{prefix}.{k}"] = [] if k == "num_batches_tracked" else [c]

    add_bn("bn1", 64)
    cin = 64
    for s, c in enumerate((64, 128, 256, 512), start=1):
        for i in range(2):
            p = f"layer{s}.{i}"
            names[f"{p}.conv1.weight"] = [c, cin if i == 0 else c, 3, 3]
            names[f"{p}.conv2.weight"] = [c, c, 3, 3]
            add_bn(f"{p}.bn1", c)
            add_bn(f"{p}.bn2", c)
            if i == 0 and s > 1:
                names[f"{p}.downsample.0.weight"] = [c, cin, 1, 1]
                add_bn(f"{p}.downsample.1", c)
        cin = c
    out = {}
    for k, shape in names.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(int(torch.randint(0, 10000, (), generator=g)))
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


@pytest.fixture
def tv_file(tmp_path):
    path = tmp_path / "resnet18-tv.safetensors"
    state = torchvision_state()
    save_file(state, str(path))
    return path, state


def test_key_map_is_a_bijection_onto_certssb_resnet18():
    tv = torchvision_state()
    ours = build_model("resnet18", 3, 2, SIZE).state_dict()
    mapped = {torchvision_key(k): k for k in tv if torchvision_key(k) is not None}
    assert set(mapped) == set(ours) - HEAD and len(mapped) == len(tv) - 2
    assert all(tuple(tv[k].shape) == tuple(ours[m].shape) for m, k in mapped.items())
    # the explicit map, spot-checked
    assert torchvision_key("conv1.weight") == "stem.0.weight"
    assert torchvision_key("bn1.running_var") == "stem.1.running_var"
    assert torchvision_key("layer1.0.conv1.weight") == "layers.0.conv1.weight"
    assert torchvision_key("layer2.1.bn2.bias") == "layers.3.bn2.bias"
    assert torchvision_key("layer3.0.downsample.0.weight") == "layers.4.shortcut.0.weight"
    assert torchvision_key("layer4.0.downsample.1.running_mean") == "layers.6.shortcut.1.running_mean"
    assert torchvision_key("fc.weight") is None


def spec(init, models: int = 3) -> EnsembleSpec:
    return EnsembleSpec(method="rab", arch="resnet18", in_channels=3, num_classes=2, image_size=SIZE,
                        models=models, schedule=Schedule(1, 4, 1e-3), seed=5, fingerprint="x", init=init)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_models_start_from_the_checkpoint_and_differ_only_in_their_heads(tmp_path, fmt):
    state = torchvision_state()
    if fmt == "torch":
        path = tmp_path / "resnet18.pth"
        torch.save({"state_dict": state}, path)  # a wrapped torch zip state dict
    else:
        path = tmp_path / "resnet18.safetensors"
        save_file(state, str(path))
    init = PretrainedInit.load(path, "resnet18", 3, 2, SIZE)
    s = spec(init)
    models = [s.new_model(k) for k in range(3)]
    for m in models:
        for key, value in state.items():
            name = torchvision_key(key)
            if name is not None:
                assert torch.equal(m.state_dict()[name], value.to(m.state_dict()[name].dtype)), name
    heads = [m.fc.weight.detach() for m in models]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    # each head is the model's own seeded init (the same as without --init-weights)
    plain = spec(None).new_model(1)
    assert torch.equal(models[1].fc.weight, plain.fc.weight) and torch.equal(models[1].fc.bias, plain.fc.bias)
    assert not torch.equal(models[1].layers[0].conv1.weight, plain.layers[0].conv1.weight)
    # grouped training starts every member from the checkpoint (grouped from the plain models)
    g = GroupedModel(models)
    for k, st in enumerate(g.state_dicts()):
        assert torch.equal(st["stem.0.weight"], state["conv1.weight"])
        assert torch.equal(st["layers.7.bn2.running_var"], state["layer4.1.bn2.running_var"])
        assert torch.equal(st["fc.weight"], heads[k])
    out = g(torch.rand(3, 2, 3, *SIZE))
    assert out.shape == (3, 2, 2) and torch.isfinite(out).all()


def test_certssb_layout_is_accepted_too(tmp_path):
    ours = build_model("resnet18", 3, 10, SIZE).state_dict()  # a certssb resnet18 of 10 classes
    path = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in ours.items()}, str(path))
    init = PretrainedInit.load(path, "resnet18", 3, 2, SIZE)
    m = spec(init).new_model(0)
    assert torch.equal(m.layers[5].conv2.weight, ours["layers.5.conv2.weight"]) and m.fc.out_features == 2


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case,match", [
    ("resnet50", "not a ResNet-18 checkpoint.*layer1.0.conv3"),
    ("missing", "lacks 1 ResNet-18 tensor.*layers.3.bn1.weight"),
    ("shape", r"layers.0.conv1.weight has shape \[64, 64, 5, 5\]"),
    ("nan", "NaN or infinite"),
    ("pickle-code", "refused by torch.load\\(weights_only=True\\)"),
    ("plain-pickle", "neither a safetensors file nor a torch zip"),
    ("not-a-dict", "does not hold a state dict"),
])
def test_bad_checkpoints_get_one_clear_message(tmp_path, case, match):
    state = torchvision_state()
    path = tmp_path / f"{case}.bin"
    if case == "resnet50":
        state["layer1.0.conv3.weight"] = torch.zeros(256, 64, 1, 1)
    elif case == "missing":
        del state["layer2.1.bn1.weight"]
    elif case == "shape":
        state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    elif case == "nan":
        state["layer3.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    if case == "pickle-code":
        torch.save({"state_dict": state, "hook": _Evil()}, path)
    elif case == "plain-pickle":
        path.write_bytes(pickle.dumps({"x": 1}))
    elif case == "not-a-dict":
        torch.save([torch.zeros(2)], path)
    else:
        save_file(state, str(path))
    with pytest.raises(CertssbError, match=match):
        PretrainedInit.load(path, "resnet18", 3, 2, SIZE)


def test_wrong_arch_size_channels_and_missing_file(tv_file, tmp_path):
    path, _ = tv_file
    with pytest.raises(CertssbError, match="supports --arch resnet18, not 'cifar-preact-resnet'"):
        PretrainedInit.load(path, "cifar-preact-resnet", 3, 2, SIZE)
    with pytest.raises(CertssbError, match="at least 128x128 pixels; these are 64x64.*--image-size 128"):
        PretrainedInit.load(path, "resnet18", 3, 2, (64, 64))
    with pytest.raises(CertssbError, match="3 channels"):
        PretrainedInit.load(path, "resnet18", 1, 2, SIZE)
    with pytest.raises(CertssbError, match="does not exist"):
        PretrainedInit.load(tmp_path / "nope.safetensors", "resnet18", 3, 2, SIZE)


def test_config_key_only_when_set_and_cli_flag(tv_file):
    from certssb.cli import _config_from_args, build_parser

    assert "init_weights" not in RunConfig().to_dict()  # config.json / summary.json as before
    cfg = RunConfig(init_weights=str(tv_file[0]))
    assert cfg.to_dict()["init_weights"] == str(tv_file[0])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CertssbError, match="--init-weights must be the path"):
        RunConfig(init_weights=3).validate()
    args = build_parser().parse_args(["run", "--dataset", "imagenette", "--init-weights", "w.safetensors"])
    assert _config_from_args(args).init_weights == "w.safetensors"
    assert _config_from_args(build_parser().parse_args(["run"])).init_weights is None


def test_fingerprints_take_the_checkpoint_only_when_set(tmp_path, tv_file):
    """A tiny run at 128 px: without --init-weights the stage fingerprints are the old formula; with it
    they change, and with another checkpoint they change again (no stale models reused)."""
    from certssb.runner import pipeline

    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (8, 3, 128, 128), dtype=np.uint8), y_train=np.arange(8) % 2,
             x_test=rng.integers(0, 256, (4, 3, 128, 128), dtype=np.uint8), y_test=np.arange(4) % 2)
    other = tmp_path / "other.safetensors"
    save_file(torchvision_state(seed=1), str(other))
    base = dict(dataset="numpy", data_dir=str(npz), arch="resnet18", models=2, epochs=1, batch_size=4,
                trigger="onepixel", poison_rate=0.25, out=str(tmp_path / "run"))
    fps = []
    for init in (None, str(tv_file[0]), str(other)):
        cfg = RunConfig(**base, init_weights=init).resolve()
        p = pipeline.prepare(cfg, lambda s: None)
        sig = torch.full((p.poisoned.x.shape[0],), 0.25)
        ens = pipeline._ensemble(p, tmp_path, "rab", sig)
        fps.append(ens.spec.fingerprint)
        if init is None:
            assert p.init is None and ens.spec.init is None
            assert ens.spec.fingerprint == pipeline._hash("ensemble", p.data_fp, "rab", sig)  # today's formula
        else:
            assert ens.spec.new_model(0).stem[0].weight.shape == (64, 3, 7, 7)
    assert len(set(fps)) == 3
