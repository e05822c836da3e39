"""engine.buffers: recycled batch buffers behind `TensorLMDB.get_many` and `RepaDataset`.

A batch's memory is reused only once nothing references it (tensor, view, slice, `.numpy()`,
storage), is reused then (same data pointer), stays bounded, and moves to shared memory when
pickled to another process; inside DataLoader workers batches are shared memory from the start.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's pickling of tensors)
from torch.utils.data import DataLoader, Dataset

from diffalign.engine.buffers import BATCH_POOL, BufferPool, batch_empty, shared_empty
from diffalign.engine.lmdb_store import TensorLMDB, TensorLMDBWriter

SHAPE = (3, 4, 5)


@pytest.fixture()
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {f"k{i:02d}": torch.randn(SHAPE, generator=g).half() for i in range(12)}
    with TensorLMDBWriter(tmp_path / "db", SHAPE) as w:
        for k, v in data.items():
            w.put(k, v)
    BATCH_POOL.clear()
    yield TensorLMDB(tmp_path / "db"), data
    BATCH_POOL.clear()


def _bytes(x) -> bytes:
    if isinstance(x, torch.UntypedStorage):
        x = torch.empty(0, dtype=torch.uint8).set_(x)
    if isinstance(x, torch.Tensor):
        x = x.contiguous().numpy()
    return bytes(x) if isinstance(x, memoryview) else np.asarray(x).tobytes()


def _expected(data, keys):
    return torch.stack([data[k] for k in keys])


A = ["k00", "k01", "k02", "k03"]
B = ["k04", "k05", "k06", "k07"]
C = ["k08", "k09", "k10", "k11"]


def test_a_released_batch_is_reused_and_a_held_one_never_overwritten(store):
    db, data = store
    a = db.get_many(A)
    ptr = a.data_ptr()
    b = db.get_many(B)  # `a` is held: another buffer
    assert b.data_ptr() != ptr
    assert torch.equal(a, _expected(data, A)) and torch.equal(b, _expected(data, B))
    del a
    c = db.get_many(C)  # `a` released: its memory is recycled
    assert c.data_ptr() == ptr and torch.equal(c, _expected(data, C))
    assert torch.equal(b, _expected(data, B))


@pytest.mark.parametrize(
    "keep",
    [
        lambda t: t[1:],  # a slice (a view of the same storage)
        lambda t: t.view(-1),
        lambda t: t.view(torch.int16),  # a dtype view
        lambda t: t.numpy(),
        lambda t: t[2].numpy()[0],  # a numpy view of a slice
        lambda t: t.untyped_storage(),
        lambda t: memoryview(t.numpy()),
    ],
    ids=["slice", "flat", "dtype", "numpy", "numpy-slice", "storage", "memoryview"],
)
def test_anything_derived_from_a_batch_keeps_its_memory_busy(store, keep):
    db, data = store
    a = db.get_many(A)
    ptr = a.data_ptr()
    held = keep(a)
    before = _bytes(held)
    del a
    for keys in (B, C, B):  # later batches must not land in the held memory
        assert db.get_many(keys).data_ptr() != ptr
    assert _bytes(held) == before
    del held
    assert db.get_many(C).data_ptr() == ptr  # released: recycled again


def test_the_held_batch_pattern_of_a_loop_uses_two_buffers(store):
    db, data = store
    batch, ptrs = None, set()
    for keys in [A, B, C, A, B, C]:
        new = db.get_many(keys)  # read while the previous batch is held (`for batch in loader`)
        assert batch is None or new.data_ptr() != batch.data_ptr()
        batch = new
        assert torch.equal(batch, _expected(data, keys))
        ptrs.add(batch.data_ptr())
    assert len(ptrs) == 2


def test_pool_bound_per_size_and_total_bytes():
    pool = BufferPool(per_size=2, max_bytes=900)
    held = [pool.empty((10, 10), torch.float16) for _ in range(3)]  # 200 bytes each
    assert pool.created == 2 and pool.unpooled == 1 and pool.pooled_bytes == 400
    assert len({t.data_ptr() for t in held}) == 3
    ptrs = {t.data_ptr() for t in held[:2]}
    del held
    again = [pool.empty((100,), torch.float16) for _ in range(2)]  # same bytes, other shape
    assert {t.data_ptr() for t in again} == ptrs and pool.reused == 2
    del again
    big = pool.empty((300,), torch.float16)  # 600 bytes: the two idle 200s make room
    assert pool.created == 3 and pool.pooled_bytes == 600
    assert pool.empty((300,), torch.float16).data_ptr() != big.data_ptr()  # held: unpooled
    assert pool.unpooled == 2 and pool.pooled_bytes == 600
    assert pool.empty((2000,), torch.float16).shape == (2000,) and pool.pooled_bytes == 600
    small = pool.empty((100,), torch.float16)  # 600 + 200 fit
    assert pool.pooled_bytes == 800 and small.dtype == torch.float16
    del big
    bf = pool.empty((10, 30), torch.bfloat16)  # recycles the idle 600-byte buffer
    assert bf.dtype == torch.bfloat16 and bf.shape == (10, 30) and pool.reused == 3


def test_pickling_a_batch_moves_it_to_shared_memory_and_frees_the_buffer():
    """What a DataLoader worker or a torch.multiprocessing queue does to a tensor it sends:
    `storage._share_fd_cpu_()` copies it into new shared memory and drops the pooled buffer."""
    pool = BufferPool(per_size=1)
    t = pool.empty((64,), torch.float32)
    t.copy_(torch.arange(64.0))
    ptr = t.data_ptr()
    ForkingPickler(io.BytesIO()).dump(t)
    assert t.is_shared() and t.data_ptr() != ptr
    u = pool.empty((64,), torch.float32)  # the pooled buffer is free again
    assert u.data_ptr() == ptr and pool.reused == 1
    u.fill_(-1.0)
    assert torch.equal(t, torch.arange(64.0))  # the shared copy is untouched


def test_shared_empty_and_the_main_process_path():
    t = shared_empty((2, 3), torch.float16)
    assert t.is_shared() and t.shape == (2, 3) and t.is_contiguous()
    assert not batch_empty((2, 3), torch.float16).is_shared()  # not in a worker: the pool


class _Batches(Dataset):
    def __init__(self, db, keys):
        self.db, self.keys = db, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.db.get(self.keys[i])

    def __getitems__(self, indices):
        batch = self.db.get_many([self.keys[i] for i in indices])
        return batch, batch.is_shared()  # made in shared memory (before pickling shares it)?


@pytest.mark.parametrize("workers", [0, 1])
def test_get_many_through_a_dataloader(store, workers):
    db, data = store
    keys = sorted(data)
    loader = DataLoader(
        _Batches(db, keys), batch_size=4, shuffle=False, num_workers=workers,
        collate_fn=lambda b: b,
    )  # fmt: skip
    batches = []
    for batch, made_shared in loader:  # all held at once
        # a worker allocates in shared memory (nothing copied on the way to this process)
        assert made_shared == batch.is_shared() == (workers > 0)
        batches.append(batch)
    assert len(batches) == 3
    for n, batch in enumerate(batches):
        assert torch.equal(batch, _expected(data, keys[4 * n : 4 * n + 4]))
    assert len({b.data_ptr() for b in batches}) == 3


def test_threads_never_share_a_live_batch(store):
    db, data = store
    pool_keys = [A, B, C]
    errors = []

    def work(seed):
        held = []
        for step in range(60):
            keys = pool_keys[(seed + step) % 3]
            batch = db.get_many(keys)
            held.append((keys, batch))
            if len(held) > 2:
                held.pop(0)
            for k, b in held:
                if not torch.equal(b, _expected(data, k)):
                    errors.append((seed, step))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert BATCH_POOL.reused > 0


def _data_folder(root, n=10, classes=3):
    from diffalign.engine.io import save_tensors

    labels = [i % classes for i in range(n)]
    ids = [f"n{lab:08d}_{i}" for i, lab in enumerate(labels)]
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "wnid", "label", "split"])
        w.writerows([ids[i], f"n{labels[i]:08d}", labels[i], "train"] for i in range(n))
    g = torch.Generator().manual_seed(1)
    with TensorLMDBWriter(root / "vae_latents.lmdb", (4, 2, 2)) as w:
        for i in ids:
            w.put(i, torch.randn(4, 2, 2, generator=g))
    with TensorLMDBWriter(root / "dino_tokens.lmdb", (4, 8)) as w:
        for i in ids:
            w.put(f"{i}_mid", torch.randn(4, 8, generator=g))
    table = torch.randn(classes + 1, 5, 6, generator=g).half()
    prompts = json.dumps([f"c{c}" for c in range(classes)] + [""])
    save_tensors(root / "clip_embeddings.safetensors", {"embeddings": table}, {"prompts": prompts})


@pytest.mark.parametrize("workers", [0, 1])
def test_repa_dataset_batches_held_by_a_loop_stay_intact(tmp_path, workers):
    from diffalign.repa.data import RepaDataset, collate

    _data_folder(tmp_path)
    BATCH_POOL.clear()

    class Probe(RepaDataset):
        def __getitems__(self, indices):
            out = super().__getitems__(indices)
            names = ("latent", "tokens", "class_embedding")
            out["made_shared"] = [out[k].is_shared() for k in names]
            return out

    ds = Probe(tmp_path, "train", cfg_dropout=0.5, seed=2)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers, collate_fn=collate)
    batches = list(loader)  # every batch held while the next ones are read
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    for b in batches:
        for j, i in enumerate(b["index"].tolist()):
            one = ds[i]
            assert torch.equal(b["latent"][j], one["latent"])
            assert torch.equal(b["tokens"][j], one["tokens"])
            assert torch.equal(b["class_embedding"][j], one["class_embedding"])
            assert bool(b["cfg_dropped"][j]) == one["cfg_dropped"]
        assert b["made_shared"] == [workers > 0] * 3  # in the worker, before pickling
        for name in ("latent", "tokens", "class_embedding"):
            assert b[name].is_shared() == (workers > 0)
    if workers == 0:  # pooled in this process: a released batch's buffers come back
        ptrs = {b["tokens"].data_ptr() for b in batches}
        del b, batches
        again = ds.__getitems__([0, 1, 2, 3])
        assert again["tokens"].data_ptr() in ptrs
    BATCH_POOL.clear()


def test_accelerate_prepared_loader_which_fetches_ahead(store):
    """accelerate's DataLoaderShard reads batch n + 1 before yielding batch n, while the loop
    still holds n - 1: three live batches, none overwritten, and the pool still recycles."""
    from accelerate.data_loader import prepare_data_loader

    db, data = store
    keys = sorted(data)
    plain = DataLoader(_Batches(db, keys * 4), batch_size=4, collate_fn=lambda b: b[0])
    loader = prepare_data_loader(plain, device=torch.device("cpu"), put_on_device=True)
    BATCH_POOL.reused = 0
    prev = None
    for n, batch in enumerate(loader):
        first = 4 * n % len(keys)
        assert torch.equal(batch, _expected(data, keys[first : first + 4]))
        if prev is not None:  # the previous batch is intact too
            assert torch.equal(prev[1], _expected(data, keys[prev[0] : prev[0] + 4]))
        prev = (first, batch)
    assert n == 11 and BATCH_POOL.reused > 0
