"""Atomic writes and safe reads: nothing half-written, no pickles trusted (spec E: Safety)."""

from __future__ import annotations

import contextlib
import json
import os
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


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line and flush it to disk (a crash loses at most this line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")
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
