"""smoothchain.data: bundled / generated data sets, file loaders in torchvision's layouts
(written here as tiny synthetic files), scaling for Flynn's Assumption 4.1(ii), errors."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothchain import data
from smoothchain.data import (
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    cifar10,
    digits,
    load_dataset,
    mnist,
    read_idx,
    svhn,
    validation_split,
)

MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# ------------------------------------------------------------------------------------------
# synthetic files in torchvision's layouts
# ------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def images_u8(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    x.reshape(n, -1)[0, 0] = 255  # the extremes occur: scaling must map them into [0, 1]
    x.reshape(n, -1)[0, 1] = 0
    return x


def write_mnist(directory: Path, *, gz: bool, seed: int = 0, n_train: int = 12, n_test: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": images_u8(rng, n_train, (28, 28)),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8)[rng.permutation(n_train)],
        "t10k-images-idx3-ubyte": images_u8(rng, n_test, (28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return arrays


def write_cifar(root: Path, *, n_per_batch: int = 4, protocol: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = images_u8(rng, n_per_batch, (3072,))
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        (d / f"data_batch_{i}").write_bytes(
            pickle.dumps({b"batch_label": b"training batch", b"labels": y, b"data": x, b"filenames": [b"a.png"] * n_per_batch}, protocol=protocol)
        )
        xs.append(x)
        ys.append(y)
    x_te = images_u8(rng, 3, (3072,))
    y_te = [9, 0, 5]
    (d / "test_batch").write_bytes(pickle.dumps({b"labels": y_te, b"data": x_te}, protocol=protocol))
    return np.concatenate(xs), np.concatenate(ys), x_te, np.array(y_te)


def write_svhn(root: Path, n_train: int = 6, n_test: int = 4) -> dict:
    import scipy.io

    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[0, 0, 0, 0], x[0, 0, 1, 0] = 255, 0
        y = np.array([(i % 10) + 1 for i in range(n)], dtype=np.uint8).reshape(n, 1)  # 1..10, 10 = digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


def check_dataset(ds: Dataset, n_train: int, n_test: int, dim: int) -> None:
    """Shapes, dtypes, one-hot targets matching the labels, and Assumption 4.1(ii)."""
    assert ds.x_train.shape == (n_train, dim) and ds.x_test.shape == (n_test, dim)
    assert ds.num_classes == 10 and ds.input_dim == dim
    for x, y, lab in ((ds.x_train, ds.y_train, ds.labels_train), (ds.x_test, ds.y_test, ds.labels_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.float32 and lab.dtype == torch.int64
        assert y.shape == (x.shape[0], 10)
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
        assert torch.equal(y.sum(1), torch.ones(x.shape[0]))
        assert torch.equal(y.argmax(1), lab)
        assert x.abs().max() <= 1 and y.abs().max() <= 1  # Flynn, Assumption 4.1(ii)


# ------------------------------------------------------------------------------------------
# digits (bundled with scikit-learn)
# ------------------------------------------------------------------------------------------


def test_digits_shapes_scaling_one_hot_and_split():
    ds = digits()
    assert ds.name == "digits"
    check_dataset(ds, 1437, 360, 64)
    assert ds.x_train.min() == 0 and ds.x_train.max() == 1  # counts 0..16 divided by 16
    assert torch.equal(ds.x_train * 16, torch.round(ds.x_train * 16))
    # stratified: every class in both splits
    assert set(ds.labels_train.tolist()) == set(range(10)) == set(ds.labels_test.tolist())
    from sklearn.datasets import load_digits

    bunch = load_digits()
    all_rows = torch.from_numpy(bunch.data / 16).float()
    both = torch.cat([ds.x_train, ds.x_test])
    assert both.shape == all_rows.shape  # a partition of the 1,797 images
    assert torch.equal(torch.sort(both.sum(1)).values, torch.sort(all_rows.sum(1)).values)


def test_digits_deterministic_by_seed_and_options():
    a, b, c = digits(seed=3), digits(seed=3), digits(seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.labels_test, b.labels_test)
    assert not torch.equal(a.x_train, c.x_train)
    img = digits(flatten=False, dtype=torch.float64, test_fraction=0.5, limit=50)
    assert img.x_train.shape == (50, 1, 8, 8) and img.x_test.shape == (50, 1, 8, 8)
    assert img.x_train.dtype == img.y_train.dtype == torch.float64
    assert torch.equal(load_dataset("digits", seed=3).x_test, a.x_test)
    assert load_dataset("DIGITS", limit=10).x_train.shape == (10, 64)


# ------------------------------------------------------------------------------------------
# MNIST-1D (the mnist1d package's local generator)
# ------------------------------------------------------------------------------------------


def test_mnist1d_generated_locally_deterministic_and_scaled():
    pytest.importorskip("mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    a = data.mnist1d(num_samples=100, seed=5)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before  # restored
    check_dataset(a, 80, 20, 40)
    assert a.x_train.min() < 0 and max(a.x_train.abs().max(), a.x_test.abs().max()) == 1  # [-1, 1], max attained
    b, c = data.mnist1d(num_samples=100, seed=5), data.mnist1d(num_samples=100, seed=6)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.labels_test, b.labels_test)
    assert not torch.equal(a.x_train, c.x_train)
    # it is the package's generator, divided by the largest |x|
    args = get_dataset_args()
    args.num_samples, args.seed = 100, 5
    ref = make_dataset(args)
    scale = max(np.abs(ref["x"]).max(), np.abs(ref["x_test"]).max())
    assert torch.allclose(a.x_train, torch.from_numpy(ref["x"] / scale).float())
    assert torch.equal(a.labels_train, torch.from_numpy(ref["y"]).long())
    img = data.mnist1d(num_samples=100, seed=5, flatten=False, test_fraction=0.5, limit=20)
    assert img.x_train.shape == (20, 1, 40) and img.x_test.shape == (20, 1, 40)


def test_load_dataset_routes_generated_sets(monkeypatch):
    seen = {}
    monkeypatch.setattr(data, "mnist1d", lambda **kw: seen.update(kw) or "ok")
    assert load_dataset("MNIST-1D", seed=7, test_fraction=0.25, limit=3) == "ok"
    assert seen == dict(flatten=True, dtype=torch.float32, limit=3, seed=7, test_fraction=0.25)


# ------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_torchvision_layout(tmp_path, gz):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    ds = mnist(tmp_path)
    assert ds.name == "mnist"
    check_dataset(ds, 12, 7, 784)
    expect = torch.from_numpy(arrays["train-images-idx3-ubyte"].reshape(12, 784)).float() / 255
    assert torch.equal(ds.x_train, expect)
    assert ds.x_train.max() == 1 and ds.x_train.min() == 0
    assert ds.labels_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.labels_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    img = mnist(tmp_path, flatten=False, limit=5)
    assert img.x_train.shape == (5, 1, 28, 28) and img.x_test.shape == (5, 1, 28, 28)
    assert torch.equal(img.x_test[3, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"][3]).float() / 255)
    # by name and by directory (auto-detected)
    assert torch.equal(load_dataset("mnist", root=tmp_path).x_test, ds.x_test)
    assert load_dataset(str(tmp_path)).name == "mnist"


def test_fashion_mnist_and_files_directly_in_root(tmp_path):
    arrays = write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True, seed=4)
    ds = load_dataset("fashion-mnist", root=tmp_path)
    assert ds.name == "fashion-mnist"
    assert ds.labels_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert load_dataset(tmp_path).name == "fashion-mnist"
    with pytest.raises(DatasetNotFoundError):
        mnist(tmp_path)  # MNIST is not there
    flat = tmp_path / "plain"
    arrays = write_mnist(flat, gz=False, seed=5)
    ds = mnist(flat)
    assert ds.labels_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert load_dataset(flat).name == "mnist"
    fashion_dir = tmp_path / "fashion_files"
    write_mnist(fashion_dir, gz=False)
    assert load_dataset(fashion_dir).name == "fashion-mnist"  # bare files: the path decides


def test_read_idx_other_types_and_big_endian(tmp_path):
    arr = np.array([[1, -2, 300], [70000, 5, -6]], dtype=">i4")
    p = tmp_path / "ints.idx"
    p.write_bytes(idx_bytes(arr, 0x0C))
    out = read_idx(p)
    assert out.tolist() == arr.tolist() and out.dtype == np.int32


def test_corrupt_idx_raises_naming_the_file(tmp_path):
    d = tmp_path / "MNIST" / "raw"
    arrays = write_mnist(d, gz=False)
    good = idx_bytes(arrays["train-images-idx3-ubyte"])
    target = d / "train-images-idx3-ubyte"
    cases = {
        "bad magic": b"\x12\x34" + good[2:],
        "bad type": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-10],
        "trailing": good + b"\x00",
        "tiny": b"\x00\x00",
        "header cut": good[:9],
    }
    for why, raw in cases.items():
        target.write_bytes(raw)
        with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte") as err:
            mnist(tmp_path)
        assert isinstance(err.value, ValueError), why
    target.write_bytes(good)
    mnist(tmp_path)  # restored: fine
    (d / "train-labels-idx1-ubyte").unlink()
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(12, np.uint8)))[:-12])
    with pytest.raises(DatasetFormatError, match="train-labels-idx1-ubyte.gz"):
        mnist(tmp_path)  # corrupt gzip stream
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(11, np.uint8))))
    with pytest.raises(DatasetFormatError, match="11 labels for 12 images"):
        mnist(tmp_path)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(12, 10, np.uint8))))
    with pytest.raises(DatasetFormatError, match="labels outside 0..9"):
        mnist(tmp_path)


# ------------------------------------------------------------------------------------------
# CIFAR-10 (python batches) and SVHN (.mat)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar10_python_batches(tmp_path, protocol):
    x_tr, y_tr, x_te, y_te = write_cifar(tmp_path, protocol=protocol)
    ds = cifar10(tmp_path)
    assert ds.name == "cifar10"
    check_dataset(ds, 20, 3, 3072)
    assert torch.equal(ds.x_train, torch.from_numpy(x_tr).float() / 255)
    assert ds.labels_train.tolist() == y_tr.tolist() and ds.labels_test.tolist() == y_te.tolist()
    img = cifar10(tmp_path, flatten=False, limit=6)
    assert img.x_train.shape == (6, 3, 32, 32) and img.x_test.shape == (3, 3, 32, 32)
    # channel-major rows: entry c*1024 + h*32 + w is channel c, row h, column w
    n, c, h, w = 5, 2, 7, 30
    assert img.x_train[n, c, h, w] == float(x_tr[n, c * 1024 + h * 32 + w]) / 255
    assert load_dataset(tmp_path).name == "cifar10"
    assert load_dataset("CIFAR-10", root=tmp_path / "cifar-10-batches-py").x_test.shape == (3, 3072)


def test_cifar10_reads_batches_pickled_by_old_numpy(tmp_path):
    # the distributed batches were pickled by Python 2 / numpy 1 (numpy.core.multiarray._reconstruct)
    x_tr, _, _, _ = write_cifar(tmp_path, protocol=2)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    raw = batch.read_bytes()
    assert b"numpy._core.multiarray" in raw
    batch.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(cifar10(tmp_path, limit=4).x_train, torch.from_numpy(x_tr[:4]).float() / 255)


def test_cifar10_refuses_foreign_pickles_and_bad_batches(tmp_path):
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))  # a non-numpy class
    with pytest.raises(DatasetFormatError, match="data_batch_3"):
        cifar10(tmp_path)
    batch.write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="data_batch_3"):
        cifar10(tmp_path)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match=r"\(N, 3072\)"):
        cifar10(tmp_path)


def test_svhn_mat_label_10_is_digit_0(tmp_path):
    write_svhn(tmp_path)
    ds = svhn(tmp_path)
    assert ds.name == "svhn"
    check_dataset(ds, 6, 4, 3072)
    assert ds.labels_train.tolist() == [1, 2, 3, 4, 5, 6]
    y10 = write_svhn(tmp_path, n_train=12)["train"][1]  # labels 1..10, 1, 2
    ds = svhn(tmp_path)
    assert y10.ravel().tolist()[9] == 10 and ds.labels_train.tolist()[9] == 0
    assert ds.labels_train.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    x = write_svhn(tmp_path)["train"][0]
    img = svhn(tmp_path, flatten=False)
    assert img.x_train.shape == (6, 3, 32, 32)
    n, c, h, w = 4, 1, 9, 22
    assert img.x_train[n, c, h, w] == float(x[h, w, c, n]) / 255  # (32, 32, 3, N) -> (N, 3, 32, 32)
    assert torch.equal(svhn(tmp_path).x_train, img.x_train.reshape(6, -1))  # flattened channel-major
    assert load_dataset("svhn", root=tmp_path, limit=2).x_train.shape == (2, 3072)
    assert load_dataset(tmp_path).name == "svhn"
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetFormatError, match="test_32x32.mat"):
        svhn(tmp_path)


# ------------------------------------------------------------------------------------------
# missing files
# ------------------------------------------------------------------------------------------


def test_missing_mnist_file_names_file_and_all_searched_paths(tmp_path):
    d = tmp_path / "MNIST" / "raw"
    write_mnist(d, gz=True)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", root=tmp_path)
    e = err.value
    assert isinstance(e, DatasetNotFoundError)
    msg = str(e)
    assert "t10k-labels-idx1-ubyte" in msg and e.missing_files == ("t10k-labels-idx1-ubyte",)
    expected = [
        tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte",
        tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz",
        tmp_path / "raw" / "t10k-labels-idx1-ubyte",
        tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz",
        tmp_path / "t10k-labels-idx1-ubyte",
        tmp_path / "t10k-labels-idx1-ubyte.gz",
    ]
    assert list(e.searched_paths) == [str(p) for p in expected]
    for p in expected:
        assert str(p) in msg
    assert "never downloads" in msg
    assert "[Errno" not in msg


def test_missing_cifar_and_svhn_files(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        cifar10(tmp_path)
    assert "data_batch_4" in str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_4") in str(err.value)
    assert str(tmp_path / "data_batch_4") in str(err.value)
    with pytest.raises(DatasetNotFoundError) as err:
        svhn(tmp_path)
    msg = str(err.value)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        for d in (tmp_path, tmp_path / "svhn", tmp_path / "SVHN"):
            assert str(d / name) in msg


def test_files_split_across_directories_and_empty_directory(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").rename(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(DatasetNotFoundError, match="no single directory"):
        mnist(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="no known data set"):
        load_dataset(empty)


def test_load_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="root="):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="official train/test split"):
        load_dataset("mnist", root=tmp_path, test_fraction=0.1)
    with pytest.raises(ValueError, match="dtype"):
        digits(dtype=torch.int64)
    write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    write_svhn(tmp_path)
    with pytest.raises(ValueError, match="several data sets"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------
# the DSGD validation protocol
# ------------------------------------------------------------------------------------------


def test_validation_split_sizes_disjoint_deterministic():
    n = 60
    lab = torch.arange(n) % 10
    ds = Dataset(
        x_train=torch.arange(n, dtype=torch.float32)[:, None] / n,  # row i holds i/n: identifiable
        y_train=data.one_hot(lab),
        x_test=torch.zeros(5, 1),
        y_test=data.one_hot(torch.zeros(5, dtype=torch.int64)),
        labels_train=lab,
        labels_test=torch.zeros(5, dtype=torch.int64),
        name="toy",
        num_classes=10,
    )
    tr, va = validation_split(ds)
    assert tr.x_train.shape[0] == 50 and va.x_train.shape[0] == 10  # 1/6 withheld
    ids_tr = (tr.x_train[:, 0] * n).round().long()
    ids_va = (va.x_train[:, 0] * n).round().long()
    assert set(ids_tr.tolist()).isdisjoint(ids_va.tolist())
    assert sorted(ids_tr.tolist() + ids_va.tolist()) == list(range(n))
    assert torch.equal(ids_tr, torch.sort(ids_tr).values)  # original order kept
    assert torch.equal(tr.labels_train, lab[ids_tr]) and torch.equal(va.y_train, ds.y_train[ids_va])
    assert tr.x_test is ds.x_test and va.labels_test is ds.labels_test
    assert (tr.name, va.name) == ("toy:train", "toy:validation")
    assert torch.equal(validation_split(ds, seed=0)[1].x_train, va.x_train)
    assert not torch.equal(validation_split(ds, seed=1)[1].x_train, va.x_train)
    assert validation_split(ds, fraction=0.5)[1].x_train.shape[0] == 30
    with pytest.raises(ValueError):
        validation_split(ds, fraction=0.0)
    with pytest.raises(ValueError):
        validation_split(ds, fraction=0.001)  # rounds to an empty validation set


def test_validation_split_of_digits():
    tr, va = validation_split(digits())
    assert tr.x_train.shape[0] + va.x_train.shape[0] == 1437
    assert va.x_train.shape[0] == round(1437 / 6)


# ------------------------------------------------------------------------------------------
# Assumption 4.1(ii) for every loader
# ------------------------------------------------------------------------------------------


def test_assumption_4_1_bound_for_every_loader(tmp_path):
    write_mnist(tmp_path / "m" / "MNIST" / "raw", gz=True)
    write_mnist(tmp_path / "f" / "FashionMNIST" / "raw", gz=False)
    write_cifar(tmp_path / "c")
    write_svhn(tmp_path / "s")
    sets = [
        digits(),
        load_dataset("mnist", root=tmp_path / "m"),
        load_dataset("fashion-mnist", root=tmp_path / "f"),
        load_dataset("cifar10", root=tmp_path / "c"),
        load_dataset("svhn", root=tmp_path / "s"),
    ]
    try:
        import mnist1d  # noqa: F401

        sets.append(data.mnist1d(num_samples=100))
    except ImportError:
        pass
    for ds in sets:
        for t in (ds.x_train, ds.x_test, ds.y_train, ds.y_test):
            assert torch.isfinite(t).all() and t.abs().max() <= 1, ds.name
        assert ds.x_train.abs().max() == 1, ds.name  # scaled to the bound, not below it
