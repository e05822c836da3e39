"""Atomic writes and safe reads: nothing half-written, no pickles trusted (spec E: Safety)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
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
    """Yield a temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
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
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            touched.append(p)
        elif _STALE_TMP.match(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            touched.append(p)
    return touched


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
    reason = e.strerror or type(e).__name__
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
        raise DiffalignError(os_error_message(e, path, size)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write JSON atomically."""
    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
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
    line = json.dumps(obj, default=_json_default) + "\n"
    with _clean_os_errors(path, path, len(line.encode())):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
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
