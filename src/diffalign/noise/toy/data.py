"""Toy datasets for the one-step generators (spec N: Toy branch, seed 001 MNIST/CIFAR sections).

Three datasets, all returned as float images in [-1, 1] with integer class labels:

- ``digits``  scikit-learn's bundled 8x8 handwritten digits (1,797 images, ships with
  scikit-learn, no download). Split: a fixed, seeded, stratified split, 1,497 train / 300 test
  (30 per class; see `digits_split_indices`).
- ``mnist``   the official IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, optionally ``.gz``) from a local
  folder (also looked up in ``<dir>/MNIST/raw``). Split: the official 60,000 / 10,000.
- ``cifar10`` the official python batches (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``) from a local folder. Split: the official 50,000 / 10,000. The batches are
  pickles; they are read with a restricted unpickler that only rebuilds numpy arrays and plain
  containers, so a tampered file cannot run code.

Bad input (missing folder or file, bad magic number, truncated file, wrong image size) is a
one-line ``DiffalignError``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffalign.engine.errors import DiffalignError

DATASETS = ("digits", "mnist", "cifar10")
SPLITS = ("train", "test")
DIGITS_TEST_SIZE = 300
DIGITS_SPLIT_SEED = 0

# (channels, height, width) every dataset must have
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@dataclass
class ToyData:
    """One split of a toy dataset: ``images`` [N, C, H, W] float32 in [-1, 1], ``labels`` [N]."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int = 10

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices) -> ToyData:
        """The items at `indices` (a list or tensor of positions), same name and split."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ToyData(self.name, self.split, self.images[idx], self.labels[idx], self.num_classes)


def load_dataset(
    name: str = "digits", split: str = "train", data_dir: str | None = None
) -> ToyData:
    """Load one split ('train' or 'test') of a toy dataset as a `ToyData`."""
    if name not in DATASETS:
        raise DiffalignError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if split not in SPLITS:
        raise DiffalignError(f"unknown split '{split}' (choose 'train' or 'test')")
    if name == "digits":
        images, labels = _load_digits(split)
    else:
        if not data_dir:
            raise DiffalignError(
                f"dataset '{name}' is read from local files: pass --data-dir "
                f"({'the folder with the MNIST IDX files' if name == 'mnist' else 'the folder with cifar-10-batches-py/'})"
            )
        root = Path(data_dir)
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "folder not found"
            raise DiffalignError(f"--data-dir {root}: {what}")
        if name == "mnist":
            images, labels = _load_mnist(root, split)
        else:
            images, labels = _load_cifar10(root, split)
    expected = IMAGE_SHAPES[name]
    if tuple(images.shape[1:]) != expected:
        raise DiffalignError(
            f"{name}: wrong image size {tuple(images.shape[1:])}, expected {expected}"
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    return ToyData(name, split, x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


# ----------------------------------------------------------------------------- digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (uint8-valued float [1797, 8, 8] 0..16, labels).

    Read straight from the csv that ships inside scikit-learn (what `load_digits` parses), which
    avoids importing scikit-learn's estimator machinery (seconds of start-up time); falls back to
    `sklearn.datasets.load_digits` if the file is not where scikit-learn keeps it.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DiffalignError("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    for base in spec.submodule_search_locations or []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """The fixed digits split: per class, a seeded permutation; its first 30 items are test.

    300 test items (30 of each digit), the remaining 1,497 are train; both sorted.
    """
    _, labels = _digits_arrays()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    per_class = DIGITS_TEST_SIZE // 10
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test.extend(rng.permutation(idx)[:per_class].tolist())
    test_idx = np.sort(np.asarray(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits_arrays()
    images = images / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    train_idx, test_idx = digits_split_indices()
    sel = train_idx if split == "train" else test_idx
    return images[sel][:, None], labels[sel]


# ----------------------------------------------------------------------------- MNIST (IDX)

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(root: Path, stem: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (folder / name).is_file():
                return folder / name
    raise DiffalignError(f"mnist: {stem}[.gz] not found in {root}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: corrupt deflate data in a .gz
        raise DiffalignError(f"{path}: cannot read ({e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (MNIST's format): magic 0x0000TTNN, NN big-endian uint32 dims, data.

    Only unsigned bytes (type code 0x08) are accepted, which is what MNIST uses.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DiffalignError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DiffalignError(
            f"{path}: not an MNIST IDX file (magic 0x{int.from_bytes(raw[:4], 'big'):08x}, "
            "expected 0x00000801 labels or 0x00000803 images)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DiffalignError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DiffalignError(
            f"{path}: size {len(raw)} bytes does not match its header {dims} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lbl_stem = _MNIST_FILES[split]
    img_path, lbl_path = _find_file(root, img_stem), _find_file(root, lbl_stem)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DiffalignError(f"{img_path}: expected an IDX image file (3 dimensions)")
    if labels.ndim != 1:
        raise DiffalignError(f"{lbl_path}: expected an IDX label file (1 dimension)")
    if images.shape[1:] != (28, 28):
        raise DiffalignError(
            f"{img_path}: wrong image size {images.shape[1]}x{images.shape[2]}, expected 28x28"
        )
    if len(images) != len(labels):
        raise DiffalignError(
            f"mnist {split}: {len(images)} images but {len(labels)} labels ({img_path.name})"
        )
    if labels.size and labels.max() > 9:
        raise DiffalignError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    x = images.astype(np.float32) / 255.0 * 2.0 - 1.0
    return x[:, None], labels.astype(np.int64)


# ----------------------------------------------------------------------------- CIFAR-10


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer
    return _frombuffer


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
            ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
            # Python 3 pickles of bytes at protocol <= 2 go through codecs.encode(str, 'latin1')
            ("_codecs", "encode"): lambda: _latin1_encode,
            ("codecs", "encode"): lambda: _latin1_encode,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]()
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}'")


def _latin1_encode(text, encoding="latin1", errors="strict"):
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def safe_unpickle(data: bytes, where: str = "pickle") -> object:
    """Unpickle numpy arrays / dicts / lists only (CIFAR's python batches); else DiffalignError."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DiffalignError(f"{where}: unsafe or corrupt pickle ({e})") from None
    except Exception as e:  # truncated / malformed stream
        raise DiffalignError(f"{where}: corrupt pickle ({type(e).__name__}: {e})") from None


def _key(d: dict, name: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    return None


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"cifar10: {path} not found")
    obj = safe_unpickle(_read_bytes(path), str(path))
    if not isinstance(obj, dict):
        raise DiffalignError(f"{path}: expected a dict with 'data' and 'labels'")
    data, labels = _key(obj, "data"), _key(obj, "labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DiffalignError(f"{path}: missing 'data' array or 'labels' list")
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.dtype != np.uint8:
        raise DiffalignError(f"{path}: 'data' must be a uint8 [N, 3072] array, got {data.shape}")
    if data.shape[1] != 3 * 32 * 32:
        raise DiffalignError(
            f"{path}: wrong image size: rows have {data.shape[1]} values, expected 3072 (3x32x32)"
        )
    if len(labels) != len(data):
        raise DiffalignError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DiffalignError(f"{path}: labels out of range 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        if (root / "test_batch").is_file() or (root / "data_batch_1").is_file():
            folder = root
        else:
            raise DiffalignError(f"cifar10: {root}/cifar-10-batches-py/ not found")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0 * 2.0 - 1.0
    return images, np.concatenate([p[1] for p in parts])
