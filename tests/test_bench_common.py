"""What the benches share (bench/timing.py's compile payoff, bench/sizes.py) and bench/fill.py's
timing order, checked on the CPU."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import timing  # noqa: E402


def test_cold_start_and_break_even_by_hand():
    # setup 2 s + first compiled run 10 s - a warm compiled run 1 s = 11 s paid once
    assert timing.cold_start(10.0, 1.0, setup_s=2.0) == 11.0
    assert timing.cold_start(10.0, 1.0) == 9.0
    # 0.5 s saved per step: 22 steps pay the 11 s back; not faster (or equal): never
    assert timing.break_even(11.0, 1.5, 1.0) == 22.0
    assert timing.break_even(11.0, 1.0, 1.0) is None
    assert timing.break_even(11.0, 0.9, 1.0) is None
    assert timing.compile_payoff(11.004, 1.5, 1.03) == {
        "cold_start_s": 11.0,
        "break_even_steps": round(11.004 / 0.47, 1),
    }
    assert timing.compile_payoff(3.0, 1.0, 2.0) == {"cold_start_s": 3.0, "break_even_steps": None}
    assert timing.break_even_text(22.4) == "break-even 22 steps"
    assert timing.break_even_text(None) == "break-even never"
    assert timing.break_even_text(None, never="never (not faster)") == (
        "break-even never (not faster)"
    )


def test_real_sizes_are_the_released_models():
    from sizes import FLUX1, SD3_MEDIUM

    assert (FLUX1.blocks, FLUX1.single_blocks, FLUX1.width) == (19, 38, 3072)
    assert (FLUX1.text_dim, FLUX1.pooled_dim, FLUX1.text_tokens) == (4096, 768, 512)
    assert FLUX1.describe() == "19 + 38 blocks, 24 heads x 128"
    assert (SD3_MEDIUM.blocks, SD3_MEDIUM.width, SD3_MEDIUM.image_tokens) == (24, 1536, 4096)
    assert SD3_MEDIUM.describe() == "24 blocks, 24 heads x 64"


def test_fill_attention_times_the_same_order_whatever_the_global_random_state(monkeypatch):
    """bench/fill.py's rounds come from a seeded generator: two runs time the same sequence,
    even when other code has moved Python's global `random` in between."""
    import fill

    calls: list[str] = []
    monkeypatch.setattr(fill, "_run", lambda variant, *a: calls.append(variant))
    monkeypatch.setattr(fill, "peak_memory_mb", lambda *a: 1.0)
    args = SimpleNamespace(dim=8, heads=2, layers=1, rounds=12, max_seed_gb=1.0)
    orders = []
    for state in (1, 2):
        random.seed(state)
        calls.clear()
        row = fill._measure(args, 16, 1, "forward")
        orders.append(list(calls))
    assert orders[0] == orders[1]
    assert len(orders[0]) == 2 + 2 * 12  # a warm-up round, then the timed rounds
    assert row["ours_ms"] >= 0 and "seed_ms" in row
