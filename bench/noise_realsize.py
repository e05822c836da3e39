"""Test-time noise optimisation at SDXL-Turbo's real size (spec N; GPU row of issue 7).

The tiny `make-tiny sdxl` / `make-tiny clip` folders are loaded through the real loading path
(`load_generator`, `load_reward`) for their tokenizers, scheduler and code path; then the
pipeline's U-Net, VAE and two text encoders and the reward's CLIP model are replaced by
randomly initialised models of the released sizes, built on the device:

- U-Net: SDXL's (2.6 B parameters: 320/640/1280 channels, 1/2/10 transformer layers,
  cross-attention 2048, text_time conditioning), 4x64x64 latents = 512 px (SDXL-Turbo);
- VAE: SDXL's (128/256/512/512, scale 0.13025), upcast to float32 as the generator does;
- text encoders: CLIP ViT-L/14's text tower and OpenCLIP bigG's (1280 wide, 32 layers);
- reward: CLIP ViT-L/14 (`--reward clip`, ReNO's CLIP term).

Timed, interleaved, medians: `optimize_prompts` (ours: Q per prompt, AdamW, best tracking)
against the bare loop (generator + reward forward/backward w.r.t. a leaf noise), per step, at
B = 1 and 4; and the peak CUDA memory of each. ReNO (its paper) reports 20-50 s per image for
50 iterations with four rewards on an A100, i.e. 0.4-1 s per step.

With `--compile` (or `--cuda-graphs`), after the eager runs the generator's forward and the
reward's layers are compiled in place (`noise.onestep.compile_generator`, as `noise optimize
--compile`) and the B = 1 run is measured again: the first compiled run's extra time is the cold
start; break-even = cold start / time saved per step (`compiled` in the JSON, which
`bench/rows.py` then takes for the `noise_b1_step` row).

    python bench/noise_realsize.py --device cuda [--dtype bfloat16] [--steps 5] [--json out.json]
    python bench/noise_realsize.py --device cuda --compile [--cuda-graphs]
    python bench/noise_realsize.py --device cpu --width-div 16 --steps 1   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffalign.engine.io import write_json  # noqa: E402
from noise_optimize import PROMPTS, _models, _time, bare_run, ours_run  # noqa: E402
from timing import break_even_text, cold_start, compile_payoff  # noqa: E402


def real_unet(div: int = 1):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320 // div, 640 // div, 1280 // div),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10) if div == 1 else (1, 1, 1),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=(768 + 1280) // div,  # the two text encoders' widths
        norm_num_groups=32 // div if div > 1 else 32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 // div + 6 * 256,  # pooled + time ids
    )


def real_vae(div: int = 1):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(c // div for c in (128, 256, 512, 512)),
        norm_num_groups=32 // div if div > 1 else 32,
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
    )


def _text_config(width: int, layers: int, heads: int, act: str, div: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width // div,
        intermediate_size=4 * width // div,
        num_hidden_layers=layers if div == 1 else 2,
        num_attention_heads=heads if div == 1 else 2,
        max_position_embeddings=77,
        projection_dim=width // div,
        hidden_act=act,
    )


def real_text_encoders(div: int = 1):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    one = CLIPTextModel(_text_config(768, 12, 12, "quick_gelu", div))
    two = CLIPTextModelWithProjection(_text_config(1280, 32, 20, "gelu", div))
    return one, two


def real_clip(div: int = 1):
    from transformers import CLIPConfig, CLIPModel

    text = _text_config(768, 12, 12, "quick_gelu", div).to_dict()
    vision = dict(
        hidden_size=1024 // div,
        intermediate_size=4096 // div,
        num_hidden_layers=24 if div == 1 else 2,
        num_attention_heads=16 if div == 1 else 2,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768 // div))


def build(tmp: Path, device: str, dtype: torch.dtype, div: int):
    """The real loading path on the tiny folders, then real-size random modules swapped in."""
    from diffalign.engine.rewards import load_reward
    from diffalign.noise.generators import GENERATORS, DiffusionOneStepGenerator, load_generator

    sdxl, clip = _models(tmp)
    tiny = load_generator(str(sdxl), "sdxl-turbo", height=512, width=512, device="cpu")
    pipe = tiny.pipe
    torch.manual_seed(0)
    with torch.device(device):
        pipe.unet = real_unet(div).to(dtype)
        pipe.vae = real_vae(div).to(dtype)
        one, two = real_text_encoders(div)
        pipe.text_encoder, pipe.text_encoder_2 = one.to(dtype), two.to(dtype)
        model = real_clip(div).to(dtype)
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        tok.model_max_length = 77
    gen = DiffusionOneStepGenerator(pipe, GENERATORS["sdxl-turbo"], height=512, width=512)
    reward = load_reward("clip", device=device, clip_model=str(clip))
    model.requires_grad_(False).eval()
    for m in reward.modules():  # the CLIP term and its bundle share the swapped-in model
        if hasattr(m, "bundle"):
            m.model = m.bundle.model = model
            m.bundle.size = 224
    params = {
        "unet": sum(p.numel() for p in pipe.unet.parameters()),
        "vae": sum(p.numel() for p in pipe.vae.parameters()),
        "text_encoders": sum(p.numel() for p in one.parameters())
        + sum(p.numel() for p in two.parameters()),
        "reward_clip": sum(p.numel() for p in model.parameters()),
    }
    return gen, reward, params


def _kernel_seconds(fn) -> float:
    """Seconds the GPU spends in kernels during ``fn()`` (`device_seconds` of its profile):
    the step's floor once Python and launch overhead are gone."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return device_seconds(prof.key_averages())


def device_seconds(events) -> float:
    """Seconds of device work in profiler events (`prof.key_averages()` or `prof.events()`):
    the sum of the device's own events (kernels, copies, memsets), as the total line of
    torch's profiler table. Kineto links each kernel to the CPU op that launched it too (the
    op's `self_device_time_total`), so summing that over every event would count each kernel
    twice; a CPU event counts only in the legacy profiler (`is_legacy`: its kernel time is
    stored on the CPU event alone)."""
    from torch.autograd import DeviceType

    total_us = 0.0
    for ev in events:
        if ev.device_type == DeviceType.CPU and not ev.is_legacy:
            continue
        total_us += ev.self_device_time_total
    return total_us / 1e6


def measure(gen, reward, device: str, batch: int, steps: int, repeats: int) -> dict:
    prompts = PROMPTS[:batch]
    noise = gen.sample_noise(1, generator=torch.Generator().manual_seed(0)).repeat(batch, 1, 1, 1)
    runs = {"bare": bare_run, "ours": ours_run}
    for fn in runs.values():  # warm-up
        fn(gen, reward, prompts, noise, 1)
    times: dict[str, list[float]] = {k: [] for k in runs}
    peak: dict[str, int] = {}
    for r in range(repeats):
        for name, fn in runs.items() if r % 2 == 0 else reversed(runs.items()):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = _time(lambda fn=fn: fn(gen, reward, prompts, noise, steps), device)
            times[name].append(t / (steps + 1))
            if device.startswith("cuda"):
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() - base)
    med = {k: statistics.median(v) for k, v in times.items()}
    kernel = None
    if device.startswith("cuda"):  # GPU kernel time of our run: the floor a launch-free step has
        kernel = _kernel_seconds(lambda: ours_run(gen, reward, prompts, noise, steps))
    out = {
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "bare_s_per_step": round(med["bare"], 4),
        "ours_s_per_step": round(med["ours"], 4),
        "time_ratio": round(med["ours"] / med["bare"], 4),
        "s_per_prompt_step_ours": round(med["ours"] / batch, 4),
        "ours_times": [round(t, 5) for t in times["ours"]],
        "bare_times": [round(t, 5) for t in times["bare"]],
    }
    if kernel is not None and kernel > 0:
        out["kernel_s_per_step"] = round(kernel / (steps + 1), 5)
        out["step_over_kernel"] = round(med["ours"] / out["kernel_s_per_step"], 3)
    elif kernel is not None:  # no CUDA events (the profiler's CUPTI unavailable): no ratio
        out["kernel_profile"] = "the profiler recorded no GPU kernels"
        print(f"B={batch}: the profiler recorded no GPU kernels (CUPTI?)", file=sys.stderr)
    if peak:
        out["peak_cuda_gib"] = {k: round(v / 2**30, 2) for k, v in peak.items()}
    return out


def measure_compiled(
    gen, reward, device: str, steps: int, repeats: int, eager: dict, cuda_graphs: bool
) -> dict:
    """Compile in place, then the B = 1 run again: cold start and break-even against `eager`."""
    from diffalign.noise.onestep import compile_generator

    t0 = time.perf_counter()
    compiled_as = compile_generator(gen, cuda_graphs=cuda_graphs, reward=reward)
    setup = time.perf_counter() - t0
    prompts = PROMPTS[:1]
    noise = gen.sample_noise(1, generator=torch.Generator().manual_seed(0))
    first = _time(lambda: ours_run(gen, reward, prompts, noise, steps), device)
    run = measure(gen, reward, device, 1, steps, repeats)
    cold = cold_start(first, run["ours_s_per_step"] * (steps + 1), setup)
    payoff = compile_payoff(cold, eager["ours_s_per_step"], run["ours_s_per_step"])
    return {
        "cuda_graphs": cuda_graphs,
        "compiled": compiled_as,
        "first_run_s": round(first, 3),
        "cold_start_s": payoff["cold_start_s"],
        "speedup": round(eager["ours_s_per_step"] / run["ours_s_per_step"], 3),
        "break_even_steps": payoff["break_even_steps"],
        "runs": [run],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    p.add_argument("--steps", type=int, default=5, help="optimisation steps per run (5)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats (3)")
    p.add_argument("--batches", default="1,4", help="prompt batch sizes (1,4)")
    p.add_argument("--width-div", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help="also the compiled B = 1 run")
    p.add_argument("--cuda-graphs", action="store_true", help="compiled with CUDA graphs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.dtype
    ]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gen, reward, params = build(Path(tmp), args.device, dtype, args.width_div)
        built = time.perf_counter() - t0
        results = {
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "dtype": args.dtype,
            "image_size": 512,
            "latent": list(gen.latent_shape()),
            "parameters": params,
            "build_seconds": round(built, 1),
            "runs": [
                measure(gen, reward, args.device, int(b), args.steps, args.repeats)
                for b in args.batches.split(",")
            ],
        }
        eager_b1 = next((r for r in results["runs"] if r["batch"] == 1), None)
        if (args.compile or args.cuda_graphs) and eager_b1 is not None:
            if args.json:  # the eager rows survive a time limit hit while compiling
                write_json(args.json, results)  # atomic: a kill keeps the eager JSON
            results["compiled"] = measure_compiled(
                gen, reward, args.device, args.steps, args.repeats, eager_b1, args.cuda_graphs
            )
    print(
        f"SDXL-Turbo size ({params['unet'] / 1e9:.2f} B U-Net), 512 px, {args.dtype} on "
        f"{results['device']}, CLIP ViT-L/14 reward, {args.steps} steps, medians"
    )
    for r in results["runs"]:
        mem = r.get("peak_cuda_gib", {})
        print(
            f"B={r['batch']}: bare {r['bare_s_per_step']:.3f} s/step, ours "
            f"{r['ours_s_per_step']:.3f} s/step, ratio {r['time_ratio']:.3f}"
            + (f", peak {mem.get('bare')} / {mem.get('ours')} GiB" if mem else "")
            + (
                f", GPU kernels {r['kernel_s_per_step']:.3f} s/step "
                f"(step / kernels {r['step_over_kernel']:.2f})"
                if "kernel_s_per_step" in r
                else ""
            )
        )
    c = results.get("compiled")
    if c:
        r = c["runs"][0]
        print(
            f"compiled{' + CUDA graphs' if c['cuda_graphs'] else ''} B=1: ours "
            f"{r['ours_s_per_step']:.3f} s/step ({c['speedup']:.2f}x eager), cold start "
            f"{c['cold_start_s']:.1f} s, "
            + break_even_text(c["break_even_steps"])
            + (f", step / kernels {r['step_over_kernel']:.2f}" if "step_over_kernel" in r else "")
        )
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
