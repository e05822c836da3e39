"""Toy datasets: digits split, MNIST IDX and CIFAR-10 python batches in their official formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.noise.toy.data import load_dataset, read_cifar_batch, read_idx, safe_unpickle

# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_split():
    tr = load_dataset("digits", "train")
    te = load_dataset("digits", "test")
    assert tr.images.shape == (1497, 1, 8, 8) and te.images.shape == (300, 1, 8, 8)
    assert tr.images.dtype == torch.float32
    assert float(tr.images.min()) == -1.0 and float(tr.images.max()) == 1.0
    assert torch.equal(te.labels.bincount(), torch.full((10,), 30))
    # deterministic, and train/test are disjoint and cover the 1,797 images
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, te.images) and torch.equal(again.labels, te.labels)
    from sklearn.datasets import load_digits

    d = load_digits()
    everything = torch.from_numpy(d.images.astype(np.float32) / 16 * 2 - 1).flatten(1)
    rows = {tuple(r.tolist()): i for i, r in enumerate(everything)}
    idx_tr = {rows[tuple(r.tolist())] for r in tr.images.flatten(1)}
    idx_te = {rows[tuple(r.tolist())] for r in te.images.flatten(1)}
    assert len(idx_te) == 300 and not (idx_tr & idx_te)
    # a label matches scikit-learn's label of the same image
    i = next(iter(idx_te))
    pos = [rows[tuple(r.tolist())] for r in te.images.flatten(1)].index(i)
    assert int(te.labels[pos]) == int(d.target[i])


def test_unknown_dataset_and_split():
    with pytest.raises(DiffalignError, match="unknown dataset"):
        load_dataset("svhn")
    with pytest.raises(DiffalignError, match="unknown split"):
        load_dataset("digits", "val")


# ----------------------------------------------------------------------------- MNIST IDX


def _idx_bytes(arr: np.ndarray) -> bytes:
    """IDX writer written from the format description: 0, 0, type 0x08, ndim, dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(root, n_train=7, n_test=5, size=28, gz=False, rng=None):
    rng = rng or np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, arr, nd in (("images", imgs, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{nd}-ubyte"
            raw = _idx_bytes(arr)
            if gz:
                with gzip.open(root / (name + ".gz"), "wb") as f:
                    f.write(raw)
            else:
                (root / name).write_bytes(raw)
        data[prefix] = (imgs, labels)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    data = _write_mnist(tmp_path, gz=gz)
    tr = load_dataset("mnist", "train", str(tmp_path))
    te = load_dataset("mnist", "test", str(tmp_path))
    assert tr.images.shape == (7, 1, 28, 28) and te.images.shape == (5, 1, 28, 28)
    imgs, labels = data["train"]
    expect = torch.from_numpy(imgs.astype(np.float32) / 255 * 2 - 1)[:, None]
    assert torch.allclose(tr.images, expect)
    assert tr.labels.tolist() == labels.tolist()


def test_mnist_errors(tmp_path):
    with pytest.raises(DiffalignError, match="pass --data-dir"):
        load_dataset("mnist", "train", None)
    with pytest.raises(DiffalignError, match="folder not found"):
        load_dataset("mnist", "train", str(tmp_path / "nope"))
    with pytest.raises(DiffalignError, match="not found"):
        load_dataset("mnist", "train", str(tmp_path))  # empty folder
    _write_mnist(tmp_path, size=27)
    with pytest.raises(DiffalignError, match="wrong image size 27x27"):
        load_dataset("mnist", "train", str(tmp_path))


def test_idx_bad_magic_and_truncation(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"\x00\x00\x0d\x03" + struct.pack(">III", 1, 2, 2) + bytes(4))
    with pytest.raises(DiffalignError, match="not an MNIST IDX file"):
        read_idx(p)
    p.write_bytes(_idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5])
    with pytest.raises(DiffalignError, match="does not match its header"):
        read_idx(p)


def test_mnist_label_count_mismatch(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DiffalignError, match="7 images but 3 labels"):
        load_dataset("mnist", "train", str(tmp_path))


# ----------------------------------------------------------------------------- CIFAR-10


def _write_cifar(root, n=4, width=3072, protocol=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, width), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        obj = {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"a"] * n}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches(tmp_path, protocol):
    batches = _write_cifar(tmp_path, protocol=protocol)
    tr = load_dataset("cifar10", "train", str(tmp_path))
    te = load_dataset("cifar10", "test", str(tmp_path))
    assert tr.images.shape == (20, 3, 32, 32) and te.images.shape == (4, 3, 32, 32)
    data, labels = batches["test_batch"]
    expect = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255 * 2 - 1)
    assert torch.allclose(te.images, expect)
    assert te.labels.tolist() == labels


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_refused(tmp_path):
    _write_cifar(tmp_path)
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil()}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DiffalignError, match="refusing to load global"):
        load_dataset("cifar10", "test", str(tmp_path))
    with pytest.raises(DiffalignError, match="refusing"):
        safe_unpickle(pickle.dumps(_Evil()))
    # codecs.encode is allowed only as a latin1 bytes constructor
    with pytest.raises(DiffalignError):
        safe_unpickle(pickle.dumps(eval))


def test_cifar_wrong_size_and_missing(tmp_path):
    with pytest.raises(DiffalignError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "train", str(tmp_path))
    _write_cifar(tmp_path, width=3 * 28 * 28)
    with pytest.raises(DiffalignError, match="wrong image size"):
        read_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DiffalignError, match="corrupt"):
        load_dataset("cifar10", "test", str(tmp_path))


def test_cli_missing_data_dir_is_one_line(tmp_path, capsys):
    rc = main(
        [
            "noise", "toy", "train-gan", "--dataset", "mnist", "--data-dir",
            str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("diffalign: error:") and "folder not found" in err
    assert len(err.splitlines()) == 1
