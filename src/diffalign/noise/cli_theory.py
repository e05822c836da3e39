"""`diffalign noise theory` (spec N: Noise diagnostics)."""

from __future__ import annotations


def register(verbs) -> None:
    pass
