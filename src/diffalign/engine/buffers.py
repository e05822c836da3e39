"""Recycled CPU batch buffers: a fresh tensor's memory, reused only once nobody holds it.

A training batch of DINOv2 tokens is 64 MiB (128 x 256 x 1024 fp16). Above glibc's mmap threshold
(at most 32 MiB) every fresh tensor of that size is new memory: the kernel maps and zeroes it page
by page on first write, which costs more than reading the records (BENCHMARKS.md, "R. U-REPA
data"). `batch_empty(shape, dtype)` hands out a tensor whose memory may have held an earlier batch.

Safety rests on Python reference counts, not on a promise by the consumer. Each pooled buffer is a
flat uint8 numpy array that only the pool references; a batch is `torch.from_numpy(array)` viewed
as the wanted dtype and shape. torch's `from_numpy` storage holds a reference to the array until
the storage is freed, and every tensor, view, slice, `.numpy()` array, storage object or autograd
graph that uses that memory keeps the storage alive. So while anything can still read the batch,
the array's reference count is above its idle count and the pool will not hand it out again.
Pickling a batch to another process (`ForkingPickler`, as DataLoader workers and
`torch.multiprocessing` queues do) calls `storage._share_fd_cpu_()`, which moves the data into new
shared memory and frees the old storage, releasing the array: the buffer is then free and the
shared copy is untouched by later reuse. A host-to-device `.to("cuda", non_blocking=True)` of this
pageable memory returns once CUDA has staged the source.

Bounded: at most `per_size` buffers per byte size and `max_bytes` in all; when every buffer of a
size is busy (or the budget is spent on busy buffers) the caller gets a plain fresh tensor, never
a busy one. Thread-safe. Inside a DataLoader worker `batch_empty` allocates straight in shared
memory instead (as torch's `default_collate` does there), since the batch will cross to the main
process anyway and the worker cannot see when the main process lets go of it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info


class _Slot:
    """One pooled buffer; `arr` is referenced only here and by the storages made from it."""

    __slots__ = ("arr", "idle_refs")

    def __init__(self, nbytes: int) -> None:
        self.arr = np.empty(nbytes, dtype=np.uint8)
        self.idle_refs = 0


def _refs(slot: _Slot) -> int:
    return sys.getrefcount(slot.arr)


def _view(arr: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(arr).view(dtype).view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class BufferPool:
    """Hands out CPU tensors whose memory is recycled once no reference to it remains.

    `per_size`: buffers kept per byte size (a loop that holds the previous batch while reading the
    next needs 2, accelerate's prepared loader, which fetches one batch ahead, 3); `max_bytes`:
    total kept (idle buffers of other sizes are dropped to make room).
    """

    def __init__(self, per_size: int = 4, max_bytes: int = 1 << 30) -> None:
        self.per_size = int(per_size)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._slots: dict[int, list[_Slot]] = {}
        self._last_use: dict[int, int] = {}
        self._clock = 0
        self.reused = 0  # counters: batches served from a recycled buffer,
        self.created = 0  # buffers added to the pool,
        self.unpooled = 0  # and fresh tensors handed out because every buffer was busy
        self.enabled = True  # off if reference counts cannot tell a busy buffer (checked)

    @property
    def pooled_bytes(self) -> int:
        return sum(n * len(slots) for n, slots in self._slots.items())

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of `shape` and `dtype` (maybe recycled memory)."""
        shape = tuple(int(s) for s in shape)
        nbytes = _nbytes(shape, dtype)
        if nbytes == 0 or not self.enabled:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            self._clock += 1
            self._last_use[nbytes] = self._clock
            slots = self._slots.setdefault(nbytes, [])
            for slot in slots:
                if _refs(slot) <= slot.idle_refs:
                    self.reused += 1
                    return _view(slot.arr, shape, dtype)
            if len(slots) < self.per_size and self._make_room(nbytes):
                slot = _Slot(nbytes)
                slot.idle_refs = _refs(slot)
                out = _view(slot.arr, shape, dtype)
                if _refs(slot) <= slot.idle_refs:  # cannot see the tensor's reference: stop
                    self.enabled = False
                    self._slots.clear()
                    return out
                slots.append(slot)
                self.created += 1
                return out
            self.unpooled += 1
        return torch.empty(shape, dtype=dtype)

    def _make_room(self, nbytes: int) -> bool:
        """Drop idle buffers of the least recently asked sizes until `nbytes` more fit."""
        if nbytes > self.max_bytes:
            return False
        total = self.pooled_bytes
        for size in sorted(self._slots, key=lambda s: self._last_use.get(s, 0)):
            if total + nbytes <= self.max_bytes:
                break
            if size == nbytes:
                continue
            keep = [s for s in self._slots[size] if _refs(s) > s.idle_refs]
            total -= size * (len(self._slots[size]) - len(keep))
            self._slots[size] = keep
        return total + nbytes <= self.max_bytes

    def clear(self) -> None:
        """Forget every buffer (memory still held by live batches is freed with them)."""
        with self._lock:
            self._slots.clear()
            self._last_use.clear()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a fork may have copied the lock held by another thread


BATCH_POOL = BufferPool()
os.register_at_fork(after_in_child=BATCH_POOL._after_fork)


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor allocated directly in shared memory (no copy when it is sent to
    another process), as torch's `default_collate` builds batches inside DataLoader workers."""
    shape = tuple(int(s) for s in shape)
    nbytes = _nbytes(shape, dtype)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def batch_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The buffer for one batch: shared memory in a DataLoader worker, else from `BATCH_POOL`."""
    if get_worker_info() is not None:
        return shared_empty(shape, dtype)
    return BATCH_POOL.empty(shape, dtype)
