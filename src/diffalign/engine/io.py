"""Atomic writes and safe reads: nothing half-written, no pickles trusted (spec E: Safety)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError

# how a text file we are given is read: UTF-8, a leading byte-order mark (a file saved by a
# Windows editor) not part of its first line
TEXT_ENCODING = "utf-8-sig"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path` (on failure
    the folders made for it are removed again, `undo_new_folders`)."""
    path = Path(path)
    with undo_new_folders(path.parent):
        with _clean_os_errors(path, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        try:
            with _clean_os_errors(path, tmp_path):
                yield tmp_path
                os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole (on failure
    the folders made for it are removed again, `undo_new_folders`)."""
    path = Path(path)
    with undo_new_folders(path.parent):
        with _clean_os_errors(path, path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
        try:
            with _clean_os_errors(path, tmp):
                yield tmp
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


@contextlib.contextmanager
def undo_new_folders(folder: str | os.PathLike) -> Iterator[None]:
    """Around a step that may create `folder`: if the step fails, the folders it created
    (`folder` and any parents that were missing) are removed again, deepest first, as long as
    they are empty. A refused run leaves no empty folders; a folder that existed before, or one
    with anything in it, is never removed."""
    created = _missing_folders(Path(folder))
    try:
        yield
    except BaseException:
        _remove_empty(created)
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty; stop at the first that is not."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


_STALE_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # mkstemp/mkdtemp names above
_STALE_OLD = re.compile(r"^\.(?P<name>.+)\.old$")


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries `atomic_path`/`atomic_dir` leave when killed mid-write.

    Only our own names are touched: `.<name>.XXXXXXXX.tmp` (files or folders) and
    `.<name>.old`; an `.old` whose `<name>` is missing (a kill between the two renames of
    `atomic_dir`) is renamed back instead of removed. Returns the paths removed or restored.
    Call it only on a folder this process owns (under `output_lock`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched = []
    for p in sorted(folder.iterdir()):
        m_old = _STALE_OLD.match(p.name)
        if m_old:
            target = folder / m_old["name"]
            if not target.exists():
                os.replace(p, target)
            else:
                _remove(p, ignore_errors=True)
            touched.append(p)
        elif _STALE_TMP.match(p.name):
            _remove(p, ignore_errors=True)
            touched.append(p)
    return touched


def earlier_units(
    folder: str | os.PathLike, name: str, marker: str | None = None, *, folders: bool = False
) -> list[Path]:
    """The entries of `folder` an output layout writes, for `--overwrite` to remove
    (`remove_units`): names matching `name` (a regex, whole name); files, or folders with
    ``folders`` or a ``marker`` (then only folders that hold the file `marker`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(name)
    want_dir = folders or marker is not None
    return sorted(
        e
        for e in folder.iterdir()
        if pattern.fullmatch(e.name)
        and (
            (e.is_dir() and (marker is None or (e / marker).is_file())) if want_dir else e.is_file()
        )
    )


def remove_units(paths: Iterable[Path]) -> None:
    """Remove an earlier run's units (`--overwrite` starts over): once the run is set up (its
    model loaded) and before its settings are recorded, so a run killed in between leaves no
    earlier unit that a plain re-run would count as done under the new settings."""
    for path in paths:
        _remove(Path(path))


def _remove(path: Path, ignore_errors: bool = False) -> None:
    """Remove the file or folder `path`; a symlink is unlinked, never followed (what it points
    at is not ours; `shutil.rmtree` refuses a link). `ignore_errors`: for a folder's contents."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


def _tree_size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def format_bytes(n: float) -> str:
    """`1536` -> `1.5 KB` (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def os_error_message(e: OSError, path: str | os.PathLike | None = None, nbytes: int | None = None):
    """One line for an OS error on one of our own paths (spec E: bad input -> one line)."""
    where = e.filename if e.filename is not None else path
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        need = f"; it needed {format_bytes(nbytes)}" if nbytes else ""
        return f"no space left on the device while writing {where}{need}: free some space"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {reason} (choose a writable folder)"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{where}: a file is in the way where a folder is needed ({reason})"
    if e.errno == errno.EISDIR:
        return f"{where}: is a folder, a file is needed"
    return f"{where}: {reason}"


@contextlib.contextmanager
def _clean_os_errors(path: Path, tmp: Path, nbytes: int | None = None) -> Iterator[None]:
    """OS errors while writing `path` become one DiffalignError naming it (and the size)."""
    try:
        yield
    except OSError as e:
        size = nbytes or _tree_size(tmp) or None
        if e.filename is not None and _STALE_TMP.match(Path(str(e.filename)).name):
            e.filename = str(path)  # name the file being written, not its temporary
        raise DiffalignError(os_error_message(e, path, size)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_strict_json(obj: Any) -> Any:
    """`obj` as plain JSON values: tensors/arrays become lists, non-finite floats become None.

    JSON has no NaN or Infinity; writing them (Python's default) gives files other tools reject.
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_strict_json(v) for v in obj]
    return to_strict_json(_json_default(obj))


def dumps_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text (`allow_nan=False`; NaN/inf written as null)."""
    return json.dumps(to_strict_json(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write strict JSON atomically (non-finite floats become null)."""
    text = dumps_json(obj, indent=indent) + "\n"
    with atomic_path(path) as tmp:
        with _clean_os_errors(Path(path), tmp, len(text.encode())):
            tmp.write_text(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most this line)."""
    path = Path(path)
    line = dumps_json(obj) + "\n"
    with _clean_os_errors(path, path, len(line.encode())):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def iter_jsonl(path: str | os.PathLike, skip_bad: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-empty line; a malformed line is an error naming
    `file:line` (or is skipped), a file that is not UTF-8 (`TEXT_ENCODING`) is an error."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"file not found: {path}")
    try:
        with open(path, encoding=TEXT_ENCODING) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    if skip_bad:
                        continue
                    raise DiffalignError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                yield lineno, obj
    except UnicodeDecodeError:
        raise DiffalignError(f"{path}: not UTF-8 text") from None


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False) -> list[dict]:
    """Read a jsonl file; a malformed line is an error naming the line (or skipped)."""
    return [obj for _, obj in iter_jsonl(path, skip_bad)]


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file with a one-line error on a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding=TEXT_ENCODING))
    except json.JSONDecodeError as e:
        raise DiffalignError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise DiffalignError(f"{path}: not UTF-8 text (not a JSON file?)") from None


def read_json_object(path: str | os.PathLike) -> dict:
    """`read_json` of a record that must be a JSON object (a config, state or summary we
    wrote); anything else (an edited or mixed-up file) is a one-line DiffalignError."""
    return json_object(read_json(path), path)


def json_object(obj: Any, path: str | os.PathLike) -> dict:
    """`obj`, read from `path` (`read_json`), when it is a JSON object; anything else is
    `read_json_object`'s one-line DiffalignError."""
    if not isinstance(obj, dict):
        raise DiffalignError(f"{path}: not a JSON object ({type(obj).__name__}); damaged?")
    return obj


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content (`TEXT_ENCODING`); a missing or non-UTF-8 file is a one-line
    DiffalignError."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError:
        raise DiffalignError(f"{path}: not UTF-8 text") from None


def save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Save tensors as safetensors, atomically; identical tensors and metadata give identical
    bytes (the metadata is written in sorted key order, see `safetensors_bytes`)."""
    data = safetensors_bytes(tensors, metadata)
    with atomic_path(path) as tmp:
        with _clean_os_errors(Path(path), tmp, len(data)):
            with open(tmp, "wb") as f:
                f.write(data)


def safetensors_bytes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """The safetensors file of `tensors` with `metadata` in sorted key order.

    `safetensors.torch.save` keeps the metadata in a hash map whose order changes from process
    to process, so two runs writing the same tensors gave files with different sha256. The
    tensors are serialised by safetensors itself (without metadata), then the header is written
    again with `__metadata__` first and its keys sorted (same format, 8-byte aligned header).
    """
    import struct

    from safetensors.torch import save

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise DiffalignError(f"safetensors metadata must map str to str (bad keys: {bad})")
    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    ordered: dict[str, Any] = {}
    if metadata:
        ordered["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata from `.safetensors`, or a `.pt`/`.pth` with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        obj = load_pt(path)
    except DiffalignError:
        raise
    except Exception as e:  # corrupt or truncated file
        raise DiffalignError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}, {}
    if not isinstance(obj, dict):
        raise DiffalignError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    meta = {k: json.dumps(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    return tensors, meta


def save_pt(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` of plain state dicts (read back with `load_pt`); a failed write (a full
    disk shows up as a RuntimeError from torch's zip writer) is one DiffalignError line."""
    path = Path(path)
    try:
        torch.save(obj, path)
    except OSError as e:
        raise DiffalignError(os_error_message(e, path)) from None
    except RuntimeError as e:
        text = str(e)
        # torch 2.13 names its zip writer; torch 2.11 on a full disk says only
        # "basic_ios::clear: iostream error" (seen on CUDA builds)
        markers = ("inline_container", "PytorchStreamWriter", "write", "iostream", "basic_ios")
        if not any(k in text for k in markers):
            raise  # not a failed write
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else None
        room = f" ({format_bytes(free)} free there)" if free is not None else ""
        raise DiffalignError(
            f"cannot write {path}{room}: is the disk full? ({str(e).splitlines()[0][:160]})"
        ) from None


def load_pt(path: str | os.PathLike) -> Any:
    """`torch.load` with weights_only=True: plain tensors and containers only, never pickles."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"file not found: {path}")
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning: the error says it
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DiffalignError(
            f"{path}: holds pickled Python objects, not only tensors; such files are never "
            "loaded (weights_only=True)"
        ) from None
    except Exception as e:
        raise DiffalignError(
            f"{path}: cannot be read safely with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def iter_nonempty_lines(path: str | os.PathLike) -> Iterable[str]:
    """Stripped non-empty lines of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def resolve_inside(root: str | os.PathLike, rel: str | os.PathLike, what: str = "path") -> Path:
    """`root / rel` for a path read from a manifest or record we wrote: it must be relative and
    stay inside `root` (after resolving `..` and symlinks); anything else is a DiffalignError."""
    text = str(rel)
    if not text.strip() or "\x00" in text:
        raise DiffalignError(f"{what} {text!r} in {root} is empty or invalid")
    candidate = Path(text)
    if candidate.is_absolute():
        raise DiffalignError(f"{what} {text!r} must be relative to {root}, not absolute")
    base = Path(root).resolve()
    full = (base / candidate).resolve()
    if full != base and base not in full.parents:
        raise DiffalignError(f"{what} {text!r} points outside {root}")
    return full


# ----------------------------------------------------------------------------------------------
# output-folder lock (one run per output folder)

LOCK_NAME = ".diffalign.lock"
_HELD_LOCKS: dict[str, list] = {}  # resolved folder -> [fd or None, depth]


def _launch_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _launch_id() -> str | None:
    """An id shared by the ranks of one `accelerate launch` / torchrun (None outside one)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    addr = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return f"{addr}:{port}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}"


def _read_owner(lock_path: Path) -> dict:
    try:
        return json.loads(lock_path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe_owner(owner: dict) -> str:
    if not owner:
        return "another process"
    text = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
    if owner.get("command"):
        text += f": {owner['command']}"
    if owner.get("started"):
        text += f", started {owner['started']}"
    return text


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Hold an exclusive OS lock on `folder` (created if needed) for the duration of a run.

    The lock is `flock` on `folder/.diffalign.lock`, so the OS drops it when the process ends,
    even on kill -9: no stale locks. A second run on the same folder gets one DiffalignError line
    naming the folder and the running process. Under `accelerate launch` rank 0 takes the lock
    and the other ranks of the same launch wait until it names their launch. Re-entrant within
    a process (an EM cycle may train inside a locked run folder).

    A run that fails while holding the lock (bad input found after the folder was made) leaves
    the file system as it found it: the lock file is removed if this run created it, and so are
    the folders this call created (`folder`, missing parents) if nothing else was written into
    them. A folder that existed before, or one with anything else in it, is never removed.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DiffalignError(f"{what} {folder} exists and is not a folder")
    created = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise DiffalignError(f"cannot create {what} {folder}: {e.strerror or e}") from None
    key = str(folder.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield folder
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    lock_path = folder / LOCK_NAME
    launch = _launch_id()
    if launch is not None and _launch_rank() > 0:
        _wait_for_launch_owner(lock_path, launch, folder, what)
        _HELD_LOCKS[key] = [None, 1]
        try:
            yield folder
        finally:
            _HELD_LOCKS.pop(key, None)
        return
    fd, new_lock = _take_lock(folder, lock_path, what)
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "launch": launch,
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[
            :300
        ],
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    _HELD_LOCKS[key] = [fd, 1]
    try:
        yield folder
    except BaseException:
        if new_lock:  # a failed run leaves no lock file of its own (still held: no run is in there)
            with contextlib.suppress(OSError):
                lock_path.unlink()
            _remove_empty(created)
        raise
    finally:
        _HELD_LOCKS.pop(key, None)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _take_lock(folder: Path, lock_path: Path, what: str) -> tuple[int, bool]:
    """Open and flock `lock_path`: (fd, whether this call created the file). A lock file that a
    failing run unlinked between our open and flock is not a lock: open the new one again."""
    for _ in range(10):
        new = not os.path.lexists(lock_path)
        try:
            folder.mkdir(parents=True, exist_ok=True)  # a refused run may just have removed it
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise DiffalignError(f"cannot write to {what} {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            owner = _read_owner(lock_path)
            raise DiffalignError(
                f"{what} {folder} is in use by another diffalign run ({_describe_owner(owner)}); "
                "wait for it to finish or choose another folder"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except OSError:
            same = False
        if same:
            return fd, new
        os.close(fd)
    raise DiffalignError(f"cannot take the lock of {what} {folder}: it keeps being replaced")


def _wait_for_launch_owner(lock_path: Path, launch: str, folder: Path, what: str) -> None:
    """Ranks > 0: wait (up to DIFFALIGN_LOCK_WAIT seconds) until rank 0 holds the lock for us."""
    limit = float(os.environ.get("DIFFALIGN_LOCK_WAIT", "600"))
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _read_owner(lock_path).get("launch") == launch:
            return
        time.sleep(0.05)
    raise DiffalignError(
        f"{what} {folder}: rank 0 of this launch did not take the output lock within {limit:.0f} s "
        f"({_describe_owner(_read_owner(lock_path))} holds it)"
    )
