"""Data sets for the DSGD experiments (Flynn, Sec. 5), scaled to satisfy Assumption 4.1(ii).

Two data sets are available with no files at all:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``),
  split into train/test reproducibly by ``seed``;
* ``mnist1d``: MNIST-1D, generated locally by the ``mnist1d`` package's generator
  (``mnist1d.data.make_dataset``; never its downloading ``get_dataset``).

Four are read from files laid out as torchvision stores them (the library never downloads):

* ``mnist`` / ``fashion-mnist``: IDX files ``<root>/MNIST/raw/...`` / ``<root>/FashionMNIST/raw/...``
  (``.gz`` accepted, files directly in ``root`` accepted);
* ``cifar10``: python batches ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``;
* ``svhn``: ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``.

Scaling (see docs/data.md): Flynn's Assumption 4.1(ii) asks ``||x||_inf <= 1`` and
``||z||_inf <= 1`` for every input x and target z, and Sec. 5 uses "a 10 dimensional indicator
vector" as target.  So targets are one-hot in {0, 1}, 8-bit pixels are divided by 255 (digits'
4-bit counts by 16), giving inputs in [0, 1]; MNIST-1D's standardised signals are divided by
their largest absolute value, giving inputs in [-1, 1].

Missing files raise :class:`DatasetNotFoundError` (a ``FileNotFoundError``) naming the file and
every path searched; unreadable or inconsistent files raise :class:`DatasetFormatError`
(a ``ValueError``) naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import random
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "Dataset",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "DATASET_NAMES",
    "load_dataset",
    "digits",
    "mnist1d",
    "mnist",
    "cifar10",
    "svhn",
    "validation_split",
    "read_idx",
    "one_hot",
]

NUM_CLASSES = 10

#: canonical names accepted by :func:`load_dataset`
DATASET_NAMES = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10", "svhn")

_ALIASES = {
    "digits": "digits",
    "mnist1d": "mnist1d",
    "mnist": "mnist",
    "fashionmnist": "fashion-mnist",
    "fashion": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar": "cifar10",
    "svhn": "svhn",
}

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


# --------------------------------------------------------------------------------------------
# errors and the data set container
# --------------------------------------------------------------------------------------------


class DatasetNotFoundError(FileNotFoundError):
    """A data file is missing.  ``missing_files`` names it (them), ``searched_paths`` lists every
    path that was tried; both appear in the message."""

    def __init__(self, message: str, missing_files: Sequence[str] = (), searched_paths: Sequence[str] = ()):
        super().__init__(message)
        self.missing_files = tuple(missing_files)
        self.searched_paths = tuple(searched_paths)

    def __str__(self) -> str:  # OSError's __str__ would print "[Errno None] ..." otherwise
        return self.args[0]


class DatasetFormatError(ValueError):
    """A data file exists but is corrupt, truncated or not in the expected format."""


@dataclass(frozen=True)
class Dataset:
    """A classification data set as tensors.

    ``x_*``: inputs, ``(N, D)`` when flattened, else ``(N, C, H, W)`` (``(N, 1, 40)`` for
    MNIST-1D); ``y_*``: one-hot targets ``(N, num_classes)`` with entries in {0, 1};
    ``labels_*``: int64 class indices ``(N,)``.  Every loader returns
    ``max|x| <= 1`` and ``max|y| <= 1`` (Flynn, Assumption 4.1(ii)).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    labels_train: torch.Tensor
    labels_test: torch.Tensor
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y, lab = (getattr(self, f"{k}_{split}") for k in ("x", "y", "labels"))
            n = x.shape[0]
            if y.shape != (n, self.num_classes) or lab.shape != (n,):
                raise ValueError(
                    f"Dataset {self.name!r} {split}: inconsistent shapes x {tuple(x.shape)}, "
                    f"y {tuple(y.shape)}, labels {tuple(lab.shape)} for {self.num_classes} classes"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {self.name!r}: train inputs {tuple(self.x_train.shape[1:])} and test "
                f"inputs {tuple(self.x_test.shape[1:])} differ in shape"
            )

    @property
    def input_dim(self) -> int:
        """Number of input features per example (784 for MNIST, 3072 for CIFAR-10/SVHN)."""
        return math.prod(self.x_train.shape[1:])


def one_hot(labels: torch.Tensor, num_classes: int = NUM_CLASSES, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Indicator vectors (Flynn Sec. 5): ``(N,)`` int labels -> ``(N, num_classes)`` in {0, 1}."""
    return torch.nn.functional.one_hot(labels.to(torch.int64), num_classes).to(dtype)


# --------------------------------------------------------------------------------------------
# the common entry point
# --------------------------------------------------------------------------------------------


def load_dataset(
    name_or_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    test_fraction: float | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load a data set by name (``"digits"``, ``"mnist1d"``, ``"mnist"``, ``"fashion-mnist"``,
    ``"cifar10"``, ``"svhn"``; case, ``-`` and ``_`` ignored) or from a directory whose layout
    is detected from the files it holds.

    ``root``: directory of the file-based data sets (required for them).  ``seed`` and
    ``test_fraction``: the random train/test split of the generated data sets; ``None`` uses each
    loader's default (digits: seed 0, 20 % test; MNIST-1D: seed 42, 20 % test, as the
    canonical MNIST-1D).  The file-based data sets keep their official split, so a
    ``test_fraction`` for them is an error and ``seed`` has no effect.  ``limit``: keep at most
    this many examples of each split (the first ones).
    """
    key = _canonical(str(name_or_dir))
    if key is None:
        path = Path(name_or_dir)
        if not path.is_dir():
            raise ValueError(
                f"unknown data set {str(name_or_dir)!r}: expected one of {', '.join(DATASET_NAMES)} "
                "or an existing directory holding one of them"
            )
        if root is not None:
            raise ValueError("give either a directory as name_or_dir or root=, not both")
        key, root = _detect(path)

    common = dict(flatten=flatten, dtype=dtype, limit=limit)
    if key in ("digits", "mnist1d"):
        if seed is not None:
            common["seed"] = seed
        if test_fraction is not None:
            common["test_fraction"] = test_fraction
        return digits(**common) if key == "digits" else mnist1d(**common)

    if test_fraction is not None:
        raise ValueError(f"{key} has an official train/test split; test_fraction is not supported for it")
    if root is None:
        raise ValueError(
            f"{key} is read from files: pass root=DIR (the library never downloads; see docs/data.md)"
        )
    if key in ("mnist", "fashion-mnist"):
        return mnist(root, fashion=(key == "fashion-mnist"), **common)
    if key == "cifar10":
        return cifar10(root, **common)
    return svhn(root, **common)


def _canonical(name: str) -> str | None:
    return _ALIASES.get(name.lower().replace("-", "").replace("_", "").replace(" ", ""))


def _detect(path: Path) -> tuple[str, Path]:
    """Which data set does ``path`` hold?  Returns (name, root to pass to its loader)."""
    found: list[str] = []
    if _dir_with_all(path / "MNIST" / "raw", _MNIST_FILES, gz=True):
        found.append("mnist")
    if _dir_with_all(path / "FashionMNIST" / "raw", _MNIST_FILES, gz=True):
        found.append("fashion-mnist")
    if not found and (
        _dir_with_all(path / "raw", _MNIST_FILES, gz=True) or _dir_with_all(path, _MNIST_FILES, gz=True)
    ):
        # bare IDX files: MNIST and Fashion-MNIST share file names, so the directory's name decides
        # (its parent's too for a ".../raw" directory)
        names = [path.resolve().name] + ([path.resolve().parent.name] if path.resolve().name == "raw" else [])
        found.append("fashion-mnist" if any("fashion" in n.lower() for n in names) else "mnist")
    if _dir_with_all(path / _CIFAR_DIR, _CIFAR_FILES) or _dir_with_all(path, _CIFAR_FILES):
        found.append("cifar10")
    if any(_dir_with_all(d, _SVHN_FILES) for d in _svhn_dirs(path)):
        found.append("svhn")
    if len(found) == 1:
        return found[0], path
    if found:
        raise ValueError(
            f"directory {str(path)!r} holds several data sets ({', '.join(found)}); "
            f"choose one with load_dataset(NAME, root={str(path)!r})"
        )
    raise DatasetNotFoundError(
        f"no known data set in directory {str(path)!r}. Looked for the MNIST / Fashion-MNIST IDX files "
        f"({', '.join(_MNIST_FILES)}, optionally .gz) in MNIST/raw, FashionMNIST/raw, raw and the "
        f"directory itself; the CIFAR-10 batches ({', '.join(_CIFAR_FILES)}) in {_CIFAR_DIR} and the "
        f"directory itself; the SVHN files ({', '.join(_SVHN_FILES)}) in the directory, svhn and SVHN. "
        "The library never downloads; see docs/data.md.",
        missing_files=_MNIST_FILES + _CIFAR_FILES + _SVHN_FILES,
        searched_paths=[str(path)],
    )


# --------------------------------------------------------------------------------------------
# generated / bundled data sets
# --------------------------------------------------------------------------------------------


def digits(*, flatten: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
           test_fraction: float = 0.2, limit: int | None = None) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline).  Pixels are counts in 0..16,
    divided by 16 -> [0, 1]; ``(N, 64)`` or ``(N, 1, 8, 8)``.  The split is stratified by class
    and reproducible: ``seed`` fixes it, ``test_fraction`` sizes it."""
    _check_fraction(test_fraction, "test_fraction")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("smoothchain.data.digits needs scikit-learn (pip install scikit-learn)",
                                  name="sklearn") from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.min() < 0 or images.max() > 16:  # pragma: no cover - sklearn's bundled file
        raise DatasetFormatError("scikit-learn digits: pixel values outside 0..16")
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    images = images[:, None] / 16.0  # (N, 1, 8, 8)
    return _build(
        "digits", images[tr], labels[tr], images[te], labels[te], flatten=flatten, dtype=dtype, limit=limit
    )


def mnist1d(*, num_samples: int = 5000, flatten: bool = True, dtype: torch.dtype = torch.float32,
            seed: int = 42, test_fraction: float = 0.2, limit: int | None = None) -> Dataset:
    """MNIST-1D (Greydanus & Kobak), generated locally with the ``mnist1d`` package's generator
    ``mnist1d.data.make_dataset`` and its default arguments (``get_dataset_args``) except
    ``num_samples``, ``seed`` and ``train_split = 1 - test_fraction``.  The defaults (5,000
    samples, seed 42, 4,000/1,000 split) are the canonical MNIST-1D arguments.  Nothing is
    downloaded (the package's ``get_dataset`` is never called), and the global ``random`` /
    ``numpy.random`` states, which the generator reseeds, are restored afterwards.

    The generator returns signals standardised to mean 0 and standard deviation 1 over all
    samples; they are divided by their largest absolute value over all generated samples, so
    inputs lie in [-1, 1] (Assumption 4.1(ii)).  ``(N, 40)`` or ``(N, 1, 40)``.
    ``num_samples`` is rounded down to a multiple of 10 by the generator (equal classes);
    generating is linear in it (use a few hundred for quick tests).
    """
    _check_fraction(test_fraction, "test_fraction")
    if num_samples < 20:
        raise ValueError(f"num_samples must be at least 20 (2 per class), got {num_samples}")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ModuleNotFoundError(
            "smoothchain.data.mnist1d needs the 'mnist1d' package (pip install mnist1d), whose local "
            "generator is used; nothing is downloaded", name="mnist1d"
        ) from exc
    args = get_dataset_args()  # an ObjectView over a fresh dict
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    args.train_split = 1.0 - float(test_fraction)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x_tr, x_te = np.asarray(data["x"], np.float64), np.asarray(data["x_test"], np.float64)
    y_tr, y_te = np.asarray(data["y"], np.int64), np.asarray(data["y_test"], np.int64)
    if len(y_tr) == 0 or len(y_te) == 0:
        raise ValueError(
            f"num_samples={num_samples} with test_fraction={test_fraction} leaves an empty split"
        )
    scale = max(np.abs(x_tr).max(), np.abs(x_te).max())
    if not np.isfinite(scale) or scale <= 0:  # pragma: no cover - generator output is standardised
        raise DatasetFormatError("mnist1d generator returned non-finite or all-zero signals")
    return _build(
        "mnist1d", x_tr[:, None] / scale, y_tr, x_te[:, None] / scale, y_te, flatten=flatten, dtype=dtype, limit=limit
    )


# --------------------------------------------------------------------------------------------
# file-based data sets
# --------------------------------------------------------------------------------------------


def mnist(root: str | os.PathLike, fashion: bool = False, *, flatten: bool = True,
          dtype: torch.dtype = torch.float32, limit: int | None = None, seed: int | None = None) -> Dataset:
    """MNIST (or Fashion-MNIST with ``fashion=True``) from the four IDX files
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte`` (each also as ``.gz``), looked for in ``root/MNIST/raw`` (or
    ``root/FashionMNIST/raw``), ``root/raw`` and ``root``; the first directory holding all four is
    used.  Pixels /255 -> [0, 1]; ``(N, 784)`` or ``(N, 1, 28, 28)``.  ``seed`` is unused
    (official split)."""
    del seed
    folder = "FashionMNIST" if fashion else "MNIST"
    name = "fashion-mnist" if fashion else "mnist"
    label = "Fashion-MNIST" if fashion else "MNIST"
    root = Path(root)
    files = _locate(label, [root / folder / "raw", root / "raw", root], _MNIST_FILES, gz=True)
    x_tr = read_idx(files["train-images-idx3-ubyte"])
    y_tr = read_idx(files["train-labels-idx1-ubyte"])
    x_te = read_idx(files["t10k-images-idx3-ubyte"])
    y_te = read_idx(files["t10k-labels-idx1-ubyte"])
    for images, labels, img_key, lab_key in (
        (x_tr, y_tr, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        (x_te, y_te, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DatasetFormatError(
                f"{files[img_key]}: expected a 3-d uint8 IDX array of images, got {images.ndim}-d {images.dtype}"
            )
        _check_labels(labels, files[lab_key], len(images), lo=0, hi=NUM_CLASSES - 1)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DatasetFormatError(
            f"{label}: train images are {x_tr.shape[1:]} but test images are {x_te.shape[1:]}"
        )
    return _build_u8(name, x_tr[:, None], y_tr, x_te[:, None], y_te, flatten=flatten, dtype=dtype, limit=limit)


def cifar10(root: str | os.PathLike, *, flatten: bool = True, dtype: torch.dtype = torch.float32,
            limit: int | None = None, seed: int | None = None) -> Dataset:
    """CIFAR-10 from the python batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``
    (pickled dicts with ``b"data"``: uint8 ``(N, 3072)`` in channel-major R, G, B order, and
    ``b"labels"``), looked for in ``root/cifar-10-batches-py`` and ``root``.  Only numpy arrays and
    plain containers are unpickled.  Pixels /255 -> [0, 1]; ``(N, 3072)`` (channel-major, the
    files' order) or ``(N, 3, 32, 32)``.  ``seed`` is unused (official split)."""
    del seed
    root = Path(root)
    files = _locate("CIFAR-10", [root / _CIFAR_DIR, root], _CIFAR_FILES)
    train = [_read_cifar_batch(files[f"data_batch_{i}"]) for i in range(1, 6)]
    x_te, y_te = _read_cifar_batch(files["test_batch"])
    x_tr = np.concatenate([b[0] for b in train])
    y_tr = np.concatenate([b[1] for b in train])
    return _build_u8(
        "cifar10", x_tr.reshape(-1, 3, 32, 32), y_tr, x_te.reshape(-1, 3, 32, 32), y_te,
        flatten=flatten, dtype=dtype, limit=limit,
    )


def svhn(root: str | os.PathLike, *, flatten: bool = True, dtype: torch.dtype = torch.float32,
         limit: int | None = None, seed: int | None = None) -> Dataset:
    """SVHN (cropped digits) from ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5, read with
    ``scipy.io.loadmat``: ``X`` uint8 ``(32, 32, 3, N)``, ``y`` ``(N, 1)`` in 1..10 where 10
    means digit 0), looked for in ``root``, ``root/svhn`` and ``root/SVHN``.  ``extra_32x32.mat``
    is not used (Flynn trains on the 73,257 training images).  Label 10 -> 0; pixels /255 ->
    [0, 1]; ``(N, 3072)`` (channel-major, as CIFAR-10) or ``(N, 3, 32, 32)``.  ``seed`` is unused."""
    del seed
    files = _locate("SVHN", _svhn_dirs(Path(root)), _SVHN_FILES)
    x_tr, y_tr = _read_svhn_mat(files["train_32x32.mat"])
    x_te, y_te = _read_svhn_mat(files["test_32x32.mat"])
    return _build_u8("svhn", x_tr, y_tr, x_te, y_te, flatten=flatten, dtype=dtype, limit=limit)


# --------------------------------------------------------------------------------------------
# the DSGD validation protocol
# --------------------------------------------------------------------------------------------


def validation_split(ds: Dataset, fraction: float = 1 / 6, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Withhold ``fraction`` of the training set as a validation set (Flynn, App.: 1/6 withheld
    for tuning step sizes, training on the other 5/6).

    Returns ``(train_part, validation_part)``: two data sets whose training fields hold
    disjoint parts (covering the whole training set, a random partition fixed by ``seed``, each
    part in the original order) and whose test fields are ``ds``'s test set, unchanged.  The
    validation examples are ``validation_part.x_train`` / ``y_train`` / ``labels_train``.
    """
    _check_fraction(fraction, "fraction")
    n = ds.x_train.shape[0]
    n_val = int(round(n * fraction))
    if not 1 <= n_val <= n - 1:
        raise ValueError(f"fraction={fraction} of {n} training examples leaves an empty part")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = torch.from_numpy(np.sort(perm[:n_val]))
    tr_idx = torch.from_numpy(np.sort(perm[n_val:]))

    def part(idx: torch.Tensor, suffix: str) -> Dataset:
        return replace(
            ds,
            x_train=ds.x_train[idx],
            y_train=ds.y_train[idx],
            labels_train=ds.labels_train[idx],
            name=f"{ds.name}:{suffix}",
        )

    return part(tr_idx, "train"), part(val_idx, "validation")


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not (detected from the content).

    Layout: magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then
    the data, big-endian, row-major.  The file must be exactly as long as its header says.
    Raises :class:`DatasetFormatError` naming the file otherwise.
    """
    path = Path(path)
    raw = path.read_bytes()
    compressed = raw[:2] == b"\x1f\x8b"
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetFormatError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetFormatError(
            f"{path}: not an IDX file (bad magic number 0x{magic:08X}; expected 0x0000TTDD with "
            "type TT in 08, 09, 0B, 0C, 0D, 0E and DD >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions declared)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetFormatError(
            f"{path}: IDX size mismatch: header declares shape {dims} of {dtype.name} "
            f"({expected} bytes in all) but the {'decompressed ' if compressed else ''}"
            f"file has {len(raw)} bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (no arbitrary callables)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DatasetFormatError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetFormatError(f"{path}: CIFAR-10 batch lacks b'data' or b'labels' (keys: {sorted(map(str, batch))})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFormatError(
            f"{path}: CIFAR-10 b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    labels = np.asarray(labels)
    _check_labels(labels, path, len(data), lo=0, hi=NUM_CLASSES - 1)
    return data, labels.astype(np.int64)


def _svhn_dirs(root: Path) -> list[Path]:
    return [root, root / "svhn", root / "SVHN"]


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import scipy.io
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("smoothchain.data.svhn needs scipy (pip install scipy)", name="scipy") from exc
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises many types on bad input
        raise DatasetFormatError(
            f"{path}: not a readable MATLAB v5 file ({type(exc).__name__}: {exc})"
        ) from exc
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: SVHN .mat file lacks 'X' or 'y'")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetFormatError(f"{path}: SVHN 'X' must be uint8 of shape (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1)
    _check_labels(y, path, x.shape[3], lo=0, hi=10)
    y = y.astype(np.int64)
    y[y == 10] = 0  # SVHN writes digit 0 as class 10
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))), y  # (N, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_fraction(fraction: float, what: str) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{what} must be in (0, 1), got {fraction}")


def _check_labels(labels: np.ndarray, path: Path, n: int, lo: int, hi: int) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(f"{path}: labels must be a 1-d integer array, got {labels.ndim}-d {labels.dtype}")
    if len(labels) != n:
        raise DatasetFormatError(f"{path}: {len(labels)} labels for {n} images")
    if n and (labels.min() < lo or labels.max() > hi):
        raise DatasetFormatError(f"{path}: labels outside {lo}..{hi} (found {labels.min()}..{labels.max()})")


def _u8_scaled(images: np.ndarray, limit: int | None) -> np.ndarray:
    """The first ``limit`` uint8 images, as float32 in [0, 1] (x / 255)."""
    if limit is not None:
        images = images[:limit]
    return images.astype(np.float32) / np.float32(255.0)


def _build_u8(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, *,
              flatten: bool, dtype: torch.dtype, limit: int | None) -> Dataset:
    """:func:`_build` for the file-based data sets' uint8 images: the first ``limit`` of each
    split, scaled to [0, 1] by :func:`_u8_scaled` (before the conversion to ``dtype``)."""
    return _build(name, _u8_scaled(x_tr, limit), y_tr, _u8_scaled(x_te, limit), y_te,
                  flatten=flatten, dtype=dtype, limit=limit)


def _build(
    name: str,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    *,
    flatten: bool,
    dtype: torch.dtype,
    limit: int | None,
) -> Dataset:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        x_tr, y_tr, x_te, y_te = x_tr[:limit], y_tr[:limit], x_te[:limit], y_te[:limit]

    def inputs(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
        return t.reshape(t.shape[0], -1) if flatten else t

    lab_tr = torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64))
    lab_te = torch.from_numpy(np.ascontiguousarray(y_te, dtype=np.int64))
    return Dataset(
        x_train=inputs(x_tr),
        y_train=one_hot(lab_tr, NUM_CLASSES, dtype),
        x_test=inputs(x_te),
        y_test=one_hot(lab_te, NUM_CLASSES, dtype),
        labels_train=lab_tr,
        labels_test=lab_te,
        name=name,
        num_classes=NUM_CLASSES,
    )


def _dir_with_all(directory: Path, names: Sequence[str], gz: bool = False) -> bool:
    return all(_find_in(directory, n, gz) is not None for n in names)


def _find_in(directory: Path, name: str, gz: bool) -> Path | None:
    for candidate in _candidates(directory, name, gz):
        if candidate.is_file():
            return candidate
    return None


def _candidates(directory: Path, name: str, gz: bool) -> list[Path]:
    return [directory / name, directory / f"{name}.gz"] if gz else [directory / name]


def _locate(label: str, dirs: Sequence[Path], names: Sequence[str], gz: bool = False) -> dict[str, Path]:
    """The files ``names``, all from the first of ``dirs`` that holds every one of them."""
    for directory in dirs:
        found = {n: _find_in(directory, n, gz) for n in names}
        if all(p is not None for p in found.values()):
            return found  # type: ignore[return-value]
    missing = [n for n in names if all(_find_in(d, n, gz) is None for d in dirs)]
    if missing:
        searched = [str(c) for n in missing for d in dirs for c in _candidates(d, n, gz)]
        lines = []
        for n in missing:
            tried = [str(c) for d in dirs for c in _candidates(d, n, gz)]
            lines.append(f"{label} file {n!r} not found; looked for it at:\n    " + "\n    ".join(tried))
        msg = "\n".join(lines)
    else:
        # every file exists somewhere, but no single directory has them all
        missing = list(names)
        searched = [str(c) for d in dirs for n in names for c in _candidates(d, n, gz)]
        where = "; ".join(
            f"{d}: {', '.join(n for n in names if _find_in(d, n, gz) is not None) or 'none'}" for d in dirs
        )
        msg = (
            f"{label}: no single directory holds all of {', '.join(names)}"
            f"{' (or .gz)' if gz else ''}; found {where}"
        )
    raise DatasetNotFoundError(
        msg + "\n(smoothchain never downloads data; see docs/data.md for how to obtain the files)",
        missing_files=missing,
        searched_paths=searched,
    )
