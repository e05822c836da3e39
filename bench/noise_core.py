"""Benchmark of the orthogonal noise core (spec N; issue: Benchmarks).

Forward + backward time of :class:`diffalign.noise.PatchOrthogonal` for each parametrisation and
patch size (1, 2, 4, 8) on 4x64x64 and 4x128x128 latents (batch 1 and 4), as a ratio to the
baseline: the same patchify + matmul with a FIXED precomputed Q (a leaf tensor, so backward does
the same product gradients). The ratio is therefore the cost of building Q = Q0 f(S) from its
parameter each step and back-propagating through f. Both are timed in the same run, interleaved,
and the medians are compared.

    python bench/noise_core.py [--quick] [--json PATH] [--device cpu|cuda]

``bench_demo_stages(quick)`` also times ``diffalign demo`` per stage when the toy branch exists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py
from diffalign.noise import PatchOrthogonal, apply_patch_orthogonal  # noqa: E402
from timing import time_once  # noqa: E402

PATCH_SIZES = (1, 2, 4, 8)
LATENTS = ((4, 64, 64), (4, 128, 128))
BATCHES = (1, 4)
PARAMETRIZATIONS = ("matrix_exp", "cayley")


def _timed(fn, device: torch.device) -> float:
    """Wall-clock seconds of one call (CUDA synchronised around it; bench/timing.py)."""
    return time_once(fn, device, clock=time.perf_counter)


def bench_case(
    shape: tuple[int, int, int],
    batch: int,
    parametrization: str,
    patch_size: int,
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> dict:
    """Median forward+backward seconds of PatchOrthogonal vs a fixed precomputed Q."""
    c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    module = PatchOrthogonal(c, patch_size, parametrization, init="random", seed=0).to(device)
    with torch.no_grad():
        module.weight.copy_(0.1 * torch.randn(module.weight.shape, generator=gen))
    fixed = module.matrix().detach().clone().requires_grad_(True)
    z = torch.randn((batch, c, h, w), generator=gen).to(device)
    weight = torch.randn((batch, c, h, w), generator=gen).to(device)

    def ours() -> None:
        module.zero_grad(set_to_none=True)
        (module(z) * weight).sum().backward()

    def baseline() -> None:
        fixed.grad = None
        (apply_patch_orthogonal(z, fixed, patch_size) * weight).sum().backward()

    for _ in range(warmup):
        ours()
        baseline()
    t_ours, t_base = [], []
    for i in range(repeats):  # interleaved, alternating order, so drift hits both alike
        if i % 2:
            t_base.append(_timed(baseline, device))
            t_ours.append(_timed(ours, device))
        else:
            t_ours.append(_timed(ours, device))
            t_base.append(_timed(baseline, device))
    m_ours, m_base = statistics.median(t_ours), statistics.median(t_base)
    return {
        "latent": f"{c}x{h}x{w}",
        "batch": batch,
        "parametrization": parametrization,
        "patch_size": patch_size,
        "patch_dim": c * patch_size**2,
        "ours_ms": 1000 * m_ours,
        "fixed_q_ms": 1000 * m_base,
        "ratio": m_ours / m_base,
        "repeats": repeats,
    }


def bench_core(quick: bool, device: torch.device, repeats: int | None = None) -> list[dict]:
    latents = LATENTS[:1] if quick else LATENTS
    batches = BATCHES[:1] if quick else BATCHES
    repeats = repeats or (3 if quick else 15)
    rows = []
    print(
        f"{'latent':>10} {'B':>2} {'param':>10} {'p':>2} {'D':>4} "
        f"{'ours ms':>9} {'fixed ms':>9} {'ratio':>6}"
    )
    for shape in latents:
        for batch in batches:
            for par in PARAMETRIZATIONS:
                for p in PATCH_SIZES:
                    r = bench_case(shape, batch, par, p, device, repeats)
                    rows.append(r)
                    print(
                        f"{r['latent']:>10} {batch:>2} {par:>10} {p:>2} {r['patch_dim']:>4} "
                        f"{r['ours_ms']:>9.3f} {r['fixed_q_ms']:>9.3f} {r['ratio']:>6.2f}",
                        flush=True,
                    )
    return rows


# ------------------------------------------------------------------ demo stages
def bench_demo_stages(quick: bool) -> dict | None:
    """BENCH: wall time per stage of ``diffalign demo`` (toy pipeline on digits).

    Runs ``diffalign.noise.toy.demo.run_demo(output_dir, quick=quick)`` in a temporary folder and
    prints ``summary["timings"]`` ({stage: seconds}). Skips with a message when the toy branch is
    not installed yet.
    """
    try:
        from diffalign.noise.toy.demo import run_demo
    except ImportError as e:
        print(f"demo stages: skipped (diffalign.noise.toy.demo not available: {e})")
        return None
    with tempfile.TemporaryDirectory(prefix="diffalign-bench-demo-") as tmp:
        t0 = time.perf_counter()
        summary = run_demo(Path(tmp) / "demo", quick=quick)
        total = time.perf_counter() - t0
    timings = dict(summary.get("timings", {}))
    print(f"demo stages ({'quick' if quick else 'full'}), wall seconds:")
    for stage, seconds in timings.items():
        print(f"  {stage:>24s} {seconds:8.2f}")
    print(f"  {'total (measured here)':>24s} {total:8.2f}")
    return {"quick": quick, "timings": timings, "total_s": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke version (4x64x64, B=1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-demo", action="store_true", help="do not time the demo stages")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }
    print(json.dumps(info))
    rows = bench_core(args.quick, device, args.repeats)
    demo = None if args.skip_demo else bench_demo_stages(args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"info": info, "core": rows, "demo": demo}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
