"""Procrustes calibration of the text-stream residual (spec T: Calibration; seed 000).

For the first `num_samples` prompts of a dataset, each sample draws a random timestep index
`k` of a `steps`-step schedule; the model runs at that step and the text tokens entering every
block are captured by forward pre-hooks. Origin tokens X (entering `origin_layer`) and target
tokens Y (entering each target block) are standardised token-wise and streamed into float64
accumulators (`ProcrustesAccumulator`: `X^T Y`, `||X||^2`, `||Y||^2`, count per target), so
memory is O(layers x d^2) whatever the number of samples. Each target's rotation is
`solve_procrustes(X^T Y)`.

Where x_t comes from (`xt_source`):
- "trajectory" (default): sample from pure noise with the pipeline's flow-matching scheduler
  and capture at step k, so x_t is exactly what generation sees at that step.
- "noise": one forward on pure Gaussian latents at the timestep of index k. The flow-matching
  x_t = (1 - sigma) x0 + sigma * eps would need images x0, which a prompt set does not have;
  pure noise is the cheap stand-in (exact only at the first step).

Token strategy: "all" uses every text token (77 CLIP + T5 tokens); "valid" keeps CLIP tokens
through EOS and T5 tokens through EOS (the tokenizers' attention masks), dropping padding.

Under `accelerate launch` each process takes samples `rank, rank + world, ...`, the sums are
all-reduced, and rank 0 writes the rotation file, `summary.json` and `procrustes_errors.png`.
Each sample's randomness comes from `(seed, sample index)`, so the result does not depend on
the number of processes (nor, up to float rounding of batched forwards, on the batch size).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.progress import progress
from diffalign.textstream.attach import TextStreamResidual, transformer_feature_dim
from diffalign.textstream.procrustes import ProcrustesAccumulator
from diffalign.textstream.residual import standardize
from diffalign.textstream.rotations import RotationSet, save_rotations

TOKEN_STRATEGIES = ("all", "valid")
XT_SOURCES = ("trajectory", "noise")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of one calibration sample (independent of process count and batch)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))


def draw_sample(seed: int, index: int, steps: int, latent_shape: Sequence[int]):
    """(timestep index, initial noise `[C, h, w]` float32 on CPU) for one sample."""
    g = sample_generator(seed, index)
    k = int(torch.randint(0, steps, (1,), generator=g))
    noise = torch.randn(tuple(latent_shape), generator=g, dtype=torch.float32)
    return k, noise


def text_token_mask(pipe, prompts: list[str], num_tokens: int, max_sequence_length: int):
    """Bool `[B, num_tokens]`: CLIP tokens through EOS, then T5 tokens through EOS."""
    clip_len = pipe.tokenizer_max_length
    masks = []
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        if tok is None:
            continue
        enc = tok(
            prompts, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt"
        )
        masks.append(enc.attention_mask.bool())
    if not masks:
        raise DiffalignError("token strategy 'valid' needs the pipeline's CLIP tokenizers")
    clip_mask = masks[0]
    for m in masks[1:]:
        clip_mask = clip_mask | m
    t5_len = num_tokens - clip_len
    if getattr(pipe, "text_encoder_3", None) is None or pipe.tokenizer_3 is None:
        t5_mask = torch.zeros(len(prompts), t5_len, dtype=torch.bool)  # zero embeddings
    else:
        enc = pipe.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        t5_mask = enc.attention_mask.bool()
    mask = torch.cat([clip_mask, t5_mask], dim=1)
    if mask.shape[1] != num_tokens:
        raise DiffalignError(
            f"token mask has {mask.shape[1]} positions but the prompt embeddings have {num_tokens}"
        )
    return mask


class _TokenCollector:
    """Forward pre-hooks that stream standardised origin/target tokens into the accumulator.

    Inactive unless `rows` is set: then the rows `rows` of the batch, restricted to the token
    mask `mask [len(rows), n]`, are collected during the next transformer forward.
    """

    def __init__(
        self, blocks, origin: int, targets: list[int], acc: ProcrustesAccumulator, eps: float
    ):
        self.acc, self.eps, self.origin = acc, eps, origin
        self.rows: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self.handles = [blocks[origin].register_forward_pre_hook(self._origin, with_kwargs=True)]
        for t in targets:
            self.handles.append(
                blocks[t].register_forward_pre_hook(self._target(t), with_kwargs=True)
            )

    def _tokens(self, args, kwargs) -> torch.Tensor:
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        sel = text[self.rows.to(text.device)].to(device=self.acc.xty.device, dtype=torch.float64)
        sel = sel[self.mask.to(sel.device)]  # [tokens, d]
        return standardize(sel, self.eps)[0]

    def _origin(self, module, args, kwargs):
        self._x = None if self.rows is None else self._tokens(args, kwargs)

    def _target(self, layer: int):
        def hook(module, args, kwargs):
            if self.rows is not None:
                self.acc.add(layer, self._x, self._tokens(args, kwargs))

        return hook

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()


def calibrate(
    model: str | None = None,
    dataset: str | Sequence[str] | None = None,
    datadir: str | None = None,
    num_samples: int = 200,
    origin_layer: int = 0,
    target_layer_start: int = 2,
    target_layers: Sequence[int] | None = None,
    output: str = "procrustes_rotations.safetensors",
    seed: int = 0,
    token_strategy: str = "all",
    xt_source: str = "trajectory",
    steps: int = 28,
    cfg: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    dtype: str = "auto",
    device: str | None = None,
    max_sequence_length: int = 256,
    eps: float = 1e-6,
    pipe: Any = None,
    prompts: Sequence[str] | None = None,
    single_file_config: str | None = None,
) -> dict:
    """Calibrate per-layer Procrustes rotations and write them to `output` (spec T).

    `pipe` (a loaded `StableDiffusion3Pipeline`) and `prompts` may be given instead of
    `model` / `dataset`. `cfg > 1` adds the unconditional branch (empty negative prompt) to both
    the trajectory and the collected tokens. Returns the summary that is also written to
    `summary.json` beside `output`.
    """
    from diffalign.engine.distributed import process_state

    started = time.time()
    if token_strategy not in TOKEN_STRATEGIES:
        raise DiffalignError(f"--token-strategy must be one of {', '.join(TOKEN_STRATEGIES)}")
    if xt_source not in XT_SOURCES:
        raise DiffalignError(f"--xt-source must be one of {', '.join(XT_SOURCES)}")
    for name, value in (
        ("--num-samples", num_samples),
        ("--steps", steps),
        ("--batch-size", batch_size),
    ):
        if int(value) < 1:
            raise DiffalignError(f"{name} must be at least 1 (got {value})")
    if not math.isfinite(float(cfg)) or cfg < 0:
        raise DiffalignError(f"--cfg must be a finite number >= 0 (got {cfg})")
    if not 0 <= int(seed) <= 2**63 - 1:
        raise DiffalignError(f"--seed must be between 0 and 2**63 - 1 (got {seed})")
    output_path = Path(output)
    if output_path.is_dir():
        raise DiffalignError(f"--output {output} is a folder; give a file name")

    state = process_state(device)
    from diffalign.engine.io import locked_output_dir

    # the rotation file and summary.json/procrustes_errors.png beside it: one run per folder
    with locked_output_dir(output_path.parent or Path("."), "calibration output folder"):
        return _calibrate_locked(
            state,
            model=model,
            dataset=dataset,
            datadir=datadir,
            num_samples=num_samples,
            origin_layer=origin_layer,
            target_layer_start=target_layer_start,
            target_layers=target_layers,
            output_path=output_path,
            seed=seed,
            token_strategy=token_strategy,
            xt_source=xt_source,
            steps=steps,
            cfg=cfg,
            height=height,
            width=width,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            max_sequence_length=max_sequence_length,
            eps=eps,
            pipe=pipe,
            prompts=prompts,
            single_file_config=single_file_config,
            started=started,
        )


def _calibrate_locked(
    state,
    *,
    model,
    dataset,
    datadir,
    num_samples,
    origin_layer,
    target_layer_start,
    target_layers,
    output_path: Path,
    seed,
    token_strategy,
    xt_source,
    steps,
    cfg,
    height,
    width,
    batch_size,
    dtype,
    device,
    max_sequence_length,
    eps,
    pipe,
    prompts,
    single_file_config,
    started,
) -> dict:
    run_device = torch.device(device) if device else state.device
    torch_dtype = _resolve_dtype(dtype, run_device)

    if prompts is None:
        if not dataset:
            raise DiffalignError("calibration needs --dataset (a prompt file or set name)")
        from diffalign.engine.prompts import load_prompts

        prompts = [r.prompt for r in load_prompts(dataset, datadir, limit=num_samples)]
    prompts = list(prompts)[:num_samples]
    if not prompts:
        raise DiffalignError("the calibration prompt set is empty")

    if pipe is None:
        if not model:
            raise DiffalignError("calibration needs --model")
        pipe = _load_pipeline(model, torch_dtype, run_device, single_file_config)
    pipe = pipe.to(device=run_device, dtype=torch_dtype)
    tr = pipe.transformer
    blocks = tr.transformer_blocks
    num_layers, feature_dim = len(blocks), transformer_feature_dim(tr)
    if target_layers is None:
        target_layers = list(range(int(target_layer_start), num_layers))
    target_layers = list(target_layers)
    if not target_layers:
        raise DiffalignError(
            f"no target layers: --target-layer-start {target_layer_start} is past the last "
            f"block ({num_layers - 1})"
        )
    # same validation as the runtime residual (range, origin < target, duplicates)
    TextStreamResidual(origin_layer, target_layers, mode="ln").check_model(num_layers, feature_dim)

    vsf = getattr(pipe, "vae_scale_factor", 8)
    default_size = int(getattr(pipe, "default_sample_size", 128)) * vsf
    height, width = int(height or default_size), int(width or default_size)
    multiple = vsf * int(tr.config.patch_size)
    if height % multiple or width % multiple:
        raise DiffalignError(f"--height/--width must be multiples of {multiple}")
    latent_shape = (int(tr.config.in_channels), height // vsf, width // vsf)

    acc = ProcrustesAccumulator(target_layers, feature_dim, device=run_device)
    mine = list(range(state.process_index, len(prompts), state.num_processes))
    drawn: dict[int, int] = {}
    collector = _TokenCollector(blocks, origin_layer, target_layers, acc, eps)
    try:
        with torch.no_grad():
            batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
            for batch in progress(batches, desc="calibrate", total=len(batches)):
                ks = _run_batch(
                    pipe,
                    collector,
                    batch,
                    [prompts[i] for i in batch],
                    seed=seed,
                    steps=steps,
                    latent_shape=latent_shape,
                    cfg=cfg,
                    xt_source=xt_source,
                    token_strategy=token_strategy,
                    max_sequence_length=max_sequence_length,
                    dtype=torch_dtype,
                    device=run_device,
                )
                drawn.update(zip(batch, ks))
    finally:
        collector.close()

    if state.num_processes > 1:
        import torch.distributed as dist

        flat = acc.state()
        dist.all_reduce(flat)
        acc.load_state(flat)
        counts = torch.zeros(steps, dtype=torch.float64, device=flat.device)
        for k in drawn.values():
            counts[k] += 1
        dist.all_reduce(counts)
        histogram = [int(c) for c in counts.tolist()]
    else:
        histogram = [sum(1 for k in drawn.values() if k == s) for s in range(steps)]

    rotations, per_layer = acc.solve()
    num_valid_tokens = int(acc.count[0])
    summary = {
        "output": str(output_path),
        "model": str(model) if model else type(pipe).__name__,
        "dataset": dataset if isinstance(dataset, str | None) else list(dataset),
        "num_samples": len(prompts),
        "origin_layer": int(origin_layer),
        "target_layers": target_layers,
        "feature_dim": feature_dim,
        "num_valid_tokens": num_valid_tokens,
        "token_strategy": token_strategy,
        "xt_source": xt_source,
        "steps": int(steps),
        "cfg": float(cfg),
        "seed": int(seed),
        "height": height,
        "width": width,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "num_processes": state.num_processes,
        "timestep_index_histogram": histogram,
        "per_layer": per_layer,
        "mean_error_before": sum(r["error_before"] for r in per_layer) / len(per_layer),
        "mean_error_after": sum(r["error_after"] for r in per_layer) / len(per_layer),
        "seconds": round(time.time() - started, 3),
    }
    if state.is_main_process:
        meta_keys = (
            "model",
            "dataset",
            "num_samples",
            "seed",
            "xt_source",
            "steps",
            "cfg",
            "height",
            "width",
            "dtype",
        )
        save_rotations(
            output_path,
            RotationSet(
                origin_layer=int(origin_layer),
                target_layers=target_layers,
                rotations={t: r.to(torch.float32) for t, r in rotations.items()},
                feature_dim=feature_dim,
                num_valid_tokens=num_valid_tokens,
                strategy=token_strategy,
                metadata={k: summary[k] for k in meta_keys},
            ),
        )
        _write_reports(output_path.parent, summary)
    state.wait_for_everyone()
    return summary


def _run_batch(
    pipe,
    collector: _TokenCollector,
    indices: list[int],
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    latent_shape,
    cfg: float,
    xt_source: str,
    token_strategy: str,
    max_sequence_length: int,
    dtype,
    device,
) -> list[int]:
    """Run one batch to each sample's drawn step and collect its tokens; returns the indices."""
    tr = pipe.transformer
    use_cfg = cfg > 1.0
    draws = [draw_sample(seed, i, steps, latent_shape) for i in indices]
    ks = [k for k, _ in draws]
    latents = torch.stack([n for _, n in draws]).to(device=device, dtype=dtype)
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=use_cfg,
        num_images_per_prompt=1,
        max_sequence_length=max_sequence_length,
    )
    n_tok = pe.shape[1]
    b = len(prompts)
    if token_strategy == "valid":
        mask = text_token_mask(pipe, prompts, n_tok, max_sequence_length)
        neg_mask = text_token_mask(pipe, [""] * b, n_tok, max_sequence_length) if use_cfg else None
    else:
        mask = torch.ones(b, n_tok, dtype=torch.bool)
        neg_mask = mask
    if use_cfg:  # pipeline order: unconditional rows first
        pe, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])

    def collect(sel: list[int]) -> None:
        if not sel:
            collector.rows = None
            return
        rows, masks = list(sel), [mask[s] for s in sel]
        if use_cfg:
            rows = list(sel) + [b + s for s in sel]
            masks = [neg_mask[s] for s in sel] + masks
        collector.rows = torch.tensor(rows)
        collector.mask = torch.stack(masks)

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device, **_shift_kwargs(scheduler, tr, latents))
    timesteps = scheduler.timesteps
    if len(timesteps) != steps:
        raise DiffalignError(f"the scheduler made {len(timesteps)} timesteps for --steps {steps}")

    if xt_source == "noise":
        collect(list(range(b)))
        t = timesteps[torch.tensor(ks, device=timesteps.device)]
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        tt = torch.cat([t, t]) if use_cfg else t
        tr(
            hidden_states=model_in,
            timestep=tt,
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )
        collector.rows = None
        return ks

    for i, t in enumerate(timesteps[: max(ks) + 1]):
        collect([s for s in range(b) if ks[s] == i])
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        pred = tr(
            hidden_states=model_in,
            timestep=t.expand(model_in.shape[0]),
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        collector.rows = None
        if i == max(ks):
            break
        if use_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + cfg * (cond - uncond)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return ks


def _shift_kwargs(scheduler, tr, latents) -> dict:
    """`mu` for schedulers with dynamic shifting, as the SD3 pipeline computes it."""
    cfg = scheduler.config
    if not cfg.get("use_dynamic_shifting", False):
        return {}
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    p = tr.config.patch_size
    seq = (latents.shape[-2] // p) * (latents.shape[-1] // p)
    mu = calculate_shift(
        seq,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.16),
    )
    return {"mu": mu}


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DiffalignError(f"--dtype must be auto or one of {', '.join(DTYPES)} (got '{dtype}')")
    return DTYPES[dtype]


def _load_pipeline(
    model: str, torch_dtype: torch.dtype, device: torch.device, single_file_config: str | None
):
    from diffalign.engine.loading import load_sd3_pipeline

    return load_sd3_pipeline(
        model, dtype=torch_dtype, device=str(device), single_file_config=single_file_config
    )


def _write_reports(folder: Path, summary: dict) -> None:
    from diffalign.engine.reports import plot_curves, write_summary

    layers = [r["layer"] for r in summary["per_layer"]]
    write_summary(folder / "summary.json", summary)
    plot_curves(
        folder / "procrustes_errors.png",
        {
            "before rotation": (layers, [r["error_before"] for r in summary["per_layer"]]),
            "after rotation": (layers, [r["error_after"] for r in summary["per_layer"]]),
        },
        title=f"text-stream alignment to origin layer {summary['origin_layer']}",
        xlabel="target layer",
        ylabel="||X R - Y||^2 / ||Y||^2",
    )
