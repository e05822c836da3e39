"""Benchmark of the FLUX Fill semantic cross-attention (spec F, seed 004).

Section `attention` (default): `SemanticCrossAttention` (fused `scaled_dot_product_attention`)
against the seed's explicit `softmax(Q K^T / sqrt(d)) V` (`seed_reference_forward`, the same
weights) in the same run, at L = 2048, 4096, 8192 tokens, batch 4, width 64 with 8 heads (the
seed's real module: FLUX packed latents have 64 channels; 2048 tokens = one 512 px diptych).

- time: forward (no grad) and forward + backward; after a warm-up round, rounds interleave the
  two variants in a fresh order drawn from a seeded generator (bench/timing.py); the clock is the
  thread's CPU time with one torch thread (robust on a shared machine); medians and the
  ours/seed ratio; module and inputs from fixed seeds;
- peak memory: each (variant, L, mode) runs once in a fresh subprocess; reported is the peak
  resident set during that pass (sampled every 0.2 ms) minus the resident set just before it
  (inputs and weights already allocated). Goal: O(L), L = 8192 forward under 1.5 GB.
- the seed's variant is skipped where its `[B, heads, L, L]` matrices would exceed
  `--max-seed-gb` (the row says how much it would need); both variants are then also measured
  at batch 1 (`--fallback-batch`) where the seed fits, so every L has a same-run comparison.

Other sections plug in through `SECTIONS` (the training-step overhead of the module over a
LoRA-only step is the `train` section of the training part).

    python bench/fill.py [--quick] [--lengths 2048,4096,8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py, fill_train.py
from timing import interleaved_times  # noqa: E402


def _make(length: int, batch: int, dim: int, heads: int, layers: int, seed: int = 0):
    from diffalign.fill import SemanticCrossAttention

    torch.manual_seed(seed)
    module = SemanticCrossAttention(dim=dim, heads=heads, layers=layers)
    with torch.no_grad():
        for layer in module.layers:
            layer.scale.fill_(0.5)  # as after training: the attention path matters
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, length, dim, generator=g)
    s = torch.randn(batch, length, dim, generator=g)
    return module, x, s


def _run(variant: str, mode: str, module, x, s) -> None:
    from diffalign.fill import seed_reference_forward

    fn = module if variant == "ours" else (lambda a, b: seed_reference_forward(module, a, b))
    if mode == "forward":
        with torch.no_grad():
            fn(x, s)
    else:
        module.zero_grad(set_to_none=True)
        fn(x, s).square().mean().backward()


def seed_bytes(length: int, batch: int, heads: int, mode: str) -> int:
    """The seed's live `[B, heads, L, L]` float32 matrices: scores + softmax (+ grads)."""
    one = batch * heads * length * length * 4
    return one * (2 if mode == "forward" else 4)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _child(args) -> None:
    """One pass in a fresh process; prints {"peak_mb": ...} as JSON.

    Peak = the largest resident set sampled every 0.2 ms during the pass minus the resident set
    just before it (inputs and weights already allocated, one warm-up pass at a small size done).
    """
    torch.set_num_threads(args.threads)
    warm_module, wx, ws = _make(64, 1, args.dim, args.heads, args.layers)
    _run(args.child_variant, args.child_mode, warm_module, wx, ws)  # load kernels, thread pools
    module, x, s = _make(args.child_length, args.batch, args.dim, args.heads, args.layers)
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _run(args.child_variant, args.child_mode, module, x, s)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    print(json.dumps({"peak_mb": (peak[0] - before) / 2**20}))


def peak_memory_mb(args, variant: str, length: int, batch: int, mode: str) -> float:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child-variant",
        variant,
        "--child-length",
        str(length),
        "--child-mode",
        mode,
        "--batch",
        str(batch),
        "--dim",
        str(args.dim),
        "--heads",
        str(args.heads),
        "--layers",
        str(args.layers),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def attention_section(args) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for length in args.lengths:
        for mode in args.modes:
            need = seed_bytes(length, args.batch, args.heads, mode)
            rows.append(_measure(args, length, args.batch, mode))
            fb = args.fallback_batch
            if need > args.max_seed_gb * 2**30 and 0 < fb < args.batch:
                if seed_bytes(length, fb, args.heads, mode) <= args.max_seed_gb * 2**30:
                    rows.append(_measure(args, length, fb, mode))
    return {"rows": rows}


def _measure(args, length: int, batch: int, mode: str) -> dict:
    module, x, s = _make(length, batch, args.dim, args.heads, args.layers)
    need = seed_bytes(length, batch, args.heads, mode)
    variants = ["ours"] + (["seed"] if need <= args.max_seed_gb * 2**30 else [])
    # one warm-up round, then rounds in an order drawn from a seeded generator (bench/timing.py:
    # two runs time the same sequence); the thread's CPU time with one torch thread
    times = interleaved_times(
        {v: (lambda v=v: _run(v, mode, module, x, s)) for v in variants},
        reps=args.rounds,
        warmup=1,
        device="cpu",
        seed=0,
    )
    row = {
        "L": length,
        "batch": batch,
        "mode": mode,
        "ours_ms": 1000 * statistics.median(times["ours"]),
        "ours_peak_mb": peak_memory_mb(args, "ours", length, batch, mode),
        "seed_need_gb": need / 2**30,
    }
    if "seed" in variants:
        row["seed_ms"] = 1000 * statistics.median(times["seed"])
        row["seed_peak_mb"] = peak_memory_mb(args, "seed", length, batch, mode)
        row["speedup"] = row["seed_ms"] / row["ours_ms"]
        row["memory_ratio"] = row["seed_peak_mb"] / max(row["ours_peak_mb"], 1e-3)
        if mode == "forward":
            from diffalign.fill import seed_reference_forward

            with torch.no_grad():
                diff = (module(x, s) - seed_reference_forward(module, x, s)).abs().max()
            row["max_abs_diff"] = float(diff)
    print(_format_row(row), flush=True)
    return row


def _format_row(r: dict) -> str:
    seed = (
        f"{r['seed_ms']:.1f} ms, {r['seed_peak_mb']:.0f} MB"
        if "seed_ms" in r
        else f"skipped (needs {r['seed_need_gb']:.1f} GB)"
    )
    ratio = (
        f" | {r['speedup']:.1f}x faster, {r['memory_ratio']:.0f}x less memory"
        if "speedup" in r
        else ""
    )
    return (
        f"L={r['L']:5d} B={r['batch']} {r['mode']:16s} ours {r['ours_ms']:.1f} ms, "
        f"{r['ours_peak_mb']:.0f} MB | seed {seed}{ratio}"
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        "| L | batch | pass | ours ms | seed ms | speed-up | ours peak MB | seed peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seed_ms = f"{r['seed_ms']:.1f}" if "seed_ms" in r else "—"
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else "—"
        seed_mb = (
            f"{r['seed_peak_mb']:.0f}"
            if "seed_peak_mb" in r
            else f"skipped (needs {r['seed_need_gb']:.1f} GB)"
        )
        lines.append(
            f"| {r['L']} | {r['batch']} | {r['mode']} | {r['ours_ms']:.1f} | {seed_ms} | "
            f"{speed} | {r['ours_peak_mb']:.0f} | {seed_mb} |"
        )
    return "\n".join(lines)


# Sections of this benchmark: name -> function(args) -> JSON-able results.
SECTIONS = {"attention": attention_section}

# the training-step overhead of the module over a LoRA-only step (bench/fill_train.py)
from fill_train import add_train_options, train_section  # noqa: E402

SECTIONS["train"] = train_section


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=sorted(SECTIONS), default=None, help="default: all")
    p.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192], help="token counts L")
    p.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    p.add_argument("--dim", type=int, default=64, help="token width (FLUX packed latents: 64)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (seed: 8)")
    p.add_argument("--layers", type=int, default=1, help="stacked layers (seed: 1)")
    p.add_argument(
        "--modes",
        type=lambda t: t.split(","),
        default=["forward", "forward+backward"],
        help="passes to time: forward,forward+backward",
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument(
        "--max-seed-gb",
        type=float,
        default=5.0,
        help="skip the seed's variant where its L x L matrices need more (default: 5)",
    )
    p.add_argument(
        "--fallback-batch",
        type=int,
        default=1,
        help="where the seed does not fit at --batch, also compare at this batch (0: never)",
    )
    add_train_options(p)
    p.add_argument("--quick", action="store_true", help="L = 512, 1024 only; 2 rounds")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child-variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-length", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_variant:
        _child(args)
        return 0
    if args.quick:
        args.lengths, args.rounds = [512, 1024], 2
    results = {
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }
    print(f"load average {results['loadavg']}, torch {torch.__version__}, {args.threads} thread(s)")
    for name in [args.section] if args.section else list(SECTIONS):
        results[name] = SECTIONS[name](args)
        if name == "attention":
            print(markdown(results[name]["rows"]))
    results["loadavg_end"] = os.getloadavg()
    print(f"load average at the end {results['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
