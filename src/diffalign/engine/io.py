"""Atomic writes and safe reads: nothing half-written, no pickles trusted (spec E: Safety)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
    try:
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
        tmp.write_text(text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most this line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(dumps_json(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: str | os.PathLike, skip_bad: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, object) for each non-empty line; a malformed line is an error naming
    `file:line` (or is skipped), a file that is not UTF-8 is an error."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
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
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DiffalignError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )


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


def load_pt(path: str | os.PathLike) -> Any:
    """`torch.load` with weights_only=True: plain tensors and containers only, never pickles."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"file not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
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
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DiffalignError(f"{what} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
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
    try:
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
    finally:
        _HELD_LOCKS.pop(key, None)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
