"""Tests for certssb.data: every reader on tiny files generated here, every error path, and the
real datasets in shared/data (skipped when absent)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import certssb.data.locate as D
from certssb.data import (CIFAR10_CLASSES, DATASETS, TaskData, load_task, parse_classes,
                          resolve_data_dir)
from certssb.errors import CertssbError, DataError

REPO = Path(__file__).resolve().parent.parent
REAL = Path(os.environ.get("CERTSSB_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch):
    # Tests decide the data location themselves; a user's CERTSSB_DATA must not leak in.
    monkeypatch.delenv("CERTSSB_DATA", raising=False)
    monkeypatch.delenv("CERTSSB_CACHE", raising=False)


# --------------------------------------------------------------------------- file writers


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def mnist_arrays(n: int, h: int = 7, w: int = 5, offset: int = 0):
    """Images whose pixel (0, 0) is the sample index and (0, 1) is the label: order and mapping checkable."""
    y = (np.arange(n) * 7 + offset) % 10
    x = np.zeros((n, h, w), np.uint8)
    x[:, 0, 0] = np.arange(n)
    x[:, 0, 1] = y * 25
    x[:, 1:, :] = 200
    return x, y.astype(np.uint8)


def make_mnist(d: Path, gz: bool = True, n_train: int = 60, n_test: int = 30) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n, off in (("train", n_train, 0), ("t10k", n_test, 3)):
        x, y = mnist_arrays(n, offset=off)
        write_idx(d / f"{split}-images-idx3-ubyte{ext}", x, 2051)
        write_idx(d / f"{split}-labels-idx1-ubyte{ext}", y, 2049)
    return d


def cifar_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


def _sbs(s: bytes) -> bytes:  # SHORT_BINSTRING opcode
    return b"U" + bytes([len(s)]) + s


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the official files: protocol 2, byte strings,
    numpy.core.multiarray._reconstruct, raw pixel bytes as BINSTRING."""
    n, m = data.shape
    out = bytearray(b"\x80\x02}(")
    out += _sbs(b"batch_label") + _sbs(b"training batch 1 of 5")
    out += _sbs(b"data") + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _sbs(b"b") + b"\x87R"
    out += b"(K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", m) + b"\x86"
    out += b"cnumpy\ndtype\n" + _sbs(b"u1") + b"\x89\x88\x87R"
    out += b"(K\x03" + _sbs(b"|") + b"NNNJ" + struct.pack("<i", -1) + b"J" + struct.pack("<i", -1) + b"K\x00tb"
    raw = data.tobytes()
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += _sbs(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += b"u."
    return bytes(out)


def make_cifar_batches(d: Path, protocol: int | str = 4, n: int = 12):
    """Write data_batch_1..5 and test_batch; returns the (data, labels) written, train then test."""
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_arrays(n, seed=i)
        if protocol == "py2":
            (d / name).write_bytes(py2_cifar_pickle(data, labels))
        else:
            obj = {b"batch_label": b"batch", b"labels": labels, b"data": data,
                   b"filenames": [b"f%d.png" % j for j in range(n)]}
            with open(d / name, "wb") as f:
                pickle.dump(obj, f, protocol=protocol)
        written.append((data, labels))
    return written


COLORS = {"airplane": (250, 10, 10), "automobile": (10, 250, 10), "bird": (10, 10, 250),
          "cat": (128, 128, 128)}


def make_image_tree(root: Path, splits: dict[str, dict[str, int]], size=(32, 32), ext=".jpg",
                    colors: dict[str, tuple[int, int, int]] | None = None, mode: str = "RGB") -> Path:
    """root/<split>/<class>/<k><ext>: solid-colour images (JPEG-safe) with a per-image brightness step."""
    for split, counts in splits.items():
        for ci, (cls, count) in enumerate(counts.items()):
            cdir = root / split / cls
            cdir.mkdir(parents=True, exist_ok=True)
            base = (colors or {}).get(cls, (40 * ci % 256, 100, 200))
            for k in range(count):
                arr = np.empty((size[1], size[0], 3), np.uint8)
                arr[:] = [(c + 3 * k) % 256 for c in base]
                im = Image.fromarray(arr)
                if mode != "RGB":
                    im = im.convert(mode)
                im.save(cdir / f"{k:04d}{ext}", **({"quality": 95} if ext.lower() in (".jpg", ".jpeg") else {}))
    return root


# --------------------------------------------------------------------------- parse_classes


def test_parse_classes_valid():
    assert parse_classes("1,0") == [1, 0]
    assert parse_classes(" 0 , 2 ") == [0, 2]
    assert parse_classes("3") == [3]
    for empty in (None, "", "all", "ALL", "  "):
        assert parse_classes(empty) is None


@pytest.mark.parametrize("bad", ["a,b", "1,,0", "-1,0", "1.5,2", "1;0", "0,"])
def test_parse_classes_bad(bad):
    with pytest.raises(CertssbError, match="comma-separated list of class ids"):
        parse_classes(bad)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_range():
    t = load_task("digits")
    assert t.x_train.shape == (1347, 1, 8, 8) and t.x_test.shape == (450, 1, 8, 8)
    assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
    assert float(t.x_train.min()) == 0.0 and float(t.x_train.max()) == 1.0
    assert t.classes == list(range(10)) and t.class_names == [str(i) for i in range(10)]
    assert t.source == "sklearn load_digits"
    assert t.num_classes == 10 and t.image_shape == (1, 8, 8)
    # Stratified: every class in both splits in the same proportion (+-1 sample).
    tr, te = torch.bincount(t.y_train), torch.bincount(t.y_test)
    assert (te * 3 - tr).abs().max() <= 4
    # Pixel values are multiples of 1/16.
    assert torch.allclose(t.x_train * 16, (t.x_train * 16).round())
    json.dumps(t.describe())
    assert t.describe()["n_train"] == 1347 and t.describe()["image_shape"] == [1, 8, 8]


def test_digits_test_set_does_not_depend_on_seed():
    a, b = load_task("digits", seed=0), load_task("digits", seed=123)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert torch.equal(a.x_train, b.x_train)


def test_digits_class_pair_mapping():
    full = load_task("digits")
    pair = load_task("digits", classes=[1, 0])
    assert pair.classes == [1, 0] and pair.class_names == ["1", "0"]
    # task label 0 = original 1, task label 1 = original 0, order kept.
    for task_label, orig in ((0, 1), (1, 0)):
        assert torch.equal(pair.x_test[pair.y_test == task_label], full.x_test[full.y_test == orig])
        assert torch.equal(pair.x_train[pair.y_train == task_label], full.x_train[full.y_train == orig])
    assert set(pair.y_train.tolist()) == {0, 1}
    assert pair.x_train.shape[0] == int(((full.y_train == 0) | (full.y_train == 1)).sum())


def test_digits_string_classes_and_resize():
    t = load_task("digits", classes="3,5", image_size=16)
    assert t.classes == [3, 5] and t.x_train.shape[1:] == (1, 16, 16)
    assert float(t.x_train.min()) >= 0.0 and float(t.x_train.max()) <= 1.0


def test_digits_rejects_data_dir(tmp_path):
    with pytest.raises(CertssbError, match="embedded in scikit-learn"):
        load_task("digits", data_dir=tmp_path)


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize("classes, match", [
    ([1], "fewer than 2"),
    ([], "fewer than 2"),
    ([1, 1], "repeated"),
    ([0, 12], r"not in digits; valid ids: 0, 1, 2"),
    ([0, -1], "not in digits"),
    ([0, 1.5], "integer class ids"),
    ([True, 0], "integer class ids"),
])
def test_class_validation(classes, match):
    with pytest.raises(CertssbError, match=match):
        load_task("digits", classes=classes)


@pytest.mark.parametrize("kw, match", [
    ({"max_train": -1}, "max_train must be a positive integer"),
    ({"max_train": 0}, "max_train must be a positive integer"),
    ({"max_test": 2.5}, "max_test must be a positive integer"),
    ({"image_size": 0}, "image_size must be a positive integer"),
    ({"seed": -3}, "seed must be a non-negative integer"),
])
def test_argument_validation(kw, match):
    with pytest.raises(CertssbError, match=match):
        load_task("digits", **kw)


def test_unknown_dataset():
    with pytest.raises(CertssbError, match="unknown dataset 'svhn'.*digits, mnist"):
        load_task("svhn")
    with pytest.raises(CertssbError, match="unknown dataset"):
        resolve_data_dir("svhn", None)


def test_datasets_constant():
    assert DATASETS == ("digits", "mnist", "cifar10", "imagenette", "folder", "numpy")


# --------------------------------------------------------------------------- MNIST IDX


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    d = make_mnist(tmp_path / "m", gz=gz)
    t = load_task("mnist", data_dir=d, classes=[1, 0])
    xtr, ytr = mnist_arrays(60)
    keep = np.flatnonzero((ytr == 1) | (ytr == 0))
    assert t.x_train.shape == (len(keep), 1, 7, 5) and t.x_train.dtype == torch.float32
    assert torch.equal(t.x_train, torch.from_numpy(xtr[keep][:, None]).float() / 255)
    assert t.y_train.tolist() == [0 if ytr[i] == 1 else 1 for i in keep]
    assert t.classes == [1, 0] and t.class_names == ["1", "0"]
    assert "MNIST IDX" in t.source and str(d) in t.source
    full = load_task("mnist", data_dir=d)
    assert full.x_train.shape[0] == 60 and full.x_test.shape[0] == 30
    assert full.y_test.tolist() == mnist_arrays(30, offset=3)[1].tolist()


def test_mnist_prefers_plain_when_both_exist(tmp_path):
    d = make_mnist(tmp_path, gz=True)
    make_mnist(tmp_path, gz=False, n_train=40)
    assert load_task("mnist", data_dir=d).x_train.shape[0] == 40


def test_mnist_truncated_plain(tmp_path):
    d = make_mnist(tmp_path, gz=False)
    f = d / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: holds \d+ bytes .* truncated"):
        load_task("mnist", data_dir=d)


def test_mnist_truncated_gz(tmp_path):
    d = make_mnist(tmp_path, gz=True)
    f = d / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: cannot read"):
        load_task("mnist", data_dir=d)


def test_mnist_bad_magic(tmp_path):
    d = make_mnist(tmp_path, gz=False)
    # A label file where the image file should be.
    (d / "train-images-idx3-ubyte").write_bytes((d / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: magic number 2049 is not 2051"):
        load_task("mnist", data_dir=d)


def test_mnist_missing_file_and_count_mismatch(tmp_path):
    d = make_mnist(tmp_path / "a", gz=True)
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"lacks t10k-images-idx3-ubyte \(or t10k-images-idx3-ubyte\.gz\)"):
        load_task("mnist", data_dir=d)
    d = make_mnist(tmp_path / "b", gz=False)
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), 2049)
    with pytest.raises(DataError, match="holds 60 images but .* holds 5 labels"):
        load_task("mnist", data_dir=d)


# --------------------------------------------------------------------------- subsampling


def test_subsampling_deterministic_ordered_and_independent(tmp_path):
    d = make_mnist(tmp_path, n_train=200, n_test=100)
    a = load_task("mnist", data_dir=d, max_train=25, max_test=10, seed=7)
    b = load_task("mnist", data_dir=d, max_train=25, max_test=10, seed=7)
    c = load_task("mnist", data_dir=d, max_train=25, max_test=10, seed=8)
    assert a.x_train.shape[0] == 25 and a.x_test.shape[0] == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    # Pixel (0, 0) holds the original index: strictly increasing = original order kept.
    idx = (a.x_train[:, 0, 0, 0] * 255).round().long()
    assert torch.all(idx[1:] > idx[:-1])
    # Labels still match their images after subsampling (pixel (0, 1) = 25 * label).
    assert torch.equal((a.x_train[:, 0, 0, 1] * 255 / 25).round().long(), a.y_train)
    # The test subsample does not depend on max_train.
    e = load_task("mnist", data_dir=d, max_test=10, seed=7)
    assert torch.equal(e.x_test, a.x_test) and e.x_train.shape[0] == 200
    # More than available: everything.
    assert load_task("mnist", data_dir=d, max_train=10_000).x_train.shape[0] == 200


# --------------------------------------------------------------------------- CIFAR-10 batches


@pytest.mark.parametrize("protocol", ["py2", 3, 4, 5])
def test_cifar_batches(tmp_path, protocol):
    d = tmp_path / "cifar-10-batches-py"
    written = make_cifar_batches(d, protocol=protocol)
    t = load_task("cifar10", data_dir=d, classes=[0, 2])
    data = np.concatenate([w[0] for w in written[:5]])
    labels = np.concatenate([w[1] for w in written[:5]])
    keep = np.flatnonzero(np.isin(labels, [0, 2]))
    assert t.x_train.shape == (len(keep), 3, 32, 32)
    expect = torch.from_numpy(data[keep].reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(t.x_train, expect)
    assert t.y_train.tolist() == [0 if labels[i] == 0 else 1 for i in keep]
    assert t.class_names == ["airplane", "bird"]
    assert "python batches" in t.source
    full = load_task("cifar10", data_dir=d)
    assert full.x_train.shape[0] == 60 and full.x_test.shape[0] == 12
    assert full.y_test.tolist() == written[5][1]
    assert full.class_names == list(CIFAR10_CLASSES)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_refused_without_running(tmp_path):
    # The payload is real: an unrestricted unpickler runs it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(probe)))
    assert probe.exists()

    d = tmp_path / "cifar-10-batches-py"
    make_cifar_batches(d)
    marker = tmp_path / "pwned"
    data, labels = cifar_arrays(12, seed=0)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"x": _Evil(marker)}, f)
    with pytest.raises(DataError, match=r"data_batch_3: refusing to unpickle global (posix|os|nt)\.system"):
        load_task("cifar10", data_dir=d)
    assert not marker.exists()


def test_cifar_other_globals_refused(tmp_path):
    d = tmp_path / "b"
    make_cifar_batches(d)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"f": eval}, f)
    with pytest.raises(DataError, match=r"refusing to unpickle global builtins\.eval"):
        load_task("cifar10", data_dir=d)


def test_cifar_batch_errors(tmp_path):
    d = tmp_path / "b"
    make_cifar_batches(d)
    f = d / "data_batch_2"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR-10 batch"):
        load_task("cifar10", data_dir=d)
    make_cifar_batches(d)
    (d / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5 is missing"):
        load_task("cifar10", data_dir=d)
    make_cifar_batches(d)
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"expected uint8 \[N, 3072\]"):
        load_task("cifar10", data_dir=d)


# --------------------------------------------------------------------------- CIFAR-10 folder


def test_cifar_folder_jpeg(tmp_path):
    root = make_image_tree(tmp_path / "cifar10-jpeg",
                           {"train": {"airplane": 4, "automobile": 3, "bird": 5},
                            "test": {"airplane": 2, "automobile": 2, "bird": 3}}, colors=COLORS)
    t = load_task("cifar10", data_dir=root, classes=[2, 0])
    assert "CIFAR-10 (JPEG q75 copy)" in t.source
    assert t.x_train.shape == (9, 3, 32, 32) and t.x_test.shape == (5, 3, 32, 32)
    assert t.class_names == ["bird", "airplane"]
    # Dataset order (airplane before bird) with task labels bird=0, airplane=1.
    assert t.y_train.tolist() == [1] * 4 + [0] * 5
    mean = t.x_train.mean(dim=(2, 3))
    assert torch.allclose(mean[0], torch.tensor([250, 10, 10]) / 255, atol=0.04)
    assert float(mean[4, 2]) > 0.9 and float(mean[4, 0]) < 0.1  # first bird is blue
    assert 0.0 <= float(t.x_train.min()) and float(t.x_train.max()) <= 1.0


def test_cifar_folder_decodes_only_selected_classes(tmp_path):
    root = make_image_tree(tmp_path / "cifar10",
                           {"train": {"airplane": 2, "automobile": 2, "bird": 2},
                            "test": {"airplane": 1, "automobile": 1, "bird": 1}})
    bad = root / "train" / "automobile" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    t = load_task("cifar10", data_dir=root, classes=[0, 2])
    assert t.x_train.shape[0] == 4
    assert "JPEG copy, lossy" in t.source  # not the shared q75 copy's folder name
    with pytest.raises(DataError, match=r"cannot decode image .*automobile/0001\.jpg"):
        load_task("cifar10", data_dir=root, classes=[0, 1])
    with pytest.raises(DataError, match="cat is missing"):
        load_task("cifar10", data_dir=root, classes=[0, 3])


def test_cifar_folder_resize_and_unknown_folder(tmp_path):
    root = make_image_tree(tmp_path / "c", {"train": {"airplane": 2, "bird": 2},
                                            "test": {"airplane": 1, "bird": 1}}, ext=".png")
    t = load_task("cifar10", data_dir=root, classes=[0, 2], image_size=16)
    assert t.x_train.shape == (4, 3, 16, 16)
    assert "image-folder copy" in t.source
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match=r"\['zebra'\] that are not CIFAR-10 classes"):
        load_task("cifar10", data_dir=root, classes=[0, 2])


# --------------------------------------------------------------------------- ImageNette


WNIDS = ["n01440764", "n02102040", "n02979186"]


def test_imagenette_tree(tmp_path):
    root = tmp_path / "imagenette2-224-thunderInfy"
    make_image_tree(root, {"train": {w: 3 for w in WNIDS}, "val": {w: 2 for w in WNIDS}},
                    size=(40, 30), ext=".JPEG")
    # One grayscale image: must come back as RGB with three equal channels.
    Image.new("L", (50, 50), 90).save(root / "val" / WNIDS[1] / "0009.JPEG", quality=95)
    t = load_task("imagenette", data_dir=root, classes=[1, 0], image_size=32)
    assert t.class_names == ["English springer", "tench"]
    assert t.x_train.shape == (6, 3, 32, 32) and t.x_test.shape == (5, 3, 32, 32)
    assert t.y_test.tolist() == [1, 1, 0, 0, 0]
    gray = t.x_test[-1]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    assert abs(float(gray.mean()) - 90 / 255) < 0.02
    assert "ImageNette (224px copy, 600 train images per class)" in t.source
    # Default size is 224.
    d = load_task("imagenette", data_dir=root, classes=[0, 2], max_train=2, max_test=1)
    assert d.x_train.shape == (2, 3, 224, 224) and d.x_test.shape == (1, 3, 224, 224)
    assert load_task("imagenette", data_dir=root, image_size=8).class_names == \
        ["tench", "English springer", "cassette player"]


def test_imagenette_train_val_mismatch(tmp_path):
    root = make_image_tree(tmp_path / "imagenette2-160", {"train": {w: 1 for w in WNIDS},
                                                          "val": {w: 1 for w in WNIDS[:2]}},
                           size=(8, 8), ext=".JPEG")
    with pytest.raises(DataError, match=r"train/ and val/ hold different class folders \(\['n02979186'\]"):
        load_task("imagenette", data_dir=root, image_size=8)


# --------------------------------------------------------------------------- generic folder


def test_folder_png_exact_values_and_val_split(tmp_path):
    colors = {"zebra": (0, 51, 255), "ant": (255, 0, 102), "cat": (10, 20, 30)}
    root = make_image_tree(tmp_path / "f", {"train": {"zebra": 2, "ant": 3, "cat": 1},
                                            "val": {"zebra": 1, "ant": 1, "cat": 1}},
                           size=(6, 4), ext=".png", colors=colors)
    t = load_task("folder", data_dir=root, classes=[2, 0])
    assert t.class_names == ["zebra", "ant"]  # sorted: ant=0, cat=1, zebra=2
    assert t.x_train.shape == (5, 3, 4, 6)
    assert t.y_train.tolist() == [1, 1, 1, 0, 0]
    assert torch.equal(t.x_train[0, :, 0, 0], torch.tensor([255, 0, 102]) / 255.0)
    assert torch.equal(t.x_train[4, :, 0, 0], torch.tensor([3, 54, 258 - 256]) / 255.0)
    assert "image folder" in t.source
    full = load_task("folder", data_dir=root)
    assert full.class_names == ["ant", "cat", "zebra"] and full.x_test.shape[0] == 3


def test_folder_sizes_differ_and_grayscale(tmp_path):
    root = make_image_tree(tmp_path / "f", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}},
                           size=(8, 8), ext=".png", mode="L")
    Image.new("L", (10, 12), 7).save(root / "train" / "b" / "0005.png")
    with pytest.raises(DataError, match="images differ in size.*pass --image-size"):
        load_task("folder", data_dir=root)
    t = load_task("folder", data_dir=root, image_size=5)
    assert t.x_train.shape == (5, 3, 5, 5)
    assert torch.equal(t.x_train[:, 0], t.x_train[:, 2])


def test_folder_errors(tmp_path):
    with pytest.raises(CertssbError, match="needs --data-dir"):
        load_task("folder")
    with pytest.raises(DataError, match="no train/ and test/"):
        load_task("folder", data_dir=tmp_path)
    root = make_image_tree(tmp_path / "f", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "c": 1}},
                           size=(4, 4), ext=".png")
    with pytest.raises(DataError, match="hold different class folders"):
        load_task("folder", data_dir=root)
    root = make_image_tree(tmp_path / "g", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}},
                           size=(4, 4), ext=".png")
    for p in (root / "train" / "b").iterdir():
        p.unlink()
    (root / "train" / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no image files"):
        load_task("folder", data_dir=root)


# --------------------------------------------------------------------------- numpy


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("layout", ["NHW", "NHWC1", "NHWC3", "NCHW1", "NCHW3"])
def test_numpy_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    c = 3 if layout.endswith("3") else 1
    nchw = rng.integers(0, 256, (20, c, 5, 6), dtype=np.uint8)
    x = {"NHW": nchw[:, 0], "NHWC1": nchw.transpose(0, 2, 3, 1), "NHWC3": nchw.transpose(0, 2, 3, 1),
         "NCHW1": nchw, "NCHW3": nchw}[layout]
    y = np.arange(20) % 3
    p = _npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    t = load_task("numpy", data_dir=p, classes=[2, 1])
    keep = np.flatnonzero(y != 0)
    assert torch.equal(t.x_train, torch.from_numpy(nchw[keep]).float() / 255)
    assert t.y_train.tolist() == [0 if y[i] == 2 else 1 for i in keep]
    assert t.class_names == ["2", "1"] and "NumPy arrays" in t.source


def test_numpy_float_folder_and_class_names(tmp_path):
    x = np.linspace(0, 1, 8 * 16, dtype=np.float64).reshape(8, 4, 4)
    y = np.array([0, 1] * 4, dtype=np.int32)
    _npz(tmp_path / "only.npz", x_train=x, y_train=y, x_test=x, y_test=y,
         class_names=np.array(["cat", "dog"]))
    t = load_task("numpy", data_dir=tmp_path)  # a folder holding exactly one .npz
    assert t.x_train.dtype == torch.float32 and t.x_train.shape == (8, 1, 4, 4)
    assert torch.allclose(t.x_train[:, 0], torch.from_numpy(x).float())
    assert t.class_names == ["cat", "dog"]
    _npz(tmp_path / "second.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match="holds 2 .npz files"):
        load_task("numpy", data_dir=tmp_path)
    with pytest.raises(CertssbError, match="needs --data-dir"):
        load_task("numpy")


@pytest.mark.parametrize("change, match", [
    ({"x_train": np.full((4, 3, 3), 1.5)}, r"values span \[1.5, 1.5\].*in \[0, 1\]"),
    ({"x_train": np.full((4, 3, 3), np.nan)}, "must be finite"),
    ({"x_train": np.zeros((4, 3, 3), np.int32)}, "dtype int32; store images as uint8"),
    ({"x_train": np.zeros((4, 5, 4, 4), np.uint8)}, r"shape \[4, 5, 4, 4\]; expected"),
    ({"x_train": np.zeros((4, 1, 3, 3, 1), np.uint8)}, r"shape \[4, 1, 3, 3, 1\]"),
    ({"y_train": np.array([0.0, 1.0, 0.0, 1.0])}, "labels must be a 1-D integer array"),
    ({"y_train": np.array([0, 1, 0])}, "3 labels for 4 images"),
    ({"y_train": np.array([0, -1, 0, 1])}, "negative labels"),
    ({"y_test": np.array([0, 5])}, "y_test holds label 5 but there are 2 classes"),
    ({"x_test": np.zeros((2, 4, 4), np.uint8)}, "both must have the same shape"),
    ({"y_train": np.array([0, 0, 0, 0]), "y_test": np.array([0, 0])}, "only 1 class"),
])
def test_numpy_errors(tmp_path, change, match):
    arrays = {"x_train": np.zeros((4, 3, 3), np.uint8), "y_train": np.array([0, 1, 0, 1]),
              "x_test": np.zeros((2, 3, 3), np.uint8), "y_test": np.array([0, 1])}
    arrays.update(change)
    p = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_task("numpy", data_dir=p)


def test_numpy_missing_key_object_array_and_corrupt(tmp_path):
    p = _npz(tmp_path / "a.npz", x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.array([0, 1]))
    with pytest.raises(DataError, match=r"lacks \['x_test', 'y_test'\]"):
        load_task("numpy", data_dir=p)
    obj = np.empty(2, dtype=object)
    p = _npz(tmp_path / "b.npz", x_train=np.zeros((2, 3, 3), np.uint8), y_train=obj,
             x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.array([0, 1]))
    with pytest.raises(DataError, match="no object dtype"):
        load_task("numpy", data_dir=p)
    p = tmp_path / "c.npz"
    p.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_task("numpy", data_dir=p)
    with pytest.raises(DataError, match="has no training samples of class"):
        q = _npz(tmp_path / "e.npz", x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.array([0, 2]),
                 x_test=np.zeros((1, 3, 3), np.uint8), y_test=np.array([1]))
        load_task("numpy", data_dir=q)


# --------------------------------------------------------------------------- data-dir resolution


def test_resolve_explicit_and_subfolders(tmp_path):
    direct = make_mnist(tmp_path / "direct")
    assert resolve_data_dir("mnist", direct) == direct
    assert resolve_data_dir("mnist", str(direct)) == direct
    make_mnist(tmp_path / "r1" / "mnist")
    assert resolve_data_dir("mnist", tmp_path / "r1") == tmp_path / "r1" / "mnist"
    make_mnist(tmp_path / "r2" / "MNIST" / "raw")
    assert resolve_data_dir("mnist", tmp_path / "r2") == tmp_path / "r2" / "MNIST" / "raw"
    assert load_task("mnist", data_dir=tmp_path / "r2").x_train.shape[0] == 60
    root = tmp_path / "r3"
    make_image_tree(root / "imagenette" / "imagenette2-224-thunderInfy",
                    {"train": {WNIDS[0]: 1}, "val": {WNIDS[0]: 1}}, size=(4, 4), ext=".JPEG")
    assert resolve_data_dir("imagenette", root) == root / "imagenette" / "imagenette2-224-thunderInfy"


def test_resolve_cifar_prefers_official_batches(tmp_path):
    make_image_tree(tmp_path / "cifar10-jpeg", {"train": {"airplane": 1}, "test": {"airplane": 1}})
    assert resolve_data_dir("cifar10", tmp_path) == tmp_path / "cifar10-jpeg"
    make_cifar_batches(tmp_path / "cifar-10-batches-py", n=2)
    assert resolve_data_dir("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"


def test_resolve_env_var(tmp_path, monkeypatch):
    make_mnist(tmp_path / "envroot" / "mnist")
    monkeypatch.setenv("CERTSSB_DATA", str(tmp_path / "envroot"))
    assert resolve_data_dir("mnist", None) == tmp_path / "envroot" / "mnist"
    assert load_task("mnist", max_train=5).x_train.shape[0] == 5
    # An explicit data_dir wins over the env var.
    other = make_mnist(tmp_path / "other", n_train=40)
    assert resolve_data_dir("mnist", other) == other
    with pytest.raises(DataError, match=r"could not find cifar10.*\(CERTSSB_DATA\).*--data-dir.*CERTSSB_DATA"):
        resolve_data_dir("cifar10", None)


def test_resolve_default_locations(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_repo_root", lambda: tmp_path / "nowhere" / "repo")
    work = tmp_path / "proj"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(DataError, match=r"could not find mnist: looked for the four MNIST IDX files"
                                        r".*shared/data/MNIST/raw.*Pass --data-dir DIR or set CERTSSB_DATA"):
        resolve_data_dir("mnist", None)
    make_mnist(tmp_path / "shared" / "data" / "mnist")  # ../shared/data from the cwd
    assert resolve_data_dir("mnist", None) == tmp_path / "shared" / "data" / "mnist"
    # Repo-root fallback.
    (tmp_path / "nowhere" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "nowhere" / "deep")
    monkeypatch.setattr(D, "_repo_root", lambda: work)
    assert resolve_data_dir("mnist", None) == tmp_path / "shared" / "data" / "mnist"


def test_resolve_missing_dirs(tmp_path):
    with pytest.raises(DataError, match="--data-dir .*does not exist"):
        resolve_data_dir("mnist", tmp_path / "absent")
    with pytest.raises(DataError, match=r"could not find imagenette.*\(--data-dir\)"):
        load_task("imagenette", data_dir=tmp_path)
    with pytest.raises(CertssbError, match="reads no files"):
        resolve_data_dir("digits", None)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir("numpy", tmp_path / "x.npz")


def test_taskdata_describe():
    t = TaskData("x", torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64), torch.zeros(1, 1, 2, 2),
                 torch.zeros(1, dtype=torch.int64), [4, 2], ["four", "two"], "here")
    assert t.describe() == {"name": "x", "classes": [4, 2], "class_names": ["four", "two"], "n_train": 3,
                            "n_test": 1, "image_shape": [1, 2, 2], "source": "here"}
    assert t.num_classes == 2 and t.image_shape == (1, 2, 2)


# --------------------------------------------------------------------------- real data


def _real(sub: str) -> Path:
    p = REAL / sub
    if not p.is_dir():
        pytest.skip(f"real dataset {p} absent")
    return p


def test_real_mnist_one_vs_zero():
    _real("mnist")
    t = load_task("mnist", data_dir=REAL, classes=[1, 0])
    assert t.x_train.shape == (12665, 1, 28, 28) and t.x_test.shape == (2115, 1, 28, 28)
    assert torch.bincount(t.y_train).tolist() == [6742, 5923]
    assert torch.bincount(t.y_test).tolist() == [1135, 980]
    assert float(t.x_train.min()) == 0.0 and float(t.x_train.max()) == 1.0


def test_real_cifar10_jpeg_airplane_vs_bird():
    _real("cifar10-jpeg")
    t = load_task("cifar10", data_dir=REAL / "cifar10-jpeg", classes=[0, 2])
    assert t.x_train.shape == (10000, 3, 32, 32) and t.x_test.shape == (2000, 3, 32, 32)
    assert t.class_names == ["airplane", "bird"]
    assert torch.bincount(t.y_train).tolist() == [5000, 5000]
    assert "CIFAR-10 (JPEG q75 copy)" in t.source


def test_real_imagenette_val():
    _real("imagenette")
    t = load_task("imagenette", data_dir=REAL, image_size=32, max_train=20)
    assert t.x_test.shape == (3925, 3, 32, 32) and t.x_train.shape == (20, 3, 32, 32)
    assert t.num_classes == 10 and t.class_names[0] == "tench" and t.class_names[-1] == "parachute"
    assert "ImageNette (224px copy, 600 train images per class)" in t.source
    pair = load_task("imagenette", data_dir=REAL, classes=[0, 9], image_size=32, max_train=50, max_test=40)
    assert pair.x_train.shape == (50, 3, 32, 32) and pair.x_test.shape[0] == 40
    assert pair.class_names == ["tench", "parachute"]


# --------------------------------------------------------------------------- uint8 decoding and the decode cache
def test_decoder_gives_uint8_and_conversion_is_the_old_formula(tmp_path):
    from certssb.data.images import decode_files, list_images, uint8_to_float

    root = make_image_tree(tmp_path / "t", {"train": {"a": 70}}, size=(9, 7), ext=".png")
    arr = decode_files(list_images(root / "train" / "a"), None, progress=False)
    assert arr.dtype == np.uint8 and arr.shape == (70, 7, 9, 3)
    old = torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()
    new = uint8_to_float(arr)
    assert new.is_contiguous() and new.dtype == torch.float32 and torch.equal(new, old)


def test_decode_cache_is_reused_keyed_and_verified(tmp_path, monkeypatch):
    import certssb.data.images as im

    root = tmp_path / "imagenette2"
    make_image_tree(root, {"train": {w: 3 for w in WNIDS[:3]}, "val": {w: 2 for w in WNIDS[:3]}},
                    size=(20, 20), ext=".JPEG")
    cache = tmp_path / "cache"
    plain = load_task("imagenette", data_dir=root, classes=[0, 1], image_size=16)
    assert not cache.exists()  # no cache unless asked for
    first = load_task("imagenette", data_dir=root, classes=[0, 1], image_size=16, cache_dir=cache)
    files = sorted(cache.glob("images-*.safetensors"))
    assert len(files) == 2  # train and test splits
    for a, b in ((plain.x_train, first.x_train), (plain.x_test, first.x_test)):
        assert torch.equal(a, b)  # byte-identical with and without the cache

    def no_decode(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(im, "decode_files", no_decode)
    again = load_task("imagenette", data_dir=root, classes=[0, 1], image_size=16, cache_dir=cache)
    assert torch.equal(again.x_train, plain.x_train) and torch.equal(again.x_test, plain.x_test)
    monkeypatch.setenv("CERTSSB_CACHE", str(cache))  # the environment setting, same files
    assert torch.equal(load_task("imagenette", data_dir=root, classes=[0, 1], image_size=16).x_test, plain.x_test)
    monkeypatch.undo()
    # another image size, another file list or an edited file: another key, decoded
    load_task("imagenette", data_dir=root, classes=[0, 1], image_size=12, cache_dir=cache)
    load_task("imagenette", data_dir=root, classes=[0, 2], image_size=16, cache_dir=cache)
    assert len(list(cache.glob("images-*.safetensors"))) == 6
    paths = im.list_images(root / "val" / WNIDS[0])
    key = im.cache_key(paths, 16)
    os.utime(paths[0], ns=(1, 1))
    assert im.cache_key(paths, 16) != key
    # a damaged cache file is never used: decoded again and rewritten
    for f in cache.glob("images-*.safetensors"):
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    fixed = load_task("imagenette", data_dir=root, classes=[0, 1], image_size=16, cache_dir=cache)
    assert torch.equal(fixed.x_train, plain.x_train)
    monkeypatch.setattr(im, "decode_files", no_decode)  # rewritten: read back without decoding
    assert torch.equal(load_task("imagenette", data_dir=root, classes=[0, 1], image_size=16,
                                 cache_dir=cache).x_train, plain.x_train)
