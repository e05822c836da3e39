"""Engine commands: `diffalign make-tiny` and `diffalign download` (spec E)."""

from __future__ import annotations


def register(sub) -> None:
    """Add the engine's commands to the top-level subparsers."""
    # filled in by engine.tiny / engine.download owners
