"""Benchmark of learned residual weights (spec T; `textstream train-weights`): the time of one
weight-training step against a plain forward + backward of the same frozen transformer, in the
same run.

Variants, on an SD3-shaped `SD3Transformer2DModel` (random weights, frozen):
- `forward`: the flow-matching forward alone, no gradient (context);
- `frozen_fwd_bwd` (the baseline): forward + backward of the velocity loss with respect to the
  noisy latents: the cheapest backward through a frozen transformer;
- `weights_step_*`: one training step of `train-weights`: the velocity loss with the residual
  attached and its weights set to `softplus(raw)` (read by the hooks), backward to `raw`, AdamW;
  `ln_rot` = LN + rotation on every block from 2 to the last (origin 0), `plain_late` = plain
  mode on the last quarter of the blocks (the backward stops at the first target).

Repetitions are interleaved (each round in a fresh random order; bench/timing.py), medians and
the median of per-round ratios to the baseline are reported. On CPU the clock is the thread's CPU
time with one torch thread (robust on a shared machine); on CUDA wall time with synchronisation.

    python bench/textstream_weights.py [--quick] [--sd3-medium] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py, sizes.py
from sizes import SD3_MEDIUM  # noqa: E402
from textstream import build_transformer  # noqa: E402  (the forward bench's SD3 transformer)
from timing import clock_label, interleaved_times, summarize  # noqa: E402


def run(args) -> dict:
    from diffalign.textstream import TextStreamResidual
    from diffalign.textstream.weights import (
        ResidualWeights,
        TimeSampling,
        noisy_latents,
        sample_times,
        velocity_loss,
    )

    load_start = list(os.getloadavg())
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tr, side = build_transformer(
        args.layers, args.heads, args.head_dim, args.image_tokens, device, dtype
    )
    tr.requires_grad_(False)  # frozen: the weight step trains the residual's weights alone
    if args.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    d = args.heads * args.head_dim
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(args.batch, 16, side, side, generator=g).to(device)
    pe = torch.randn(args.batch, args.text_tokens, tr.config.joint_attention_dim, generator=g)
    pooled = torch.randn(args.batch, tr.config.pooled_projection_dim, generator=g)
    pe, pooled = pe.to(device, dtype), pooled.to(device, dtype)
    time_sampling = TimeSampling(shift=3.0)

    def velocity(xs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return tr(
            hidden_states=xs.to(dtype),
            timestep=s * 1000.0,
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def draws():
        eps = torch.randn(x0.shape).to(device)
        return eps, sample_times(args.batch, time_sampling).to(device)

    def forward() -> None:
        eps, s = draws()
        with torch.no_grad():
            velocity_loss(velocity(noisy_latents(x0, eps, s), s), x0, eps)

    def frozen_fwd_bwd() -> None:
        eps, s = draws()
        xs = noisy_latents(x0, eps, s).requires_grad_(True)
        velocity_loss(velocity(xs, s), x0, eps).backward()

    targets_all = list(range(2, args.layers))
    rotations = {}
    for t in targets_all:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        rotations[t] = q.float()
    late = list(range(args.layers - max(1, args.layers // 4), args.layers))
    setups = {
        f"weights_step_ln_rot_{len(targets_all)}": TextStreamResidual(
            0, targets_all, mode="ln", rotations=rotations
        ),
        f"weights_step_plain_late_{len(late)}": TextStreamResidual(0, late, mode="plain"),
    }

    def weights_step(res):
        weights = ResidualWeights(torch.ones(len(res.target_layers))).to(device)
        opt = torch.optim.AdamW(weights.parameters(), lr=1e-2)

        def step() -> None:
            eps, s = draws()
            opt.zero_grad(set_to_none=True)
            res.weights = weights()  # read by the hooks: this step's weights
            velocity_loss(velocity(noisy_latents(x0, eps, s), s), x0, eps).backward()
            torch.nn.utils.clip_grad_norm_([weights.raw], 1.0)
            opt.step()

        return step, weights

    variants = {"forward": forward, "frozen_fwd_bwd": frozen_fwd_bwd}
    weight_modules = {}
    for name, res in setups.items():
        variants[name], weight_modules[name] = weights_step(res)

    def setup(name: str):
        res = setups.get(name)  # the residual is attached only while its variant runs
        return res.attach(tr) if res is not None else contextlib.nullcontext()

    times = interleaved_times(
        variants, reps=args.reps, warmup=args.warmup, device=device, setup=setup
    )
    rows = summarize(times, "frozen_fwd_bwd")
    return {
        "shape": {
            "layers": args.layers,
            "width": d,
            "text_tokens": args.text_tokens,
            "image_tokens": (side // 2) ** 2,
            "batch": args.batch,
            "dtype": args.dtype,
            "device": str(device),
            "gradient_checkpointing": args.gradient_checkpointing,
            "clock": clock_label(device),
        },
        "load_average_start": load_start,
        "variants": rows,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape and few repetitions")
    p.add_argument(
        "--sd3-medium",
        action="store_true",
        help=f"SD3-medium shape: {SD3_MEDIUM.describe()}, {SD3_MEDIUM.image_tokens} image "
        f"tokens, batch {SD3_MEDIUM.batch}, bf16",
    )
    p.add_argument("--layers", type=int, default=None, help="blocks (CPU default 12)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (CPU default 4)")
    p.add_argument("--head-dim", type=int, default=SD3_MEDIUM.head_dim, help="head width (64)")
    p.add_argument("--image-tokens", type=int, default=None, help="CPU default 256")
    p.add_argument(
        "--text-tokens", type=int, default=SD3_MEDIUM.text_tokens, help="77 CLIP + 256 T5 (333)"
    )
    p.add_argument("--batch", type=int, default=None, help="batch (default 1; 2 with sd3)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.sd3_medium:
        defaults = dict(
            layers=SD3_MEDIUM.blocks,
            heads=SD3_MEDIUM.heads,
            image_tokens=SD3_MEDIUM.image_tokens,
            batch=SD3_MEDIUM.batch,
            reps=10,
            dtype="bfloat16",
        )
    elif args.quick:
        defaults = dict(layers=6, heads=2, image_tokens=64, batch=1, reps=3, dtype="float32")
    else:
        defaults = dict(layers=12, heads=4, image_tokens=256, batch=1, reps=10, dtype="float32")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    result = run(args)
    result["load_average_end"] = list(os.getloadavg())
    shape = result["shape"]
    print(
        f"{shape['layers']} blocks, width {shape['width']}, {shape['text_tokens']} text + "
        f"{shape['image_tokens']} image tokens, batch {shape['batch']}, {shape['dtype']}, "
        f"{shape['device']} ({shape['clock']}); load {result['load_average_start'][0]:.1f} -> "
        f"{result['load_average_end'][0]:.1f}"
    )
    print(f"{'variant':34s} {'median ms':>10s} {'ratio':>7s} {'paired':>7s}")
    for name, row in result["variants"].items():
        print(
            f"{name:34s} {1000 * row['median_s']:10.1f} {row['ratio']:7.3f} "
            f"{row['paired_ratio']:7.3f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
