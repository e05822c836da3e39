"""Interleaved timing shared by the benches: every variant timed in the same run, same rounds.

`interleaved_times` runs `warmup` untimed rounds over all variants (in their given order: this
absorbs allocator growth and compilation), then `reps` timed rounds, each in a fresh order drawn
from `random.Random(seed)`, so slow drifts and bursts of a shared machine hit every variant alike.
The clock (`clock_for`): on CUDA wall time with `torch.cuda.synchronize()` before starting and
before stopping it; elsewhere the calling thread's CPU time (`time.thread_time`), which with one
torch thread covers all the compute and leaves out time slices lost to other processes.
`setup(name)` (optional) is a context manager entered around each call outside the clock (e.g.
attaching hooks only while their variant runs).

`summarize` gives each variant's median, its ratio to the baseline's median, the median of the
per-round ratios to the baseline's time in the same round (robust to drift), and the minimum.

A compiled run against its eager twin (`cold_start`, `break_even`, `compile_payoff`): the cold
start is the setup (compiling in place, timed) plus the first compiled run minus a warm compiled
run of the same work; break-even is the number of steps after which compiling pays, cold start /
seconds saved per step against eager (None when the compiled step is not faster).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable

import torch


def clock_for(device: torch.device | str) -> Callable[[], float]:
    """`time.perf_counter` on CUDA (with synchronisation around it), else `time.thread_time`."""
    return time.perf_counter if torch.device(device).type == "cuda" else time.thread_time


def clock_label(device: torch.device | str) -> str:
    """The clock's description as the benches' JSON records it."""
    if torch.device(device).type == "cuda":
        return "wall"
    return "thread CPU time, 1 torch thread"


def time_once(
    fn: Callable[[], object], device: torch.device | str, setup=None, clock=None
) -> float:
    """Seconds of one call of `fn` on `clock` (default `clock_for(device)`; on CUDA synchronised
    before starting and before stopping it); `setup` is entered outside the clock."""
    cuda = torch.device(device).type == "cuda"
    clock = clock or clock_for(device)
    with setup if setup is not None else contextlib.nullcontext():
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return clock() - start


def interleaved_times(
    variants: dict[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int,
    device: torch.device | str,
    setup: Callable[[str], contextlib.AbstractContextManager] | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Every timing of every variant (module doc): `{name: [seconds per round, ...]}`."""
    names = list(variants)

    def one(name: str) -> float:
        return time_once(variants[name], device, setup(name) if setup is not None else None)

    for _ in range(warmup):
        for name in names:
            one(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    for _ in range(reps):
        order = names[:]
        rng.shuffle(order)  # interleaved, in a fresh order each round
        for name in order:
            times[name].append(one(name))
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Per variant: `median_s`, `ratio` (medians), `paired_ratio` (median of per-round ratios to
    the baseline), `min_s`, `reps`."""
    base = statistics.median(times[baseline])
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_s": med,
            "ratio": med / base,
            "paired_ratio": statistics.median(a / b for a, b in zip(ts, times[baseline])),
            "min_s": min(ts),
            "reps": len(ts),
        }
    return out


def cold_start(first_s: float, steady_s: float, setup_s: float = 0.0) -> float:
    """Seconds compiling costs once: `setup_s` + the first compiled run - a warm one (module doc)."""
    return setup_s + first_s - steady_s


def break_even(cold_s: float, eager_step_s: float, compiled_step_s: float) -> float | None:
    """Steps after which compiling pays: cold start / seconds saved per step; None: not faster."""
    saved = eager_step_s - compiled_step_s
    return cold_s / saved if saved > 0 else None


def compile_payoff(cold_s: float, eager_step_s: float, compiled_step_s: float) -> dict:
    """The benches' JSON fields: `cold_start_s` (2 decimals), `break_even_steps` (1 decimal)."""
    steps = break_even(cold_s, eager_step_s, compiled_step_s)
    return {
        "cold_start_s": round(cold_s, 2),
        "break_even_steps": None if steps is None else round(steps, 1),
    }


def break_even_text(steps: float | None, never: str = "never") -> str:
    """How the benches print a break-even: "break-even 12 steps", or `never`'s words."""
    return "break-even " + (f"{steps:.0f} steps" if steps is not None else never)
