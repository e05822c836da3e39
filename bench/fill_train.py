"""Training-step overhead of the semantic cross-attention over a LoRA-only step (spec F, seed 004).

The `train` section of `bench/fill.py` (also runnable alone). One FLUX-shaped
`FluxTransformer2DModel` (random weights; FLUX.1-Fill's 384 input = 64 latent + 320 condition
channels, 64 output channels, head dim 128 with FLUX's RoPE axes 16/56/56, guidance embedding,
4096-wide T5 context) sized for a shared CPU, with peft LoRA on diffusers' default FLUX targets.
Two variants of one full training step (forward, flow-matching MSE, backward, AdamW step) run in
the same process, interleaved in a fresh random order each round:

- `lora`: `SemanticFillTransformer` without the module (the plain LoRA trainer);
- `lora+semantic`: the same with `SemanticCrossAttention(64, heads=8, layers=1)` (scale set to
  0.5, as after training, so its attention path is live) on the noisy latent tokens.

Reported: median step time of each (thread CPU time with one torch thread: robust on a shared
machine), the ratio, the median of per-round ratios, the parameter counts, and an analytic
FLOP estimate of the module's share at the real FLUX.1-Fill-dev size (19 + 38 blocks, width 3072,
2048 image + 512 text tokens). AdamW runs the kernel `fill train` picks (fused when every parameter
is on CUDA).

`--compile` (issue 18's row F): after the eager rounds (and the JSON with them, so a time limit
hit while compiling keeps them) the trainable modules are compiled in place as `fill train` with
`compile: true` does (`engine.compile.speed_up_modules`: the transformer's blocks regionally, the
semantic module whole) and both steps timed again, the row's `lora+semantic` first (its figures
written before `lora` compiles): first compiled step (wall clock), cold start = setup + first step
- steady step, steady seconds per step, FLOPs (the eager count: the same arithmetic) and MFU,
under `train.compiled`.

    python bench/fill.py --section train [--train-layers 2 --train-single-layers 4 ...]
    python bench/fill_train.py [--quick] [--device cuda --dtype bfloat16 --flux-size] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/rows.py, timing.py

from sizes import FLUX1  # noqa: E402
from timing import (  # noqa: E402
    break_even_text,
    cold_start,
    compile_payoff,
    interleaved_times,
    summarize,
    time_once,
)


def build(args, device, dtype):
    """(model without module, model with module, inputs, optimizers) sharing one transformer."""
    from diffusers import FluxTransformer2DModel

    from diffalign.engine.compile import uses_fused_adamw
    from diffalign.fill import SemanticCrossAttention
    from diffalign.fill.model import SemanticFillTransformer, add_lora, lora_parameters

    torch.manual_seed(0)
    head_dim = FLUX1.head_dim
    with torch.device(device):  # built where it runs: a GPU initialises 12 B parameters at once
        tr = FluxTransformer2DModel(
            patch_size=1,
            in_channels=384,
            out_channels=64,
            num_layers=args.train_layers,
            num_single_layers=args.train_single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=args.train_heads,
            joint_attention_dim=FLUX1.text_dim,
            pooled_projection_dim=FLUX1.pooled_dim,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ).to(dtype=dtype)
    add_lora(tr, rank=args.train_rank, targets="default")
    if args.train_checkpointing:
        tr.enable_gradient_checkpointing()
    semantic = SemanticCrossAttention(64, heads=8, layers=1).to(device)
    with torch.no_grad():
        semantic.layers[0].scale.fill_(0.5)
    plain = SemanticFillTransformer(tr, None, guidance=30.0)
    with_module = SemanticFillTransformer(tr, semantic, guidance=30.0)

    # a [visible | target] diptych of two panel x panel panels -> (panel/16) x (2 panel/16) tokens
    h, w = args.train_panel // 16, 2 * args.train_panel // 16
    L, T, B = h * w, args.train_text_tokens, args.train_batch
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(
        x0=r(B, L, 64),
        x1=r(B, L, 64),
        cond=r(B, L, 320),
        sem=r(B, L, 64),
        pe=r(B, T, FLUX1.text_dim),
        pooled=r(B, FLUX1.pooled_dim),
        txt=torch.zeros(T, 3, device=device, dtype=dtype),
        img=ids.reshape(L, 3).to(device=device, dtype=dtype),
    )
    lora = lora_parameters(tr)
    # the kernel `fill train` runs (the loop's choice: fused when every parameter is on CUDA)
    kernel = {"fused": True} if uses_fused_adamw([*lora, *semantic.parameters()]) else {}
    opts = {
        "lora": torch.optim.AdamW(lora, lr=1e-4, **kernel),
        "lora+semantic": torch.optim.AdamW(
            [{"params": lora}, {"params": list(semantic.parameters()), "lr": 1e-4}],
            lr=1e-4,
            **kernel,
        ),
    }
    models = {"lora": plain, "lora+semantic": with_module}
    counts = {
        "transformer_parameters": sum(p.numel() for p in tr.parameters()),
        "lora_parameters": sum(p.numel() for p in lora),
        "semantic_parameters": semantic.num_parameters(),
        "image_tokens": L,
        "text_tokens": T,
    }
    return models, opts, inputs, counts


def step(model, opt, x, device) -> None:
    """One flow-matching training step (seed 004 sections 2.4-6)."""
    from diffalign.fill.flow import flow_matching_loss, interpolate, velocity_target

    t = torch.full((x["x0"].shape[0],), 0.5, device=device)
    xt = interpolate(x["x0"], x["x1"], t)
    # a half-precision base trains under autocast, as `fill train` (mixed_precision bf16) does
    half = x["x0"].dtype != torch.float32
    with torch.autocast(device.type, dtype=x["x0"].dtype, enabled=half):
        pred = model(
            xt, x["cond"], t.to(xt.dtype), x["pe"], x["pooled"], x["txt"], x["img"], x["sem"]
        )
    loss = flow_matching_loss(pred.float(), velocity_target(x["x0"], x["x1"]).float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _step_flops(model, opt, x, device, checkpointing: bool) -> int:
    """Model FLOPs of one step (bench/rows.py: matmul, conv and attention, forward + backward).

    Under gradient checkpointing the backward recomputes each block's forward: those FLOPs are
    counted by the counter but are not model FLOPs, so one forward (under no_grad) is
    subtracted."""
    from rows import count_flops

    total = count_flops(lambda: step(model, opt, x, device))
    if not checkpointing:
        return total
    from diffalign.fill.flow import interpolate

    def forward() -> None:
        t = torch.full((x["x0"].shape[0],), 0.5, device=device)
        xt = interpolate(x["x0"], x["x1"], t)
        half = x["x0"].dtype != torch.float32
        with torch.no_grad(), torch.autocast(device.type, dtype=x["x0"].dtype, enabled=half):
            model(xt, x["cond"], t.to(xt.dtype), x["pe"], x["pooled"], x["txt"], x["img"], x["sem"])

    return total - count_flops(forward)


def _mfu(flops: int, seconds: float, device_name: str):
    from rows import mfu

    value = mfu(flops, seconds, device_name)
    return None if value is None else round(value, 2)


def _wall(device) -> float:
    """Wall clock after the device's queued work (compile time counts whichever thread runs it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def flux_flop_share(
    image_tokens: int = 2048,
    text_tokens: int = FLUX1.text_tokens,
    width: int = FLUX1.width,
    joint: int = FLUX1.blocks,
    single: int = FLUX1.single_blocks,
) -> dict:
    """Analytic forward FLOPs of the module vs a FLUX transformer (default: FLUX.1-Fill-dev):
    2 x params x tokens for the block linears (joint 36 w^2, single 15 w^2) + attention
    4 x N^2 x width per block; module: 4 projections of 64 x 64 + attention 4 x L^2 x 64."""
    n = image_tokens + text_tokens
    params_per_joint = 2 * (4 * width * width + 2 * 4 * width * width) + 2 * 6 * width * width
    params_per_single = 3 * width * width + 4 * width * width + 5 * width * width + 3 * width**2
    linear = 2 * n * (joint * params_per_joint + single * params_per_single)
    attention = 4 * n * n * width * (joint + single)
    transformer = linear + attention
    dim = 64
    module = 2 * image_tokens * 4 * dim * dim + 4 * image_tokens * image_tokens * dim
    return {
        "transformer_gflop": transformer / 1e9,
        "module_gflop": module / 1e9,
        "module_share": module / transformer,
    }


def train_section(args, save=None) -> dict:
    """Both steps eager (then compiled with `--compile`; `save(result)` is called with the eager
    figures first)."""
    if getattr(args, "quick", False):  # a 1 + 1-block model at 128 px, 2 rounds
        args.train_layers, args.train_single_layers, args.train_panel = 1, 1, 128
        args.train_rounds = 2
    device = torch.device(getattr(args, "device", None) or "cpu")
    # as `fill train` (its cudnn_attention option): cuDNN's SDPA failed in this step's backward
    # at FLUX.1-Fill size on an H200 with torch 2.11 (illegal memory access)
    torch.backends.cuda.enable_cudnn_sdp(bool(getattr(args, "cudnn_attention", False)))
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    torch.set_num_threads(getattr(args, "threads", 1) or 1)
    models, opts, inputs, counts = build(args, device, dtype)
    names = list(models)
    # one warm-up round, then shuffled rounds (bench/timing.py)
    times = interleaved_times(
        {n: (lambda n=n: step(models[n], opts[n], inputs, device)) for n in names},
        reps=args.train_rounds,
        warmup=1,
        device=device,
    )
    stats = summarize(times, "lora")  # medians, ratios and per-round ratios to plain LoRA
    med = {n: stats[n]["median_s"] for n in names}
    ckpt = bool(args.train_checkpointing)
    flops = {n: _step_flops(models[n], opts[n], inputs, device, ckpt) for n in names}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "config": {
            "layers": args.train_layers,
            "single_layers": args.train_single_layers,
            "heads": args.train_heads,
            "width": args.train_heads * FLUX1.head_dim,
            "panel": args.train_panel,
            "batch": args.train_batch,
            "rank": args.train_rank,
            "rounds": args.train_rounds,
            "gradient_checkpointing": args.train_checkpointing,
            "device": str(device),
            "dtype": str(dtype),
        },
        **counts,
        "median_s": med,
        "times": times,
        "device_name": device_name,
        "flops_per_step": flops,
        "mfu_pct": {n: _mfu(flops[n], med[n], device_name) for n in names},
        "ratio": stats["lora+semantic"]["ratio"],
        # median of the per-round ratios: robust to drifts of a shared machine
        "paired_overhead": stats["lora+semantic"]["paired_ratio"] - 1.0,
        "flux_estimate": flux_flop_share(),
        "this_shape_estimate": flux_flop_share(
            counts["image_tokens"],
            counts["text_tokens"],
            args.train_heads * FLUX1.head_dim,
            args.train_layers,
            args.train_single_layers,
        ),
        "fused_adamw": bool(opts["lora"].defaults.get("fused")),
    }
    print(markdown_train(result))
    if getattr(args, "compile", False):
        if save is not None:
            save(result)  # the eager figures survive a time limit hit while compiling
        result["compiled"] = train_compiled(
            args,
            models,
            opts,
            inputs,
            device,
            result,
            None if save is None else lambda c: save({**result, "compiled": c}),
        )
        print(markdown_compiled(result["compiled"]))
    return result


def train_compiled(args, models, opts, inputs, device, eager: dict, save=None) -> dict:
    """The eager run's models compiled in place as `fill train` compiles its trainable modules
    (transformer, semantic module) with `compile: true`, then timed as the eager run, one variant
    after the other: the row's (`lora+semantic`) first, its figures saved (`save(partial)`) before
    the `lora` variant compiles again (its input tokens need no gradient: a new graph).

    Each variant's first compiled step is timed on the wall clock (inductor compiles in worker
    processes too); cold start = setup + the row's first step - its steady step; break-even =
    cold start / seconds saved per step against eager. FLOPs per step are the eager count
    (compiling changes the kernels, not the model's arithmetic)."""
    from diffalign.engine.compile import speed_up_modules

    with_module = models["lora+semantic"]
    modules = {"transformer": with_module.transformer, "semantic": with_module.semantic}
    t0 = _wall(device)
    how = speed_up_modules(modules, device, compile=True)
    setup = _wall(device) - t0
    out: dict = {
        "compiled_as": how,
        "setup_s": round(setup, 3),
        "first_step_s": {},
        "median_s": {},
        "times": {},
        "flops_per_step": {},
        "flops_counted": "the eager step's count (same arithmetic; bench/rows.py convention)",
        "mfu_pct": {},
        "speedup": {},
    }
    row = "lora+semantic"
    for name in (row, "lora"):
        t0 = _wall(device)
        step(models[name], opts[name], inputs, device)
        out["first_step_s"][name] = round(_wall(device) - t0, 3)
        times = [
            time_once(lambda name=name: step(models[name], opts[name], inputs, device), device)
            for _ in range(args.train_rounds)
        ]
        med = statistics.median(times)
        out["times"][name], out["median_s"][name] = times, med
        out["flops_per_step"][name] = eager["flops_per_step"][name]
        out["mfu_pct"][name] = _mfu(eager["flops_per_step"][name], med, eager["device_name"])
        out["speedup"][name] = round(eager["median_s"][name] / med, 3)
        if name == row:
            cold = cold_start(out["first_step_s"][row], med, setup)
            out.update(compile_payoff(cold, eager["median_s"][row], med))
            if save is not None:
                save(out)  # the row's compiled figures survive a limit hit in the next compile
    out["ratio"] = out["median_s"][row] / out["median_s"]["lora"]
    return out


def markdown_compiled(c: dict) -> str:
    return (
        f"compiled ({c['compiled_as']}): "
        + ", ".join(
            f"{n} {s:.3f} s ({c['speedup'][n]:.2f}x eager, MFU % {c['mfu_pct'][n]})"
            for n, s in c["median_s"].items()
        )
        + f"; cold start {c['cold_start_s']:.1f} s (first steps {c['first_step_s']}), "
        + break_even_text(c["break_even_steps"])
        + f"; ratio to LoRA-only {c['ratio']:.3f}"
    )


def markdown_train(r: dict) -> str:
    c = r["config"]
    lines = [
        f"FLUX-shaped transformer: {c['layers']} joint + {c['single_layers']} single blocks, "
        f"width {c['width']}, {r['transformer_parameters'] / 1e6:.1f}M parameters; LoRA rank "
        f"{c['rank']} ({r['lora_parameters']:,}); {r['image_tokens']} image + "
        f"{r['text_tokens']} text tokens, batch {c['batch']}, {c['dtype']} on {c['device']}",
        "",
        "| step | median s | ratio to LoRA-only |",
        "|---|---|---|",
        f"| LoRA only | {r['median_s']['lora']:.3f} | 1.000 |",
        f"| LoRA + semantic cross-attention ({r['semantic_parameters']:,} params) | "
        f"{r['median_s']['lora+semantic']:.3f} | {r['ratio']:.3f} |",
        "",
        f"paired overhead (median of per-round ratios): {100 * r['paired_overhead']:+.2f}%",
        "model FLOPs per step (bench/rows.py count): "
        + ", ".join(f"{n} {f / 1e12:.3f} TFLOP" for n, f in r["flops_per_step"].items())
        + "; MFU %: "
        + ", ".join(f"{n} {m}" for n, m in r["mfu_pct"].items()),
        f"module share of forward FLOPs at this shape: "
        f"{100 * r['this_shape_estimate']['module_share']:.3f}%",
        f"estimate at FLUX.1-Fill-dev size (2048 + {FLUX1.text_tokens} tokens): module "
        f"{r['flux_estimate']['module_gflop']:.2f} GFLOP vs transformer "
        f"{r['flux_estimate']['transformer_gflop']:.0f} GFLOP per forward "
        f"({100 * r['flux_estimate']['module_share']:.4f}%)",
    ]
    return "\n".join(lines)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Options of the train section (prefixed, so they sit beside the attention ones)."""
    p.add_argument("--train-layers", type=int, default=2, help="joint blocks (FLUX: 19)")
    p.add_argument("--train-single-layers", type=int, default=4, help="single blocks (FLUX: 38)")
    p.add_argument("--train-heads", type=int, default=4, help="heads of 128 (FLUX: 24)")
    p.add_argument("--train-panel", type=int, default=256, help="panel px (FLUX Fill: 512)")
    p.add_argument("--train-batch", type=int, default=1, help="batch size")
    p.add_argument("--train-text-tokens", type=int, default=128, help="T5 tokens (FLUX: 512)")
    p.add_argument("--train-rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--train-rounds", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--train-checkpointing", action="store_true", help="gradient checkpointing")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_train_options(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--quick", action="store_true", help="a 1+1-block model, 128 px, 2 rounds")
    p.add_argument(
        "--flux-size",
        action="store_true",
        help=f"FLUX.1-Fill-dev size ({FLUX1.describe()}, 512 px, {FLUX1.text_tokens} text "
        "tokens; GPU)",
    )
    p.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="let SDPA use cuDNN's kernels on CUDA (off, as in `fill train`)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="then both steps compiled as `fill train` with `compile: true` (train.compiled)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _write_json(path: str | None, result: dict) -> None:
    if path:
        from diffalign.engine.io import write_json  # atomic: a kill mid-write keeps the last

        write_json(path, result)


# --flux-size: FLUX.1-Fill-dev's shape (two 512 px panels), with gradient checkpointing
FLUX_SIZE = dict(
    train_layers=FLUX1.blocks,
    train_single_layers=FLUX1.single_blocks,
    train_heads=FLUX1.heads,
    train_panel=512,
    train_text_tokens=FLUX1.text_tokens,
    train_checkpointing=True,
)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.flux_size:  # the shape's values as defaults: options given beside it still win
        p.set_defaults(**FLUX_SIZE)
        args = p.parse_args(argv)
    print(f"load average {os.getloadavg()}, torch {torch.__version__}")
    result = {"loadavg": os.getloadavg()}
    result["train"] = train_section(args, lambda r: _write_json(args.json, {**result, "train": r}))
    result["loadavg_end"] = os.getloadavg()
    print(f"load average at the end {result['loadavg_end']}")
    _write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
