"""`diffalign textstream sample | generate | geneval | dpg` (spec T: Generation)."""

from __future__ import annotations


def register(verbs) -> None:
    pass
