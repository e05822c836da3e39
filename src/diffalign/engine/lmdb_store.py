"""Fixed-shape tensors in LMDB: the latent and teacher-token stores (seed 003 sections 3.2, 3.3, 6.2).

One record = the raw contiguous little-endian bytes of one tensor (fp16 by default: the seed's
`decode_fp16` layout), key = a UTF-8 string (`n01440764_10026`, `n01440764_10026_mid`). Our stores
also hold a `__meta__` record, JSON `{"format": "diffalign-lmdb-1", "dtype": "float16",
"shape": [...], ...}`, so a reader knows the shape without being told.

The seed's own caches have no `__meta__` record; read them by giving the shape and dtype:
`TensorLMDB("dino_tokens_lmdb", shape=(256, 1024))` (fp16 is the default dtype), or
`shape=(4, 64, 64)` for its VAE latents.

Readers open the environment lazily on first access and again in every new process (a forked
DataLoader worker must not reuse its parent's handle), read-only, without locks or readahead, as
the seed's section 6.2 does. Writers commit every N puts and grow the map when it is full.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError

FORMAT = "diffalign-lmdb-1"
META_KEY = b"__meta__"
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_INITIAL_MAP_SIZE = 1 << 28  # 256 MiB; doubled whenever a transaction finds the map full


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise DiffalignError(f"LMDB tensor store: unsupported dtype {dtype} (use {', '.join(_DTYPES)})")


def _key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode("utf-8")


def _record_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _is_lmdb_dir(path: Path) -> bool:
    return (path / "data.mdb").is_file()


@contextlib.contextmanager
def _store_errors(path: Path) -> Iterator[None]:
    """A damaged store (py-lmdb's CorruptedError, ...) as one DiffalignError line."""
    import lmdb

    try:
        yield
    except lmdb.Error as e:
        raise DiffalignError(f"LMDB store {path} is damaged ({type(e).__name__}: {e})") from None


def _check_complete(env, path: Path) -> None:
    """Refuse a `data.mdb` shorter than the pages its meta page names (a partial copy or a
    full disk): LMDB maps the file, and reading a page past its end kills the process with
    SIGBUS instead of raising."""
    need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    have = (path / "data.mdb").stat().st_size
    if have < need:
        env.close()
        raise DiffalignError(
            f"LMDB store {path} is truncated: data.mdb has {have} bytes, its pages need {need} "
            "(an interrupted copy?); copy it again or rebuild it"
        )


_QUIET = False


def _frombuffer(raw, dtype: torch.dtype) -> torch.Tensor:
    """`torch.frombuffer` of immutable bytes (zero-copy). torch warns once per process that the
    buffer is read-only; that warning is expected here, so the first call swallows it."""
    global _QUIET
    if _QUIET:
        return torch.frombuffer(raw, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = torch.frombuffer(raw, dtype=dtype)
    _QUIET = True
    return out


def tensor_to_record(tensor: torch.Tensor, dtype: torch.dtype = torch.float16) -> bytes:
    """The stored bytes of `tensor`: cast to `dtype`, contiguous, native (little-endian) order."""
    t = tensor.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:  # numpy has no bfloat16: move the same bytes as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class TensorLMDB:
    """Read-only store of fixed-shape tensors; `db.get(key)` -> tensor of `db.shape`.

    Opened lazily and re-opened in each process (pid check), so a Dataset holding one can be
    pickled into DataLoader workers. `shape`/`dtype` are needed only for stores without metadata
    (the seed's caches); for ours they must agree with the metadata when given.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float16,
        max_readers: int = 128,
    ):
        self.path = Path(path)
        if not _is_lmdb_dir(self.path):
            raise DiffalignError(f"LMDB store not found: {self.path} (no data.mdb)")
        self._given_shape = tuple(int(s) for s in shape) if shape is not None else None
        self._given_dtype = dtype
        self.max_readers = int(max_readers)
        self._real = os.path.realpath(self.path)
        self._env = None
        self._pid: int | None = None
        self._meta: dict[str, Any] | None = None
        self._shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        self._nbytes = 0

    # -- opening ------------------------------------------------------------------------------
    def _open(self):
        env = _READERS.get((self._real, os.getpid()))
        if env is None:
            import lmdb

            # One handle per store and process (py-lmdb refuses a second one); a handle
            # inherited through fork is never used (nor closed) in the child.
            try:
                env = lmdb.open(
                    str(self.path),
                    readonly=True,
                    lock=False,
                    readahead=False,
                    max_readers=self.max_readers,
                    subdir=True,
                )
            except lmdb.Error as e:
                # In a forked worker whose parent had opened the store, py-lmdb refuses a new
                # handle on the same files; the inherited one is read-only and lock-free (no
                # reader table), so reading through it in the child is safe.
                env = next((v for (p, _), v in _READERS.items() if p == self._real), None)
                if env is None or "already open" not in str(e):
                    raise DiffalignError(f"cannot open LMDB store {self.path}: {e}") from None
            else:
                _check_complete(env, self.path)
            _READERS[(self._real, os.getpid())] = env
        self._env = env
        self._pid = os.getpid()
        if self._meta is None:
            self._load_meta()
        return env

    def _load_meta(self) -> None:
        with _store_errors(self.path), self._env.begin(write=False) as txn:
            raw = txn.get(META_KEY)
        if raw is None:
            if self._given_shape is None:
                raise DiffalignError(
                    f"LMDB store {self.path} has no {META_KEY.decode()} record (a seed cache?): "
                    "pass its record shape, e.g. TensorLMDB(path, shape=(256, 1024))"
                )
            meta = {
                "format": "raw",
                "dtype": _dtype_name(self._given_dtype),
                "shape": list(self._given_shape),
            }
        else:
            try:
                meta = json.loads(bytes(raw).decode("utf-8"))
                shape = tuple(int(s) for s in meta["shape"])
                dtype = _DTYPES[meta["dtype"]]
            except (ValueError, KeyError, TypeError):
                raise DiffalignError(f"LMDB store {self.path}: unreadable metadata") from None
            if self._given_shape is not None and self._given_shape != shape:
                raise DiffalignError(
                    f"LMDB store {self.path} holds records of shape {list(shape)}, "
                    f"not {list(self._given_shape)}"
                )
            meta["shape"] = list(shape)
            self._given_dtype = dtype
        self._meta = meta
        self._shape = tuple(int(s) for s in meta["shape"])
        self._dtype = _DTYPES[meta["dtype"]]
        self._nbytes = _record_nbytes(self._shape, self._dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_env"] = None  # never pickle an open environment into a worker
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Close this process's handle on the store (every reader of it reopens on next use)."""
        _close_readers(self._real)
        self._env = None
        self._pid = None

    # -- metadata ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        self._open()
        return dict(self._meta or {})

    @property
    def shape(self) -> tuple[int, ...]:
        self._open()
        return self._shape  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        self._open()
        return self._dtype  # type: ignore[return-value]

    @property
    def record_nbytes(self) -> int:
        """Bytes of one record's value."""
        return _record_nbytes(self.shape, self.dtype)

    # -- reads -------------------------------------------------------------------------------
    def _decode(self, key: str | bytes, raw) -> torch.Tensor:
        if len(raw) != self._nbytes:
            raise DiffalignError(
                f"corrupt record '{_key_str(key)}' in {self.path}: {len(raw)} bytes, "
                f"expected {self._nbytes} ({list(self._shape)} {_dtype_name(self._dtype)})"
            )
        return _frombuffer(raw, self._dtype).view(self._shape)

    def get(self, key: str | bytes) -> torch.Tensor:
        """The tensor under `key` (zero-copy view of the record's bytes; do not modify in place).

        A missing key or a record of the wrong length is a DiffalignError naming key and store.
        """
        env = self._open()
        with _store_errors(self.path), env.begin(write=False) as txn:
            raw = txn.get(_key_bytes(key))
        if raw is None:
            raise DiffalignError(f"key '{_key_str(key)}' not found in LMDB store {self.path}")
        return self._decode(key, raw)

    def get_many(
        self, keys: Sequence[str | bytes], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[len(keys), *shape]`: one read transaction, each record copied once straight from
        the memory map into the batch tensor (the fast path for a batch).

        The batch tensor is `out` when given (contiguous, of that shape and dtype), else a
        recycled buffer (`engine.buffers.batch_empty`: memory reused only once nothing
        references an earlier batch in it; shared memory inside a DataLoader worker)."""
        from diffalign.engine.buffers import batch_empty

        env = self._open()
        shape, dtype, nbytes = self.shape, self.dtype, self.record_nbytes
        if out is None:
            out = batch_empty((len(keys), *shape), dtype)
        elif tuple(out.shape) != (len(keys), *shape) or out.dtype != dtype:
            raise ValueError(f"out must be {dtype} {[len(keys), *shape]}, not {out.dtype} "
                             f"{list(out.shape)}")  # fmt: skip
        elif not out.is_contiguous():
            raise ValueError("out must be contiguous")
        # a byte view of the batch: slice assignment is one memcpy per record
        with (
            _store_errors(self.path),
            memoryview(out.view(-1).view(torch.uint8).numpy()) as flat,
            env.begin(write=False, buffers=True) as txn,
        ):
            for i, key in enumerate(keys):
                value = txn.get(_key_bytes(key))
                if value is None:
                    raise DiffalignError(
                        f"key '{_key_str(key)}' not found in LMDB store {self.path}"
                    )
                if len(value) != nbytes:
                    raise DiffalignError(
                        f"corrupt record '{_key_str(key)}' in {self.path}: "
                        f"{len(value)} bytes, expected {nbytes}"
                    )
                flat[i * nbytes : (i + 1) * nbytes] = value
        return out

    def is_valid(self, key: str | bytes) -> bool:
        """True when `key` holds a record of the right length."""
        env = self._open()
        with env.begin(write=False, buffers=True) as txn:
            raw = txn.get(_key_bytes(key))
            return raw is not None and len(raw) == self.record_nbytes

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str | bytes):
            return False
        env = self._open()
        with env.begin(write=False, buffers=True) as txn:
            return txn.get(_key_bytes(key)) is not None

    def __len__(self) -> int:
        env = self._open()
        n = env.stat()["entries"]
        with env.begin(write=False, buffers=True) as txn:
            has_meta = txn.get(META_KEY) is not None
        return n - int(has_meta)

    def keys(self) -> list[str]:
        """All record keys (not the metadata key), in the store's (byte-sorted) order."""
        env = self._open()
        with env.begin(write=False) as txn:
            return [k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)
                    if k != META_KEY]  # fmt: skip

    def __repr__(self) -> str:
        return f"TensorLMDB({str(self.path)!r})"


# (real path, pid) -> the read-only environment shared by every reader of that store in a process
_READERS: dict[tuple[str, int], Any] = {}


def _close_readers(real_path: str) -> None:
    env = _READERS.pop((real_path, os.getpid()), None)
    if env is not None:
        env.close()


def _key_str(key: str | bytes) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


class TensorLMDBWriter:
    """Writer of a `TensorLMDB`: `with TensorLMDBWriter(path, (4, 64, 64)) as w: w.put(k, t)`.

    Puts are batched into transactions of `commit_every` records; the map doubles on
    `MapFullError`. Opening an existing store continues it (resume) if shape and dtype agree.
    Records already put stay committed if the block raises. One writer per store.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float16,
        meta: dict[str, Any] | None = None,
        commit_every: int = 64,
        map_size: int = _INITIAL_MAP_SIZE,
    ):
        if sys.byteorder != "little":  # pragma: no cover - every supported host is
            raise DiffalignError("LMDB tensor stores are little-endian; this host is not")
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.dtype_name = _dtype_name(dtype)
        self.record_nbytes = _record_nbytes(self.shape, dtype)
        self.extra_meta = dict(meta or {})
        self.commit_every = max(1, int(commit_every))
        self.map_size = int(map_size)
        self._env = None
        self._pending: dict[bytes, bytes] = {}
        self.written = 0

    def __enter__(self) -> TensorLMDBWriter:
        import lmdb

        if self.path.exists() and not self.path.is_dir():
            raise DiffalignError(f"LMDB store {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        _close_readers(os.path.realpath(self.path))  # py-lmdb allows one handle per process
        if (self.path / "data.mdb").is_file():
            self.map_size = max(self.map_size, (self.path / "data.mdb").stat().st_size * 2)
        try:
            self._env = lmdb.open(str(self.path), map_size=self.map_size, subdir=True)
        except lmdb.Error as e:
            raise DiffalignError(f"cannot open LMDB store {self.path} for writing: {e}") from None
        try:
            _check_complete(self._env, self.path)
        except DiffalignError:
            self._env = None
            raise
        with self._env.begin(write=False) as txn:
            raw = txn.get(META_KEY)
        meta = {"format": FORMAT, "dtype": self.dtype_name, "shape": list(self.shape)}
        if raw is not None:
            try:
                old = json.loads(raw.decode("utf-8"))
            except ValueError:
                old = {}
            if old.get("shape") != list(self.shape) or old.get("dtype") != self.dtype_name:
                self._env.close()
                self._env = None
                raise DiffalignError(
                    f"LMDB store {self.path} holds {old.get('dtype')} records of shape "
                    f"{old.get('shape')}, not {self.dtype_name} {list(self.shape)}: "
                    "use another output folder or remove it"
                )
            meta = {**old, **self.extra_meta, **meta}
        else:
            meta = {**self.extra_meta, **meta}
        self._meta = meta
        self._write_batch({META_KEY: json.dumps(meta).encode("utf-8")})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._env is not None:
                self.flush()  # every put record is complete: keep it even on an error
        finally:
            if self._env is not None:
                self._env.sync(True)
                self._env.close()
                self._env = None

    def update_meta(self, **items: Any) -> None:
        """Merge `items` into the store's `__meta__` record (e.g. the model that made it)."""
        self._meta = {**self._meta, **items}
        self._pending[META_KEY] = json.dumps(self._meta).encode("utf-8")

    def put(self, key: str | bytes, tensor: torch.Tensor) -> None:
        """Queue one record; it is committed with the next full batch (or on exit)."""
        if self._env is None:
            raise RuntimeError("TensorLMDBWriter.put outside its `with` block")
        if tuple(tensor.shape) != self.shape:
            raise DiffalignError(
                f"record '{_key_str(key)}' has shape {list(tensor.shape)}; store {self.path} "
                f"holds {list(self.shape)}"
            )
        kb = _key_bytes(key)
        if kb == META_KEY:
            raise DiffalignError(f"'{META_KEY.decode()}' is reserved for the store's metadata")
        self._pending[kb] = tensor_to_record(tensor, self.dtype)
        if len(self._pending) >= self.commit_every:
            self.flush()

    def put_record(self, key: str | bytes, record: bytes) -> None:
        """Queue raw record bytes (already in the store's layout), checked for length."""
        if len(record) != self.record_nbytes:
            raise DiffalignError(
                f"record '{_key_str(key)}' has {len(record)} bytes, expected {self.record_nbytes}"
            )
        self._pending[_key_bytes(key)] = bytes(record)
        if len(self._pending) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        """Commit the queued records in one transaction."""
        if self._pending:
            n = sum(1 for k in self._pending if k != META_KEY)
            self._write_batch(self._pending)
            self.written += n
            self._pending = {}

    def _write_batch(self, items: dict[bytes, bytes]) -> None:
        import lmdb

        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in items.items():
                        txn.put(k, v)
                return
            except lmdb.MapFullError:  # the transaction was aborted: grow and redo it
                self.map_size *= 2
                self._env.set_mapsize(self.map_size)

    def has(self, key: str | bytes) -> bool:
        """True when `key` holds a complete record (committed or queued); a record of the
        wrong length counts as absent, so a resumed job redoes it."""
        kb = _key_bytes(key)
        if kb in self._pending:
            return True
        with self._env.begin(write=False, buffers=True) as txn:
            raw = txn.get(kb)
            return raw is not None and len(raw) == self.record_nbytes

    def valid_keys(self) -> set[str]:
        """Keys of all complete records (for resume: everything else is (re)done)."""
        out = set()
        with self._env.begin(write=False, buffers=True) as txn:
            for k, v in txn.cursor().iternext(keys=True, values=True):
                k = bytes(k)
                if k != META_KEY and len(v) == self.record_nbytes:
                    out.add(k.decode("utf-8", "replace"))
        out.update(k.decode("utf-8", "replace") for k in self._pending if k != META_KEY)
        return out


def existing_valid_keys(
    path: str | os.PathLike, shape: Sequence[int], dtype: torch.dtype = torch.float16
) -> set[str]:
    """Keys of complete records in the store at `path` (empty when there is no store yet)."""
    path = Path(path)
    if not _is_lmdb_dir(path):
        return set()
    db = TensorLMDB(path, shape=shape, dtype=dtype)
    try:
        if db.shape != tuple(shape) or db.dtype != dtype:
            return set()
        nbytes = db.record_nbytes
        env = db._open()
        out = set()
        with env.begin(write=False, buffers=True) as txn:
            for k, v in txn.cursor().iternext(keys=True, values=True):
                k = bytes(k)
                if k != META_KEY and len(v) == nbytes:
                    out.add(k.decode("utf-8", "replace"))
        return out
    finally:
        db.close()
