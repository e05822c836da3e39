"""Benchmark of the text-stream residual (spec T): forward-time overhead and calibration memory.

1. Forward time of an SD3-shaped `SD3Transformer2DModel` (random weights) in the same run:
   vanilla, residual attached but off (no targets), plain residual on one target, and LN +
   Procrustes rotation on every block from 2 to the last, and that residual with issue 18's
   speed options (rotation GEMM in the model's dtype, one batched GEMM for all targets, the
   compiled standardise-mix-rescale, all three; warm-up rounds absorb the compile). Repetitions
   are interleaved (each round in a fresh random order, bench/timing.py) so machine noise hits
   every variant alike; medians, ratios to vanilla and the median of per-round ratios are
   reported. On CPU the clock is the thread's CPU time with one torch thread (robust on a shared
   machine). Goal: overhead < 3%.
   `output_diff`: how far each speed variant's transformer output is from the reference LN +
   rotation variant's on the same inputs: max |variant - reference| over all elements, and that
   in bf16 units, max |variant - reference| / (2**-8 * max |reference|) (2**-8: bf16's relative
   rounding; one unit is the rounding of the reference's largest element). Beside it the
   reference against the same model and residual in float32 (`fp32_reference`, for a bf16/fp16
   model: how far the model's own dtype moves the output). A variant is `within_bf16_rounding`
   when its bf16 units are at most max(1, fp32_reference's); bench/rows.py reports the `_all`
   variant only then.
2. Peak memory of calibration (`calibrate()` on a tiny pipeline, pure-noise x_t) as the number
   of samples grows: the streaming float64 accumulator against a naive variant that stores all
   tokens and solves at the end. Each run is a fresh subprocess (after a 1-sample warm-up);
   reported, measured: peak RSS during the run above the RSS at its start (sampled every
   2 ms from /proc), the process's lifetime peak RSS (`resource.getrusage` ru_maxrss, which
   includes the model), and the bytes of the tensor storages the accumulator object holds at
   the end (walked from the object); beside them the size computed from the shapes.
   Goal: streaming memory independent of the number of samples.

With `--model flux` both parts run on FLUX.1's structure instead (issue 15): a
`FluxTransformer2DModel` (19 double-stream + 38 single-stream blocks on CPU, narrow heads;
`--flux-dev` is the real FLUX.1-dev size for a GPU: 24 x 128 = 3072 wide, 4096 image + 512 text
tokens), origin 2 and targets 3..56 as the authors' published FLUX file, plus a variant with 4
timestep buckets and column centring; the memory part calibrates a tiny FLUX.1-dev pipeline.

    python bench/textstream.py [--quick] [--sd3-medium] [--model flux [--flux-dev]] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py, sizes.py
from sizes import FLUX1, SD3_MEDIUM  # noqa: E402
from timing import clock_label, interleaved_times, summarize  # noqa: E402

# bf16 keeps 8 significant bits: rounding to bf16 moves a value x by up to 2**-8 |x|
BF16_ROUNDING = 2.0**-8
OUTPUT_DIFF_METRIC = (
    "max_abs: max |variant - reference| over every element of the transformer output, same "
    "weights and inputs (mean_abs: the mean of |variant - reference|); bf16_units: max_abs / "
    "(2**-8 * max |reference|), in units of the bf16 rounding of the reference's largest "
    "element; fp32_reference: the reference against the same model and residual run in float32 "
    "(how far running the model in its dtype moves the output; null for a float32 model); "
    "within_bf16_rounding: bf16_units <= max(1, fp32_reference's bf16_units)"
)


def build_transformer(layers: int, heads: int, head_dim: int, image_tokens: int, device, dtype):
    """An SD3-shaped `SD3Transformer2DModel` (random weights, seed 0) in eval mode and its latent
    side; SD3-medium's text and pooled widths from its width up, narrow ones below."""
    from diffusers import SD3Transformer2DModel

    side = int(round(image_tokens**0.5)) * 2  # latent side for patch size 2
    wide = heads * head_dim >= SD3_MEDIUM.width
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a GPU initialises 2 B parameters at once
        tr = SD3Transformer2DModel(
            sample_size=side,
            patch_size=2,
            in_channels=16,
            num_layers=layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=SD3_MEDIUM.text_dim if wide else 256,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=SD3_MEDIUM.pooled_dim if wide else 64,
            out_channels=16,
            pos_embed_max_size=max(96, side // 2),
        )
    return tr.to(device=device, dtype=dtype).eval(), side


def build_flux_transformer(
    double: int, single: int, heads: int, head_dim: int, device, dtype
) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    import diffalign.engine.tiny  # noqa: F401  (first: tiny_flux alone is a circular import)
    from diffalign.engine.tiny_flux import flux_rope_axes

    wide = heads * head_dim >= 1536
    torch.manual_seed(0)
    with torch.device(device):
        tr = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=FLUX1.text_dim if wide else 256,
            pooled_projection_dim=FLUX1.pooled_dim if wide else 64,
            guidance_embeds=True,
            axes_dims_rope=flux_rope_axes(head_dim),
        )
    return tr.to(device=device, dtype=dtype).eval()


def _inputs(args, tr, g) -> tuple[dict, int]:
    """Random transformer inputs for the benchmarked model and the image token count."""
    if args.model == "flux":
        n_img, n_txt, b = args.image_tokens, args.text_tokens, args.batch
        side = int(round(n_img**0.5))
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        return {
            "hidden_states": torch.randn(b, side * side, 64, generator=g),
            "encoder_hidden_states": torch.randn(
                b, n_txt, tr.config.joint_attention_dim, generator=g
            ),
            "pooled_projections": torch.randn(b, tr.config.pooled_projection_dim, generator=g),
            "timestep": torch.full((b,), 0.5),  # FLUX gets t / 1000
            "guidance": torch.full((b,), 3.5),
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(n_txt, 3),
        }, side * side
    side = int(round(args.image_tokens**0.5)) * 2
    return {
        "hidden_states": torch.randn(args.batch, 16, side, side, generator=g),
        "encoder_hidden_states": torch.randn(
            args.batch, args.text_tokens, tr.config.joint_attention_dim, generator=g
        ),
        "pooled_projections": torch.randn(args.batch, tr.config.pooled_projection_dim, generator=g),
        "timestep": torch.full((args.batch,), 500.0),
    }, (side // 2) ** 2


def forward_overhead(args) -> dict:
    from diffalign.textstream import TextStreamResidual
    from diffalign.textstream.adapters import stream_adapter
    from diffalign.textstream.rotations import equal_bucket_edges

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    if args.model == "flux":
        tr = build_flux_transformer(
            args.layers, args.single_layers, args.heads, args.head_dim, device, dtype
        )
    else:
        tr, _ = build_transformer(
            args.layers, args.heads, args.head_dim, args.image_tokens, device, dtype
        )
    num_blocks = stream_adapter(tr).num_blocks
    d = args.heads * args.head_dim
    g = torch.Generator().manual_seed(1)
    inputs, image_tokens = _inputs(args, tr, g)
    inputs = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        for k, v in inputs.items()
    }
    # FLUX: the authors' published file's layers (origin 2, targets 3..56); SD3: 0 -> 2..L-1
    origin = 2 if args.model == "flux" else 0
    targets = list(range(origin + (1 if args.model == "flux" else 2), num_blocks))

    def random_rotation() -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return q.float()

    rotations = {t: random_rotation() for t in targets}
    variants = {
        "vanilla": None,
        "off": TextStreamResidual(0, []),
        "plain_1_target": TextStreamResidual(0, [num_blocks // 2], [0.5], mode="plain"),
        f"ln_rot_{len(targets)}_targets": TextStreamResidual(
            origin, targets, [0.5], mode="ln", rotations=rotations
        ),
    }
    if args.model == "flux":  # 4 timestep buckets (the rows' bucket looked up per forward)
        bucketed = {
            t: torch.stack([r, *(random_rotation() for _ in range(3))])
            for t, r in rotations.items()
        }
        variants[f"ln_rot_4bkt_{len(targets)}"] = TextStreamResidual(
            origin,
            targets,
            [0.5],
            mode="ln",
            rotations=bucketed,
            timestep_bucket_edges=equal_bucket_edges(4),
        )
    # issue 18's speed options on the same LN + rotation residual (`TextStreamResidual` doc)
    ln = f"ln_rot_{len(targets)}_targets"
    speed = {
        "model_gemm": dict(rotation_precision="model"),
        "batched": dict(batched_rotation=True),
        "batched_model_gemm": dict(batched_rotation=True, rotation_precision="model"),
        "compiled_mix": dict(compile=True),
        "all": dict(batched_rotation=True, rotation_precision="model", compile=True),
    }
    for name, kw in speed.items():
        if args.speed_variants:
            variants[f"{ln}_{name}"] = TextStreamResidual(
                origin, targets, [0.5], mode="ln", rotations=rotations, **kw
            )

    # interleaved rounds; the clock: thread CPU time on CPU, synchronised wall time on CUDA
    # (bench/timing.py); each residual is attached only while its variant runs
    def forward() -> None:
        with torch.no_grad():
            tr(**inputs, return_dict=False)

    def setup(name: str):
        res = variants[name]
        return res.attach(tr) if res is not None else contextlib.nullcontext()

    times = interleaved_times(
        {name: forward for name in variants},
        reps=args.reps,
        warmup=args.warmup,
        device=device,
        setup=setup,
    )
    stats = summarize(times, "vanilla")
    rows = {}
    for name, st in stats.items():
        rows[name] = {
            "median_s": st["median_s"],
            "ratio": st["ratio"],
            "overhead_pct": 100 * (st["ratio"] - 1),
            # per-round ratio to that round's vanilla time: robust to a shared machine's drifts
            "paired_ratio": st["paired_ratio"],
            "paired_overhead_pct": 100 * (st["paired_ratio"] - 1),
            "min_s": st["min_s"],
            "times_s": times[name],
            "reps": st["reps"],
        }
    speed_names = [f"{ln}_{name}" for name in speed if f"{ln}_{name}" in variants]
    diffs = output_differences(tr, inputs, variants, ln, speed_names) if speed_names else None
    return {
        "shape": {
            "model": args.model,
            "layers": num_blocks,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "width": d,
            "text_tokens": args.text_tokens,
            "image_tokens": image_tokens,
            "batch": args.batch,
            "dtype": args.dtype,
            "device": str(device),
            "clock": clock_label(device),
        },
        "variants": rows,
        **({"output_diff": diffs} if diffs is not None else {}),
    }


def output_differences(tr, inputs: dict, variants: dict, reference: str, names: list[str]) -> dict:
    """How far each speed variant's transformer output is from the reference variant's, on the
    same inputs (`OUTPUT_DIFF_METRIC`), and how far the reference is from itself in float32."""

    def output(res, model=tr, feed=inputs) -> torch.Tensor:
        with torch.no_grad(), res.attach(model):
            return model(**feed, return_dict=False)[0].detach().double()

    ref = output(variants[reference])
    unit = BF16_ROUNDING * float(ref.abs().max())

    def entry(out: torch.Tensor) -> dict:
        diff = (out - ref).abs()
        top = float(diff.max())
        units = top / unit if unit > 0 else (0.0 if top == 0 else None)  # None: all-zero output
        return {"max_abs": top, "mean_abs": float(diff.mean()), "bf16_units": units}

    fp32 = None
    dtype = next(tr.parameters()).dtype
    if dtype != torch.float32:
        # bf16/fp16 -> float32 -> back is exact: the timed model is unchanged afterwards
        try:
            tr.to(torch.float32)
            feed = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
            fp32 = entry(output(variants[reference], tr, feed))
        except torch.OutOfMemoryError:  # a model too large for its float32 copy on the card
            print("output_diff: no float32 reference (out of memory)", file=sys.stderr)
        finally:
            tr.to(dtype)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    bound = max(1.0, (fp32 or {}).get("bf16_units") or 0.0)
    out = {}
    for name in names:
        e = entry(output(variants[name]))
        within = e["bf16_units"] is not None and e["bf16_units"] <= bound
        out[name] = {**e, "within_bf16_rounding": within}
    return {
        "metric": OUTPUT_DIFF_METRIC,
        "reference": reference,
        "reference_max_abs_output": float(ref.abs().max()),
        "reference_repeat_max_abs": entry(output(variants[reference]))["max_abs"],
        "fp32_reference": fp32,
        "variants": out,
    }


# -- calibration memory ---------------------------------------------------------------------
class RssSampler:
    """Peak resident memory above the level at entry, sampled every 2 ms from /proc (Linux)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def memory_child(mode: str, samples: int, out: str, model: str = "sd3") -> None:
    """Run calibrate() on a tiny pipeline; write peak-RSS growth over a warm-up run."""
    torch.set_num_threads(1)
    import diffalign.textstream.calibrate as cal
    from diffalign.engine.tiny import build_tiny_sd3_pipeline
    from diffalign.textstream.procrustes import ProcrustesAccumulator

    held = {"bytes": 0}
    instances: list = []

    class StoreAll(ProcrustesAccumulator):
        """Naive: keep every standardised token, solve from the stacked matrices at the end."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.stored: dict[int, list] = {t: [] for t in self.target_layers}
            instances.append(self)

        def add(self, layer, x, y):
            self.stored[layer].append((x.clone(), y.clone()))
            held["bytes"] += 2 * x.numel() * 8

        def solve(self, column_center=False):
            for layer, pairs in self.stored.items():
                x = torch.cat([p[0] for p in pairs])
                y = torch.cat([p[1] for p in pairs])
                super().add(layer, x, y)
            return super().solve(column_center=column_center)

    class Streaming(ProcrustesAccumulator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            held["bytes"] = self.state().numel() * 8
            instances.append(self)

    cal.ProcrustesAccumulator = StoreAll if mode == "store_all" else Streaming
    if model == "flux":
        from diffalign.engine.tiny_flux1 import build_tiny_flux1_pipeline

        pipe = build_tiny_flux1_pipeline(
            "flux-dev", 0, num_layers=2, num_single_layers=6, attention_head_dim=128
        )
        size = dict(height=32, width=32, steps=2, origin_layer=2, target_layer_start=3)
    else:
        pipe = build_tiny_sd3_pipeline(
            0, num_layers=8, num_attention_heads=4, attention_head_dim=64
        )
        size = dict(steps=28, origin_layer=0, target_layer_start=2)
    prompts = [f"prompt number {i} with a few words" for i in range(samples)]
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(
            pipe=pipe,
            xt_source="noise",
            output=os.path.join(tmp, "rot.safetensors"),
            device="cpu",
            overwrite=True,  # the measured run replaces the warm-up's file
            **size,
        )
        cal.calibrate(prompts=prompts[:1], num_samples=1, **kw)  # warm-up: allocator, imports
        sampler = RssSampler()
        start = time.perf_counter()
        with sampler:
            summary = cal.calibrate(prompts=prompts, num_samples=samples, **kw)
        seconds = time.perf_counter() - start
    import resource

    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    measured = tensor_storage_bytes(instances[-1]) if instances else 0
    Path(out).write_text(
        json.dumps(
            {
                "mode": mode,
                "samples": samples,
                "tokens": summary["num_valid_tokens"],
                "feature_dim": summary["feature_dim"],
                "target_layers": len(summary["target_layers"]),
                "peak_rss_growth_mb": sampler.growth_mb,
                "accumulator_mb": held["bytes"] / 2**20,
                "accumulator_measured_mb": measured / 2**20,
                "process_max_rss_mb": maxrss_mb,
                "seconds": seconds,
            }
        )
    )


def tensor_storage_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (attributes, lists, dicts)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_storage_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_storage_bytes(v, seen) for v in vars(obj).values())
    return 0


def calibration_memory(sample_counts: list[int], model: str = "sd3") -> list[dict]:
    rows = []
    for n in sample_counts:
        for mode in ("streaming", "store_all"):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = f.name
            env = {**os.environ, "DIFFALIGN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
            subprocess.run(
                [sys.executable, __file__, "--memory-child", mode, str(n), out, "--model", model],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            rows.append(json.loads(Path(out).read_text()))
            os.unlink(out)
    return rows


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape and few repetitions")
    p.add_argument(
        "--sd3-medium",
        action="store_true",
        help=f"real SD3-medium size: {SD3_MEDIUM.describe()}, {SD3_MEDIUM.image_tokens} image "
        f"tokens, CFG batch {SD3_MEDIUM.batch} (for a GPU)",
    )
    p.add_argument(
        "--model",
        choices=("sd3", "flux"),
        default="sd3",
        help="transformer structure: SD3 joint blocks, or FLUX.1 double + single blocks",
    )
    p.add_argument(
        "--flux-dev",
        action="store_true",
        help=f"with --model flux: real FLUX.1-dev size: {FLUX1.describe()}, "
        f"{FLUX1.image_tokens} image + {FLUX1.text_tokens} text tokens (for a GPU)",
    )
    p.add_argument(
        "--single-layers", type=int, default=None, help="FLUX single-stream blocks (default 38)"
    )
    p.add_argument(
        "--layers", type=int, default=None, help="blocks (CPU default 24; FLUX: double, 19)"
    )
    p.add_argument("--heads", type=int, default=None, help="attention heads (CPU default 4)")
    p.add_argument("--head-dim", type=int, default=None, help="head width (default 64; FLUX 128)")
    p.add_argument("--image-tokens", type=int, default=None, help="CPU default 1024")
    p.add_argument(
        "--text-tokens", type=int, default=None, help="SD3: 77 CLIP + 256 T5 = 333; FLUX: 512"
    )
    p.add_argument("--batch", type=int, default=None, help="batch (default 1; 2 with sd3)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument(
        "--memory-samples",
        default=None,
        help="comma-separated sample counts for the memory part (default 4,16,64)",
    )
    p.add_argument(
        "--no-speed-variants",
        dest="speed_variants",
        action="store_false",
        help="leave out the LN + rotation speed variants (model-dtype GEMM, batched, compiled)",
    )
    p.add_argument("--skip-memory", action="store_true", help="only the forward timing")
    p.add_argument("--skip-forward", action="store_true", help="only the calibration memory")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--memory-child", nargs=3, metavar=("MODE", "N", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        mode, n, out = args.memory_child
        memory_child(mode, int(n), out, args.model)
        return 0

    if args.model == "flux" and args.flux_dev:
        defaults = dict(
            layers=FLUX1.blocks,
            single_layers=FLUX1.single_blocks,
            heads=FLUX1.heads,
            head_dim=FLUX1.head_dim,
            image_tokens=FLUX1.image_tokens,
            text_tokens=FLUX1.text_tokens,
            batch=1,
            reps=10,
            dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        )
    elif args.model == "flux":  # FLUX.1's blocks (fewer with --quick), 2 heads
        defaults = dict(
            layers=8 if args.quick else FLUX1.blocks,
            single_layers=16 if args.quick else FLUX1.single_blocks,
            heads=2,
            head_dim=FLUX1.head_dim,
            image_tokens=256 if args.quick else 1024,
            text_tokens=FLUX1.text_tokens,
            batch=1,
            reps=5 if args.quick else 7,
            dtype="float32",
        )
    elif args.sd3_medium:
        defaults = dict(
            layers=SD3_MEDIUM.blocks,
            heads=SD3_MEDIUM.heads,
            image_tokens=SD3_MEDIUM.image_tokens,
            batch=SD3_MEDIUM.batch,
            reps=20,
            dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        )
    elif args.quick:
        defaults = dict(layers=8, heads=4, image_tokens=256, batch=1, reps=7, dtype="float32")
    else:
        defaults = dict(layers=24, heads=4, image_tokens=1024, batch=1, reps=15, dtype="float32")
    defaults.setdefault("text_tokens", SD3_MEDIUM.text_tokens)
    defaults.setdefault("head_dim", SD3_MEDIUM.head_dim)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.device == "cpu":
        torch.set_num_threads(1)  # thread_time() then covers all the compute

    results: dict = {
        "machine": {
            "device": args.device,
            "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    }
    results["load_average"] = os.getloadavg()
    t0 = time.time()
    if not args.skip_forward:
        fwd = forward_overhead(args)
        results["forward"] = fwd
        s = fwd["shape"]
        print(
            f"forward: {s['layers']} blocks, width {s['width']} ({s['heads']}x{s['head_dim']}), "
            f"{s['text_tokens']} text + {s['image_tokens']} image tokens, batch {s['batch']}, "
            f"{s['dtype']} on {s['device']} ({time.time() - t0:.0f} s)"
        )
        print(f"  {'variant':<40} {'median ms':>10} {'ratio':>8} {'overhead':>9} {'paired':>9}")
        for name, row in fwd["variants"].items():
            print(
                f"  {name:<40} {1000 * row['median_s']:>10.1f} {row['ratio']:>8.4f} "
                f"{row['overhead_pct']:>8.2f}% {row['paired_overhead_pct']:>8.2f}%"
            )
        diff = fwd.get("output_diff")
        if diff:
            fp32 = diff["fp32_reference"]
            ref32 = (
                f"; {diff['reference']} vs float32: {fp32['max_abs']:.3g} "
                f"({_num(fp32['bf16_units'])} bf16 units)"
                if fp32
                else ""
            )
            print(
                f"  output vs {diff['reference']} (max abs; bf16 units = / (2**-8 max |ref|), "
                f"max |ref| {diff['reference_max_abs_output']:.3g}{ref32}):"
            )
            for name, e in diff["variants"].items():
                ok = "within bf16 rounding" if e["within_bf16_rounding"] else "NOT within"
                print(f"  {name:<40} {e['max_abs']:>10.3g} {_num(e['bf16_units']):>8}  {ok}")

    if not args.skip_memory:
        counts = [
            int(x)
            for x in (args.memory_samples or ("4,16" if args.quick else "4,16,64")).split(",")
        ]
        mem = calibration_memory(counts, args.model)
        results["calibration_memory"] = mem
        shape = (
            "tiny FLUX.1-dev, 2 + 6 blocks, width 256, 512 tokens/sample, 5 targets"
            if args.model == "flux"
            else "tiny pipeline, 8 blocks, width 256, 333 tokens/sample"
        )
        print(f"calibration memory ({shape}):")
        print(
            f"  {'samples':>7} {'mode':<10} {'tokens':>7} {'computed MB':>12} "
            f"{'measured MB':>12} {'peak RSS +MB':>13} {'max RSS MB':>11}"
        )
        for r in mem:
            print(
                f"  {r['samples']:>7} {r['mode']:<10} {r['tokens']:>7} "
                f"{r['accumulator_mb']:>12.1f} {r['accumulator_measured_mb']:>12.1f} "
                f"{r['peak_rss_growth_mb']:>13.1f} {r['process_max_rss_mb']:>11.1f}"
            )
        print(
            "  computed: accumulator size from the shapes; measured: storage bytes the "
            "accumulator holds at the end; peak RSS +MB: sampled RSS growth during the run; "
            f"max RSS: getrusage peak of the process (load {os.getloadavg()[0]:.1f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
