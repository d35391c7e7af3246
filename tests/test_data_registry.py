"""The dataset registry: a dataset registered from outside the package (here, a toy one defined in
this file) is loadable through load_task, selectable in RunConfig and listed by the CLI; unknown
names are refused with the registered ones listed; the built-in specs keep their old defaults."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import certssb
from certssb import cli
from certssb.data import (DATASETS, Catalog, DatasetSpec, TrainingDefaults, dataset_names, get_dataset,
                          load_task, register_dataset, register_reader, resolve_data_dir,
                          unregister_dataset)
from certssb.data.images import array_catalog
from certssb.errors import CertssbError
from certssb.runner.config import RunConfig

BUILTIN = ("digits", "mnist", "cifar10", "imagenette", "folder", "numpy")


def _toy_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.integers(0, 256, size=(n, 1, 6, 6), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 3
    return x, y


def read_toy(where: Path | None, image_size: int | None) -> Catalog:
    """Three classes of random 6x6 grey images, embedded (no files)."""
    return array_catalog([0, 1, 2], ["a", "b", "c"], "toy arrays", _toy_arrays(30, 1), _toy_arrays(12, 2),
                         image_size)


@pytest.fixture
def toy():
    spec = register_dataset(DatasetSpec(
        "toy", read_toy, no_files="made up in a test",
        training=TrainingDefaults(epochs=3, batch_size=8, lr=0.01, models=5, trigger="blending",
                                  trigger_pixels={"onepixel": (1, 2)})))
    try:
        yield spec
    finally:
        unregister_dataset("toy")
    assert "toy" not in dataset_names()


def test_builtin_order_and_live_names():
    assert dataset_names() == BUILTIN
    assert DATASETS == BUILTIN and certssb.DATASETS == BUILTIN


def test_toy_dataset_loads_through_load_task(toy):
    task = load_task("toy", classes=[2, 0], max_train=7, seed=3)
    x, y = _toy_arrays(30, 1)
    keep = np.flatnonzero(np.isin(y, [2, 0]))
    idx = np.sort(np.random.default_rng([3, 1]).choice(keep.size, size=7, replace=False))
    assert torch.equal(task.x_train, torch.from_numpy(x[keep[idx]]).float() / 255.0)
    assert task.y_train.tolist() == [0 if c == 2 else 1 for c in y[keep[idx]]]
    assert task.class_names == ["c", "a"] and task.source == "toy arrays"
    assert load_task("toy", image_size=4).image_shape == (1, 4, 4)
    with pytest.raises(CertssbError, match="'toy' is made up in a test and reads no files"):
        load_task("toy", data_dir="/anywhere")
    assert "toy" in certssb.data.DATASETS


def test_toy_dataset_in_run_config(toy):
    cfg = RunConfig(dataset="toy").resolve()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.models) == (3, 8, 0.01, 5)
    assert cfg.trigger == "blending" and cfg.poison_rate == 0.02 and cfg.trigger_pixel is None
    assert RunConfig(dataset="toy", trigger="onepixel").resolve().trigger_pixel == [1, 2]
    from certssb.runner.config import DATASET_DEFAULTS, DATASET_NAMES
    assert DATASET_NAMES == BUILTIN + ("toy",)
    assert DATASET_DEFAULTS["toy"] == {"epochs": 3, "batch_size": 8, "lr": 0.01, "models": 5,
                                       "trigger": "blending"}


def test_toy_dataset_in_cli_choices(toy, capsys):
    args = cli.build_parser().parse_args(["run", "--dataset", "toy"])
    assert args.dataset == "toy"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--dataset", "svhn"])
    assert "'toy'" in capsys.readouterr().err


def test_decorator_registration():
    @register_reader("toy2", no_files="a decorated reader",
                     training=TrainingDefaults(epochs=1, batch_size=2, lr=0.1, models=3))
    def read(where, image_size):
        return read_toy(where, image_size)

    try:
        assert get_dataset("toy2").read is read
        assert load_task("toy2").num_classes == 3
    finally:
        unregister_dataset("toy2")


def test_unknown_name_lists_registered(toy):
    for call in (lambda: get_dataset("svhn"), lambda: load_task("svhn"),
                 lambda: resolve_data_dir("svhn", None)):
        with pytest.raises(CertssbError, match="unknown dataset 'svhn'; choose one of "
                                               "digits, mnist, cifar10, imagenette, folder, numpy, toy$"):
            call()
    with pytest.raises(CertssbError, match="unknown dataset 'svhn'; choose one of .*numpy, toy$"):
        RunConfig(dataset="svhn").resolve()
    with pytest.raises(CertssbError, match="unknown dataset"):
        get_dataset(["digits"])  # unhashable: refused like any unknown name


def test_register_refuses_duplicates_and_bad_specs(toy):
    with pytest.raises(CertssbError, match="already registered"):
        register_dataset(toy)
    assert register_dataset(toy, replace=True) is toy
    with pytest.raises(CertssbError, match="exactly one of no_files, check_path and detect"):
        DatasetSpec("bad", read_toy, TrainingDefaults(1, 1, 0.1, 1))


def test_builtin_defaults_unchanged():
    from certssb.runner.config import DATASET_DEFAULTS
    assert DATASET_DEFAULTS == {
        "digits": {"epochs": 20, "batch_size": 64, "lr": 1e-3, "models": 32, "trigger": "blending",
                   "poison_rate": 0.05, "radii": [round(0.025 * i, 3) for i in range(11)]},
        "mnist": {"epochs": 20, "batch_size": 128, "lr": 1e-3, "models": 100},
        "cifar10": {"epochs": 10, "batch_size": 64, "lr": 1e-3, "models": 100},
        "imagenette": {"epochs": 5, "batch_size": 32, "lr": 1e-4, "models": 50},
        "folder": {"epochs": 10, "batch_size": 64, "lr": 1e-3, "models": 100},
        "numpy": {"epochs": 10, "batch_size": 64, "lr": 1e-3, "models": 100},
    }
    assert RunConfig(dataset="mnist").resolve().trigger_pixel == [23, 23]
    assert RunConfig(dataset="mnist", trigger="fourpixel").resolve().trigger_pixel == [19, 19]
    assert RunConfig(dataset="mnist", trigger="blending").resolve().trigger_pixel is None
    assert RunConfig(dataset="cifar10").resolve().trigger_pixel is None


def test_default_arch_comes_from_the_dataset_spec():
    """models.default_arch reads the dataset's declared architecture; undeclared ones go by shape."""
    from certssb.models import default_arch
    expected = {"digits": "digits-cnn", "mnist": "mnist-cnn", "cifar10": "cifar-preact-resnet",
                "imagenette": "resnet18"}
    for name, arch in expected.items():
        assert get_dataset(name).default_arch == arch
        assert default_arch(name, (3, 200, 200)) == arch  # the shape rule alone would say resnet18 / other
    assert default_arch("folder", (3, 32, 32)) == "cifar-preact-resnet"
    assert default_arch("not-registered", (1, 8, 8)) == "digits-cnn"


def test_list_images_is_the_shared_helper(tmp_path):
    from certssb.data.images import list_images
    for n in ("b.PNG", "a.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
