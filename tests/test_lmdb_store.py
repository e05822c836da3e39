"""engine.lmdb_store: fp16 records, metadata, lazy per-process opening, resume checks, errors."""

from __future__ import annotations

import pickle

import lmdb
import numpy as np
import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.lmdb_store import META_KEY, TensorLMDB, TensorLMDBWriter


def _write(path, n=5, shape=(2, 3), **kw):
    torch.manual_seed(0)
    data = {f"s{i}": torch.randn(shape) for i in range(n)}
    with TensorLMDBWriter(path, shape, meta={"model": "x"}, **kw) as w:
        for k, v in data.items():
            w.put(k, v)
    return data


def test_roundtrip_meta_and_zero_copy_fp16(tmp_path):
    data = _write(tmp_path / "db", commit_every=2)
    db = TensorLMDB(tmp_path / "db")
    assert db._env is None  # lazy: nothing opened before the first access
    assert len(db) == 5 and "s3" in db and "nope" not in db
    assert db.shape == (2, 3) and db.dtype == torch.float16
    assert db.meta["format"] == "diffalign-lmdb-1" and db.meta["model"] == "x"
    assert db.keys() == sorted(data)
    for k, v in data.items():
        assert torch.equal(db.get(k), v.half())
    batch = db.get_many(["s4", "s0", "s4"])
    assert torch.equal(batch, torch.stack([data["s4"], data["s0"], data["s4"]]).half())


def test_seed_layout_raw_values_read_with_a_given_shape(tmp_path):
    # the seed's caches: raw little-endian fp16 bytes, no __meta__ record
    env = lmdb.open(str(tmp_path / "seed"), map_size=1 << 20)
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    with env.begin(write=True) as txn:
        txn.put(b"n01440764_10026_mid", x.tobytes())
    env.close()
    with pytest.raises(DiffalignError, match="no __meta__ record"):
        TensorLMDB(tmp_path / "seed").get("n01440764_10026_mid")
    db = TensorLMDB(tmp_path / "seed", shape=(3, 4))
    assert torch.equal(db.get("n01440764_10026_mid"), torch.from_numpy(x))
    assert len(db) == 1


def test_missing_key_corrupt_record_and_wrong_shape_are_one_line_errors(tmp_path):
    _write(tmp_path / "db")
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 28)
    with env.begin(write=True) as txn:
        txn.put(b"s1", b"\x00" * 5)
    env.close()
    db = TensorLMDB(tmp_path / "db")
    with pytest.raises(DiffalignError, match="key 'zz' not found in LMDB store .*db"):
        db.get("zz")
    with pytest.raises(DiffalignError, match="corrupt record 's1'"):
        db.get("s1")
    with pytest.raises(DiffalignError, match="corrupt record 's1'"):
        db.get_many(["s0", "s1"])
    with pytest.raises(DiffalignError, match="not found"):
        db.get_many(["s0", "zz"])
    assert not db.is_valid("s1") and db.is_valid("s0")
    with pytest.raises(DiffalignError, match=r"shape \[2, 3\], not \[4\]"):
        TensorLMDB(tmp_path / "db", shape=(4,)).get("s0")
    with pytest.raises(DiffalignError, match="LMDB store not found"):
        TensorLMDB(tmp_path / "none")


def test_resume_redoes_corrupt_records_and_refuses_other_shapes(tmp_path):
    _write(tmp_path / "db")
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 28)
    with env.begin(write=True) as txn:
        txn.put(b"s1", b"\x00" * 5)
    env.close()
    with TensorLMDBWriter(tmp_path / "db", (2, 3)) as w:
        assert w.has("s0") and not w.has("s1") and not w.has("s9")
        assert w.valid_keys() == {"s0", "s2", "s3", "s4"}
        w.put("s1", torch.ones(2, 3))
        assert w.has("s1")  # queued counts
        with pytest.raises(DiffalignError, match=r"shape \[3\]"):
            w.put("s5", torch.ones(3))
    db = TensorLMDB(tmp_path / "db")
    assert torch.equal(db.get("s1"), torch.ones(2, 3, dtype=torch.float16))
    assert db.meta["model"] == "x"  # metadata kept on resume
    with pytest.raises(DiffalignError, match="holds float16 records of shape"):
        with TensorLMDBWriter(tmp_path / "db", (3, 3)):
            pass


def test_map_grows_when_full(tmp_path):
    shape = (64, 1024)  # 128 KiB a record; 40 records > the 1 MiB starting map
    with TensorLMDBWriter(tmp_path / "db", shape, map_size=1 << 20, commit_every=16) as w:
        for i in range(40):
            w.put(f"k{i}", torch.full(shape, float(i)))
    assert w.map_size > 1 << 20
    db = TensorLMDB(tmp_path / "db")
    assert len(db) == 40 and float(db.get("k39")[0, 0]) == 39.0


def test_records_put_before_an_error_are_kept(tmp_path):
    with pytest.raises(RuntimeError):
        with TensorLMDBWriter(tmp_path / "db", (2,), commit_every=100) as w:
            w.put("a", torch.ones(2))
            raise RuntimeError("killed")
    assert TensorLMDB(tmp_path / "db").is_valid("a")


def _read_in_child(db):
    return db.get("s2").float().sum().item()


def test_reader_reopens_in_forked_and_spawned_workers(tmp_path):
    import multiprocessing as mp

    _write(tmp_path / "db")
    db = TensorLMDB(tmp_path / "db")
    expected = db.get("s2").float().sum().item()  # opened in the parent before forking
    clone = pickle.loads(pickle.dumps(db))
    assert clone._env is None  # an open environment never travels into a worker
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(_read_in_child, (db,)) == expected
    # a second reader and a writer of the same store in one process share / close the handle
    other = TensorLMDB(tmp_path / "db")
    assert torch.equal(other.get("s2"), db.get("s2"))
    with TensorLMDBWriter(tmp_path / "db", (2, 3)) as w:
        w.put("s9", torch.zeros(2, 3))
    assert "s9" in db and len(other) == 6


def test_meta_key_is_reserved(tmp_path):
    with TensorLMDBWriter(tmp_path / "db", (2,)) as w:
        with pytest.raises(DiffalignError, match="reserved"):
            w.put(META_KEY, torch.ones(2))


def test_reader_opened_first_in_a_forked_worker(tmp_path):
    import multiprocessing as mp

    _write(tmp_path / "db")
    db = TensorLMDB(tmp_path / "db")  # never accessed in the parent (the seed's lazy pattern)
    with mp.get_context("fork").Pool(1) as pool:
        value = pool.apply(_read_in_child, (db,))
    assert value == db.get("s2").float().sum().item()
