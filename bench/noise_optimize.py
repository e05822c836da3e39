"""Benchmark of test-time noise optimisation (spec N; issue 7 "Benchmarks").

1. **Overhead per step**: `optimize_prompts` (PatchOrthogonal Q per prompt, Q z, AdamW, best
   tracking, history) against the *bare* loop that differentiates the same generator + reward
   with respect to a plain leaf noise tensor (no Q, no optimiser, no bookkeeping). Both do the
   same work otherwise: encode the prompts once, ``steps`` forward/backward passes and one final
   forward. Time: medians of interleaved repeats. Memory (CPU): growth of the process's peak RSS
   over the run, each variant in its own child process (``ru_maxrss`` after setup vs after the
   run, median of 3), on CUDA ``max_memory_allocated``; and, deterministic, the bytes autograd
   saves for the backward pass per step (saved-tensor hooks: the activation memory).
2. **Batched prompts**: per-prompt time of optimising B = 1, 4, 8 prompts as one batch (one Q
   each) against B runs of one prompt (ReNO's batch 1).
3. **build-dataset throughput**: samples per second of `diffalign noise build-dataset` with 1
   process and with 2 processes under `accelerate launch` (CPU: gloo), on the same pairs; time
   = the builder's `work_seconds` (from the moment every process is ready to the merged
   manifest: assignment, writing, merge; not the interpreter start and model load), ratio =
   2-process / 1-process samples/s.

4. **--compile** (issue 18): one prompt's optimisation step eager, then with the generator's
   forward and the reward's layers compiled in place (`noise.onestep.compile_generator`), in
   the same run: seconds per step each (medians of the repeats), the compile cold start (the
   first compiled run minus a warm compiled run of the same length) and the break-even number
   of steps (cold start / time saved per step; none when the compiled step is not faster).
   `--cuda-graphs` adds CUDA graphs (CUDA only).

Models: the tiny SDXL-Turbo pipeline of `make-tiny sdxl` and the tiny CLIP of `make-tiny clip`
(random weights, real architectures and code paths), at 128 px unless told otherwise.

    python bench/noise_optimize.py [--quick] [--size 128] [--steps 5] [--json PATH]
    python bench/noise_optimize.py --only-dataset [--dataset-items 16]   # section 3 only
    python bench/noise_optimize.py --only-compile [--size 64] [--cuda-graphs]   # section 4 only
    python bench/noise_optimize.py --generator flux-schnell [--flux-sizes tiny,mid]

With ``--generator flux-schnell`` (issue 17) section 1 runs on the few-step FLUX.1-schnell
generator (1 step, packed latents) instead: step time of `optimize_prompts` against the bare
generator + reward backward in the same run, and the bytes saved for backward, at the sizes of
``--flux-sizes``: ``tiny`` (`make-tiny flux-schnell` defaults, 128 px), ``mid`` (4 double + 8
single blocks of width 128, 256 px) and ``full`` (FLUX.1-schnell's own transformer shape: 19 +
38 blocks of width 3072, random weights in bf16, 1024 px; for a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py, sizes.py
from sizes import FLUX1  # noqa: E402
from timing import break_even, break_even_text, cold_start, time_once  # noqa: E402

PROMPTS = [
    "a cinematic portrait of a girl in soft light",
    "a red bicycle leaning on a wall",
    "a bowl of ramen, top view",
    "a lighthouse in a storm",
    "an astronaut riding a horse",
    "a cat wearing sunglasses",
    "a watercolor of a mountain lake",
    "a neon city street at night",
]


def _models(tmp: Path):
    from diffalign.engine.tiny import make_tiny

    for kind in ("sdxl", "clip"):
        if not (tmp / kind).is_dir():
            make_tiny(kind, tmp / kind)
    return tmp / "sdxl", tmp / "clip"


def _setup(tmp: Path, size: int, device: str):
    from diffalign.engine.rewards import load_reward
    from diffalign.noise.generators import load_generator

    sdxl, clip = _models(tmp)
    gen = load_generator(str(sdxl), "sdxl-turbo", height=size, width=size, device=device)
    reward = load_reward("clip", device=device, clip_model=str(clip))
    return gen, reward


def bare_run(gen, reward, prompts, noise, steps: int) -> None:
    """The baseline: generator + reward forward/backward w.r.t. a plain leaf noise."""
    embeds = gen.encode_prompts(prompts)
    z = noise.clone().to(gen.device).requires_grad_(True)
    for _ in range(steps):
        z.grad = None
        (-reward(gen.generate(z, embeds), prompts).sum()).backward()
    with torch.no_grad():
        reward(gen.generate(z, embeds), prompts)


def ours_run(gen, reward, prompts, noise, steps: int) -> None:
    from diffalign.noise.optimize import OptimizeSettings, optimize_prompts

    optimize_prompts(gen, reward, prompts, noise, OptimizeSettings(steps=steps, lr=0.01))


def _time(fn, device: str) -> float:
    """Wall-clock seconds of one call (CUDA synchronised around it; bench/timing.py)."""
    return time_once(fn, device, clock=time.perf_counter)


def overhead(gen, reward, steps: int, repeats: int, device: str, batch: int = 1) -> dict:
    prompts = PROMPTS[:batch]
    noise = gen.sample_noise(1, generator=torch.Generator().manual_seed(0)).repeat(batch, 1, 1, 1)
    runs = {"bare": bare_run, "ours": ours_run}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn(gen, reward, prompts, noise, 1)
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_time(lambda fn=fn: fn(gen, reward, prompts, noise, steps), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": batch,
        "steps": steps,
        "bare_s_per_step": med["bare"] / (steps + 1),
        "ours_s_per_step": med["ours"] / (steps + 1),
        "time_ratio": med["ours"] / med["bare"],
        "repeats": repeats,
    }


def batching(gen, reward, steps: int, repeats: int, device: str, sizes=(1, 4, 8)) -> list[dict]:
    noise1 = gen.sample_noise(1, generator=torch.Generator().manual_seed(0))
    ours_run(gen, reward, PROMPTS[:1], noise1, 1)  # warm-up
    out = []
    for b in sizes:
        prompts = PROMPTS[:b]
        noise = noise1.repeat(b, 1, 1, 1)
        batched, single = [], []
        for _ in range(repeats):
            batched.append(
                _time(lambda ps=prompts, n=noise: ours_run(gen, reward, ps, n, steps), device)
            )
            single.append(
                _time(
                    lambda ps=prompts: [ours_run(gen, reward, [q], noise1, steps) for q in ps],
                    device,
                )
            )
        tb, ts = statistics.median(batched), statistics.median(single)
        out.append(
            {
                "B": b,
                "batched_s_per_prompt_step": tb / b / (steps + 1),
                "one_at_a_time_s_per_prompt_step": ts / b / (steps + 1),
                "speedup": ts / tb,
            }
        )
    return out


def machinery_cost(steps: int, repeats: int, batches=(1, 4)) -> list[dict]:
    """Absolute per-step cost of the optimisation machinery alone at SDXL-Turbo's real latent
    size (4x64x64 = 512 px): the same two loops around a generator and reward that cost ~0, so
    the difference is Q, Q z, the optimiser and the bookkeeping."""
    from diffalign.engine.rewards import Reward
    from diffalign.noise.onestep import OneStepGenerator

    class FreeGenerator(OneStepGenerator):
        def encode_prompts(self, prompts):
            return {"prompt_embeds": torch.zeros(len(prompts), 77, 2048)}

        def latent_shape(self, height=None, width=None):
            return (4, 64, 64)

        def generate(self, noise, embeds):
            return torch.sigmoid(noise[:, :3])

    class FreeReward(Reward):
        def score(self, images, prompts):
            return images.mean((1, 2, 3))

    gen, reward = FreeGenerator(), FreeReward()
    out = []
    for b in batches:
        noise = gen.sample_noise(1).repeat(b, 1, 1, 1)
        times: dict[str, list[float]] = {"bare": [], "ours": []}
        for _ in range(repeats):
            for name, fn in (("bare", bare_run), ("ours", ours_run)):
                t = _time(
                    lambda fn=fn, ps=PROMPTS[:b], n=noise: fn(gen, reward, ps, n, steps), "cpu"
                )
                times[name].append(t / (steps + 1))
        bare, ours = statistics.median(times["bare"]), statistics.median(times["ours"])
        out.append({"batch": b, "machinery_ms_per_step": (ours - bare) * 1e3})
    return out


# make-tiny flux-schnell overrides, image size and dtype per --flux-sizes name
FLUX_SIZES: dict[str, tuple[dict, int, str]] = {
    "tiny": ({}, 128, "float32"),
    "mid": (
        {
            "num_layers": 4,
            "num_single_layers": 8,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "joint_attention_dim": 64,
            "clip_hidden_size": 64,
        },
        256,
        "float32",
    ),
    "full": (  # FLUX.1-schnell's transformer shape (text encoders and VAE stay tiny)
        {
            "num_layers": FLUX1.blocks,
            "num_single_layers": FLUX1.single_blocks,
            "num_attention_heads": FLUX1.heads,
            "attention_head_dim": FLUX1.head_dim,
            "joint_attention_dim": FLUX1.text_dim,
            "clip_hidden_size": FLUX1.pooled_dim,
        },
        1024,
        "bfloat16",
    ),
}


def flux_section(tmp: Path, sizes: list[str], steps: int, repeats: int, device: str) -> list:
    """Section 1 on FLUX.1-schnell (module doc): bare vs ours per step, saved bytes, memory."""
    from diffalign.engine.rewards import load_reward
    from diffalign.engine.tiny import make_tiny
    from diffalign.noise.generators import load_generator

    _, clip = _models(tmp)
    reward = load_reward("clip", device=device, clip_model=str(clip))
    out = []
    for name in sizes:
        overrides, size, dtype = FLUX_SIZES[name]
        folder = tmp / f"flux-schnell-{name}"
        if not folder.is_dir():
            make_tiny("flux-schnell", folder, **overrides)
        gen = load_generator(
            str(folder), "flux-schnell", height=size, width=size, device=device, dtype=dtype
        )
        params = sum(p.numel() for p in gen.transformer.parameters())
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        row = {
            "size": name,
            "image_size": size,
            "dtype": dtype,
            "transformer_params": params,
            "latent": list(gen.latent_shape()),
            **overhead(gen, reward, steps, repeats, device, 1),
        }
        if device.startswith("cuda"):
            row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            row["saved_for_backward"] = saved_for_backward(gen, reward, steps)
        out.append(row)
        del gen
    return out


def _print_flux(rows: list) -> None:
    for r in rows:
        extra = ""
        if "saved_for_backward" in r:
            sv = r["saved_for_backward"]
            extra = f", saved for backward {sv['ours'] / 2**20:.2f} MiB/step (x{sv['ratio']:.4f})"
        if "peak_cuda_gib" in r:
            extra = f", peak {r['peak_cuda_gib']:.1f} GiB"
        print(
            f"flux-schnell {r['size']} ({r['transformer_params'] / 1e6:.2f} M params, "
            f"{r['image_size']} px, {r['dtype']}): bare {r['bare_s_per_step'] * 1e3:.1f} ms/step,"
            f" ours {r['ours_s_per_step'] * 1e3:.1f} ms/step, ratio {r['time_ratio']:.3f}{extra}"
        )


def _child(args) -> int:
    """One variant in a fresh process: time and peak-memory growth of the run."""
    torch.manual_seed(0)
    gen, reward = _setup(Path(args.tmp), args.size, args.device)
    prompts = PROMPTS[: args.batch]
    noise = gen.sample_noise(1, generator=torch.Generator().manual_seed(0)).repeat(
        args.batch, 1, 1, 1
    )
    fn = bare_run if args.child == "bare" else ours_run
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = _time(lambda: fn(gen, reward, prompts, noise, args.steps), args.device)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"variant": args.child, "seconds": t, "peak_rss_growth_kib": rss1 - rss0}
    if args.device.startswith("cuda"):
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() - base
    print(json.dumps(out))
    return 0


def saved_for_backward(gen, reward, steps: int, batch: int = 1) -> dict:
    """Bytes autograd keeps for the backward passes of a run (the activation memory that sets a
    step's peak), counted with saved-tensor hooks; deterministic, unlike RSS."""
    prompts = PROMPTS[:batch]
    noise = gen.sample_noise(1, generator=torch.Generator().manual_seed(0)).repeat(batch, 1, 1, 1)
    out = {}
    for name, fn in (("bare", bare_run), ("ours", ours_run)):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gen, reward, prompts, noise, steps)
        out[name] = total[0] / steps
    return {
        "metric": "saved_for_backward_bytes_per_step",
        "bare": out["bare"],
        "ours": out["ours"],
        "ratio": out["ours"] / out["bare"],
    }


def memory(tmp: Path, size: int, steps: int, device: str, batch: int, repeats: int = 3) -> dict:
    """Peak memory growth of a whole run, each variant in fresh child processes (median)."""
    res: dict[str, list] = {"bare": [], "ours": []}
    key = "peak_cuda_bytes" if device.startswith("cuda") else "peak_rss_growth_kib"
    for _ in range(repeats):
        for variant in ("bare", "ours"):
            cmd = [sys.executable, __file__, "--child", variant, "--tmp", str(tmp)]
            cmd += ["--size", str(size), "--steps", str(steps), "--device", device]
            cmd += ["--batch", str(batch)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[variant].append(json.loads(line.strip().splitlines()[-1])[key])
    bare, ours = statistics.median(res["bare"]), statistics.median(res["ours"])
    return {
        "metric": key,
        "image_size": size,
        "bare": bare,
        "ours": ours,
        "ratio": ours / max(1, bare),
        "runs": res,
    }


def _write_pairs(root: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / f"{i:04d}.png")
        lines.append(
            json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "image": f"images/{i:04d}.png"})
        )
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def dataset_throughput(
    tmp: Path, size: int, steps: int, n_items: int, batch: int, threads: int
) -> dict:
    """build-dataset samples/s with 1 process and 2 processes (section 3 of the module doc)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from launch_helper import free_port

    sdxl, _ = _models(tmp)
    data = _write_pairs(tmp / "pairs", n_items, size)
    common = ["-m", "diffalign.cli", "noise", "build-dataset", "--data-root", str(data)]
    common += ["--model", str(sdxl), "--height", str(size), "--width", str(size)]
    common += ["--steps", str(steps), "--batch-size", str(batch), "--no-plots"]
    common += ["--num-intermediates", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DIFFALIGN_NO_PROGRESS": "1"}
    env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    out = {"items": n_items, "steps": steps, "batch": batch, "image_size": size}
    for procs in (1, 2):
        folder = tmp / f"ds-{procs}"
        if procs == 1:
            cmd = [sys.executable, *common]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
            cmd += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
            cmd += ["--dynamo_backend", "no", "--main_process_port", str(free_port()), *common]
        t0 = time.perf_counter()
        r = subprocess.run(
            [*cmd, "--output-dir", str(folder)], env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        summary = json.loads((folder / "summary.json").read_text())
        out[f"{procs}_process"] = {
            "finished": summary["finished"],
            "seconds": summary["work_seconds"],
            "samples_per_s": summary["finished"] / summary["work_seconds"],
            "wall_s_with_startup": round(wall, 2),
        }
    out["ratio_2_over_1"] = out["2_process"]["samples_per_s"] / out["1_process"]["samples_per_s"]
    return out


def compile_speed(
    gen, reward, steps: int, repeats: int, device: str, cuda_graphs: bool = False
) -> dict:
    """Section 4: eager vs compiled optimisation steps, cold start and break-even steps."""
    from diffalign.noise.onestep import compile_generator

    prompts = PROMPTS[:1]
    noise = gen.sample_noise(1, generator=torch.Generator().manual_seed(0))

    def run() -> float:
        return _time(lambda: ours_run(gen, reward, prompts, noise, steps), device)

    ours_run(gen, reward, prompts, noise, 1)  # eager warm-up
    eager = [run() for _ in range(repeats)]
    compiled_as = compile_generator(gen, cuda_graphs=cuda_graphs, reward=reward)
    first = run()  # compiles (forward and backward graphs) on the way
    warm = [run() for _ in range(repeats)]
    e_step = statistics.median(eager) / (steps + 1)
    c_step = statistics.median(warm) / (steps + 1)
    cold = cold_start(first, statistics.median(warm))  # compile_generator's setup not timed
    return {
        "steps_per_run": steps,
        "cuda_graphs": cuda_graphs,
        "compiled": compiled_as,
        "eager_s_per_step": e_step,
        "compiled_s_per_step": c_step,
        "speedup": e_step / c_step,
        "cold_start_s": cold,
        "break_even_steps": break_even(cold, e_step, c_step),
        "eager_repeats_s": eager,
        "compiled_repeats_s": warm,
        "first_compiled_run_s": first,
    }


def _print_compile(c: dict) -> None:
    print(
        f"--compile{' --cuda-graphs' if c['cuda_graphs'] else ''}: eager "
        f"{c['eager_s_per_step'] * 1e3:.1f} ms/step, compiled {c['compiled_s_per_step'] * 1e3:.1f}"
        f" ms/step ({c['speedup']:.2f}x); cold start {c['cold_start_s']:.1f} s; "
        + break_even_text(c["break_even_steps"], never="never (not faster)")
    )


def _print_dataset(d: dict) -> None:
    for procs in (1, 2):
        x = d[f"{procs}_process"]
        print(
            f"build-dataset {procs} process(es): {x['samples_per_s']:.2f} samples/s "
            f"({x['finished']} samples in {x['seconds']:.1f} s; {x['wall_s_with_startup']} s "
            "with interpreter start and model load)"
        )
    print(f"build-dataset 2 / 1 processes: {d['ratio_2_over_1']:.2f}x")


def _machine() -> str:
    """The CPU, its cores, torch and its threads, as the JSON records them."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )


def _finish(results: dict, json_path: str | None) -> int:
    """The load average line, then the JSON (when asked for); the exit status."""
    print(
        f"load average before/after: {results['load_average_before']} / "
        f"{results['load_average_after']}"
    )
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    p.add_argument(
        "--mem-size",
        type=int,
        default=512,
        help="image size of the memory runs (default 512: activations must outgrow the setup)",
    )
    p.add_argument("--steps", type=int, default=5, help="optimisation steps per run (default 5)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--only-dataset", action="store_true", help="run only the build-dataset section")
    p.add_argument("--only-compile", action="store_true", help="run only the --compile section")
    p.add_argument("--cuda-graphs", action="store_true", help="compile section: CUDA graphs too")
    p.add_argument(
        "--dataset-items", type=int, default=16, help="pairs of the build-dataset runs (16)"
    )
    p.add_argument(
        "--dataset-size", type=int, default=64, help="image size of build-dataset runs (64)"
    )
    p.add_argument("--dataset-steps", type=int, default=5, help="assignment steps per sample (5)")
    p.add_argument("--dataset-batch", type=int, default=4, help="samples optimised together (4)")
    p.add_argument(
        "--generator",
        choices=("sdxl-turbo", "flux-schnell"),
        default="sdxl-turbo",
        help="flux-schnell: section 1 on the few-step FLUX.1-schnell generator (module doc)",
    )
    p.add_argument(
        "--flux-sizes",
        default="tiny,mid",
        help="comma list of tiny, mid, full for --generator flux-schnell (default tiny,mid)",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("DIFFALIGN_NO_PROGRESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return _child(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    repeats = args.repeats or (2 if args.quick else 5)
    dataset_args = (
        args.dataset_size,
        args.dataset_steps,
        args.dataset_items,
        args.dataset_batch,
        torch.get_num_threads(),
    )
    if args.generator == "flux-schnell":
        sizes = [x for x in args.flux_sizes.split(",") if x]
        bad = [x for x in sizes if x not in FLUX_SIZES]
        if bad:
            p.error(f"--flux-sizes: unknown {bad}; choose from {', '.join(FLUX_SIZES)}")
        results = {
            "machine": _machine(),
            "device": args.device,
            "load_average_before": os.getloadavg(),
        }
        with tempfile.TemporaryDirectory() as tmp_name:
            rows = flux_section(Path(tmp_name), sizes, args.steps, repeats, args.device)
        results.update(flux_schnell=rows, load_average_after=os.getloadavg())
        _print_flux(rows)
        print(f"machine: {results['machine']}")
        return _finish(results, args.json)
    if args.only_dataset:
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp_name:
            d = dataset_throughput(Path(tmp_name), *dataset_args)
        d.update(load_average_before=load_before, load_average_after=os.getloadavg())
        _print_dataset(d)
        return _finish(d, args.json)
    if args.only_compile:
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp_name:
            gen, reward = _setup(Path(tmp_name), args.size, args.device)
            c = compile_speed(gen, reward, args.steps, repeats, args.device, args.cuda_graphs)
        c.update(
            machine=_machine(),
            device=args.device,
            image_size=args.size,
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
        )
        _print_compile(c)
        return _finish(c, args.json)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        gen, reward = _setup(tmp, args.size, args.device)
        results = {
            "machine": _machine(),
            "load_average_before": os.getloadavg(),
            "device": args.device,
            "image_size": args.size,
            "latent": list(gen.latent_shape()),
            "overhead": [
                overhead(gen, reward, args.steps, repeats, args.device, b) for b in (1, 4)
            ],
            "saved_for_backward": saved_for_backward(gen, reward, args.steps),
            "machinery_at_512px_latent": machinery_cost(20, repeats),
            "memory": memory(tmp, args.mem_size, args.steps, args.device, 1),
            "batching": batching(
                gen, reward, args.steps, max(1, repeats // 2), args.device, (1, 4, 8)
            ),
            "build_dataset": dataset_throughput(tmp, *dataset_args),
        }
        # last: it compiles the generator and the reward in place
        results["compile"] = compile_speed(
            gen, reward, args.steps, repeats, args.device, args.cuda_graphs
        )
        results["load_average_after"] = os.getloadavg()
    for o in results["overhead"]:
        print(
            f"overhead B={o['batch']}: bare {o['bare_s_per_step'] * 1e3:.1f} ms/step, ours "
            f"{o['ours_s_per_step'] * 1e3:.1f} ms/step, time ratio {o['time_ratio']:.3f}"
        )
    for mc in results["machinery_at_512px_latent"]:
        print(
            f"machinery alone at the 4x64x64 latent, B={mc['batch']}: "
            f"{mc['machinery_ms_per_step']:.2f} ms/step"
        )
    sv = results["saved_for_backward"]
    print(
        f"saved for backward per step ({args.size} px): bare {sv['bare'] / 2**20:.2f} MiB, ours "
        f"{sv['ours'] / 2**20:.2f} MiB, ratio {sv['ratio']:.4f}"
    )
    m = results["memory"]
    print(
        f"memory ({m['metric']}, {m['image_size']} px): bare {m['bare']}, ours {m['ours']}, ratio {m['ratio']:.3f}"
    )
    for b in results["batching"]:
        print(
            f"B={b['B']}: batched {b['batched_s_per_prompt_step'] * 1e3:.1f} ms per prompt-step, "
            f"one at a time {b['one_at_a_time_s_per_prompt_step'] * 1e3:.1f}, speedup "
            f"{b['speedup']:.2f}x"
        )
    _print_dataset(results["build_dataset"])
    _print_compile(results["compile"])
    return _finish(results, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
