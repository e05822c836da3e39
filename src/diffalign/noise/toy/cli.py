"""`diffalign noise toy ...` and `diffalign demo` (spec N: Toy branch)."""

from __future__ import annotations


def register(verbs) -> None:
    pass


def register_demo(sub) -> None:
    pass
