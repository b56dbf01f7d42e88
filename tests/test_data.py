"""Datasets: on-disk loaders read tiny files written here in each real format."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sde import GaussianMixture
from sde.data import DATASETS, ArrayDataset, load_dataset, random_hflip

from _py2pickle import dumps_py2  # isort: skip  (tests/ helper: CIFAR-10's Python 2 pickle format)


def _scaled(raw):
    return torch.from_numpy(np.asarray(raw, dtype=np.float64)).float() / 127.5 - 1.0


# -- CIFAR-10 ----------------------------------------------------------------------------------
def _write_cifar(folder, rng, n=3):
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        files = [f"{name}_{i}.png".encode() for i in range(n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": files}
        (folder / name).write_bytes(dumps_py2(batch))
        batches[name] = (data, labels)
    meta = {b"num_cases_per_batch": n, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(dumps_py2(meta))
    return batches


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    train = load_dataset("cifar10", root=tmp_path)
    assert train.shape == (3, 32, 32) and len(train) == 15 and train.levels == 256 and train.num_classes == 10
    data, labels = batches["data_batch_2"]
    # row layout: 1024 red, then green, then blue values, each row-major 32 x 32
    torch.testing.assert_close(train.data[3], _scaled(data[0]).reshape(3, 32, 32))
    assert train.data[3, 1, 0, 5].item() == pytest.approx(data[0, 1024 + 5] / 127.5 - 1.0, abs=1e-6)
    assert train.labels[3:6].tolist() == labels
    test = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="test")  # the folder itself works too
    assert len(test) == 3 and test.labels.tolist() == batches["test_batch"][1]
    assert -1.0 <= train.data.min() and train.data.max() <= 1.0
    assert train.classes == CLASSES  # read from batches.meta


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path)
    _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch.*is not a CIFAR-10 python batch"):
        load_dataset("cifar10", root=tmp_path, split="test")


# -- MNIST ---------------------------------------------------------------------------------------
def _idx(array, ndim):
    return struct.pack(">I", 0x800 + ndim) + struct.pack(f">{ndim}I", *array.shape) + array.tobytes()


def test_mnist_plain_and_gz(tmp_path):
    rng = np.random.default_rng(1)
    train_x, train_y = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5).astype(np.uint8)
    test_x, test_y = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), rng.integers(0, 10, 2).astype(np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(train_x, 3))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(train_y, 1))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(test_x, 3)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(test_y, 1)))
    train, test = load_dataset("mnist", root=tmp_path), load_dataset("mnist", root=tmp_path, split="test")
    assert train.shape == (1, 28, 28) and len(train) == 5 and train.levels == 256 and train.num_classes == 10
    torch.testing.assert_close(train.data[:, 0], _scaled(train_x))
    torch.testing.assert_close(test.data[:, 0], _scaled(test_x))
    assert train.labels.tolist() == train_y.tolist() and test.labels.tolist() == test_y.tolist()


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((2, 4), np.uint8), 2))  # wrong magic
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(2, np.uint8), 1))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic number"):
        load_dataset("mnist", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((2, 4, 4), np.uint8), 3)[:-3])  # truncated
    with pytest.raises(ValueError, match="data bytes"):
        load_dataset("mnist", root=tmp_path)


# -- image folder --------------------------------------------------------------------------------
def test_image_folder_classes_and_resize(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for cls, n in (("cat", 2), ("ant", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            a = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / cls / f"{i}.png")
            arrays[(cls, i)] = a
    ds = load_dataset("image_folder", root=tmp_path)
    assert ds.classes == ["ant", "cat"] and ds.num_classes == 2 and ds.shape == (3, 6, 4) and ds.levels == 256
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(ds.data[3], _scaled(arrays[("cat", 0)]).permute(2, 0, 1))
    small = load_dataset("image_folder", root=tmp_path, image_size=2)
    assert small.shape == (3, 2, 2) and -1 <= small.data.min() and small.data.max() <= 1


def test_image_folder_flat_grayscale_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("image_folder", root=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dataset("image_folder", root=tmp_path)
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "b.png")
    ds = load_dataset("image_folder", root=tmp_path)
    assert ds.labels is None and ds.num_classes == 0 and ds.shape == (1, 5, 5)
    assert torch.all(ds.data[0] == 1.0) and torch.all(ds.data[1] == -1.0)
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match="pass image_size"):
        load_dataset("image_folder", root=tmp_path)
    (tmp_path / "c.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image.*c.png"):
        load_dataset("image_folder", root=tmp_path)


# -- embedded and synthetic ----------------------------------------------------------------------
def test_digits_split_is_deterministic_and_quantized():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and train.shape == (1, 8, 8) and train.levels == 17
    assert train.num_classes == 10 and set(test.labels.tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits").data, train.data)
    k = (train.data + 1) * 8  # 17 levels k = 0..16 map to 2k/16 - 1
    torch.testing.assert_close(k, k.round())
    assert k.min() == 0 and k.max() == 16
    # the split is by index: no index in both, so (almost) no test image reappears in train
    dup = (test.data.flatten(1)[:, None] == train.data.flatten(1)[None]).all(-1).any(-1)
    assert dup.double().mean() < 0.02


@pytest.mark.parametrize("name", ["moons", "swiss_roll", "checkerboard", "gmm"])
def test_toy_sets(name):
    a = load_dataset(name, n=500, generator=torch.Generator().manual_seed(5))
    b = load_dataset(name, n=500, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2,) and len(a) == 500 and a.levels is None and torch.equal(a.data, b.data)
    assert not torch.equal(load_dataset(name, n=500).data, load_dataset(name, n=500, split="test").data)
    assert a.data.abs().max() < 1.3  # scaled to about [-1, 1]
    if name == "checkerboard":
        cell = ((a.data + 1) * 2).floor().long()  # 4 x 4 board: only black cells (i + j even) are filled
        assert torch.all(cell.sum(1) % 2 == 0)


def test_gmm_exposes_its_oracle():
    gm = GaussianMixture(torch.tensor([[0.0, 0.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64), stds=0.1)
    ds = load_dataset("gmm", n=400, oracle=gm, seed=1, dtype=torch.float64)
    assert ds.oracle is gm and ds.num_classes == 2 and ds.shape == (3,)
    torch.testing.assert_close(ds.data, gm.means[ds.labels], atol=0.6, rtol=0)  # each point near its component


def test_batches_and_hflip():
    ds = ArrayDataset(torch.arange(2 * 3 * 4.0).reshape(2, 1, 3, 4).repeat(50, 1, 1, 1), torch.arange(100))
    g = torch.Generator().manual_seed(0)
    seen, flipped = [], 0
    for x, y in ds.batches(16, hflip=True, generator=g):
        assert x.shape == (16, 1, 3, 4)
        orig = ds.data[y]
        is_flip = (x == orig.flip(-1)).flatten(1).all(1)
        assert torch.all(is_flip | (x == orig).flatten(1).all(1))
        flipped += int(is_flip.sum())
        seen += y.tolist()
    assert len(seen) == 96 and len(set(seen)) == 96 and 20 < flipped < 76
    x = torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(random_hflip(x, p=1.0), x.flip(-1))
    with pytest.raises(ValueError, match="hflip needs"):
        next(load_dataset("moons", n=10).batches(4, hflip=True))


def test_bad_names_and_options(tmp_path):
    with pytest.raises(ValueError, match=r"name='imagenet'.*'checkerboard'.*'cifar10'.*'digits'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split='val'"):
        load_dataset("digits", split="val")
    with pytest.raises(TypeError, match="load_dataset\\('moons'\\).*radius"):
        load_dataset("moons", radius=2)
    assert set(DATASETS) == {"digits", "moons", "swiss_roll", "checkerboard", "gmm", "image_folder", "cifar10", "mnist"}


def test_levels_and_bpd_bins_match_the_training_grid():
    from sde.losses import dequantize

    ds = load_dataset("digits", split="test")
    k = ds.to_levels()
    assert k.dtype == torch.long and k.min() == 0 and k.max() == 16
    torch.testing.assert_close(2 * k.double() / 16 - 1, ds.data.double())
    opts = ds.bpd_options()
    # bits/dim maps x = (k + u) / L to y = scale x - shift: u = 1/2 must land on the grid point
    y_mid = opts["scale"] * (k.double() + 0.5) / opts["levels"] - opts["shift"]
    torch.testing.assert_close(y_mid, ds.data.double())
    # and dequantize spreads each grid point over exactly that bin
    xd = dequantize(ds.data.double(), 17, generator=torch.Generator().manual_seed(0))
    u = (xd + opts["shift"]) * opts["levels"] / opts["scale"] - k.double()
    assert 0 <= u.min() and u.max() < 1 and u.std() > 0.25
    with pytest.raises(ValueError, match="continuous"):
        load_dataset("moons", n=10).to_levels()
