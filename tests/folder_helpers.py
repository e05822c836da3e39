"""Test helpers for refused and interrupted runs: what a folder holds, a call that dies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffalign.engine.io import LOCK_NAME


def file_mtimes(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its mtime (the lock file is taken, touched, by every try:
    0 for it)."""
    return {
        str(p.relative_to(folder)): 0 if p.name == LOCK_NAME else p.stat().st_mtime_ns
        for p in folder.rglob("*")
    }


def interrupted_on_call(real: Callable, n: int = 2) -> Callable:
    """`real`, but the `n`-th call raises KeyboardInterrupt (a run killed partway)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapper
