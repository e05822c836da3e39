"""`diffalign textstream calibrate` (spec T: Calibration). Heavy imports stay inside handlers."""

from __future__ import annotations


def register(verbs) -> None:
    pass
