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
- "image" (image-caption pairs): x_t = (1 - sigma) x0 + sigma * eps, x0 the VAE latent of the
  sample's own image (centre-cropped to the square size, posterior mean, normalised as
  `textstream cache` stores it), one forward at a timestep t drawn uniformly from the integers
  0..999 (one per bucket with `timestep_draw` "bucket"), sigma = t / 1000 with no schedule
  shift: the training-like noising of the method's authors' SD3 and FLUX.1 calibration
  (`build_noisy_latent_like_training` in their `compute_sd3_text_procrustes.py` /
  `Flux-Residual/compute_flux_text_procrustes.py` at e9d7900; they use a posterior sample).

Token strategy: "all" uses every text token (77 CLIP + T5 tokens); "valid" keeps CLIP tokens
through EOS and T5 tokens through EOS (the tokenizers' attention masks), dropping padding.

Only the conditional rows are collected (`COLLECTED_BRANCH`): with `cfg > 1` the unconditional
branch (empty negative prompt) shapes the trajectory, as at generation, but its text tokens do
not enter the Procrustes sums. This is what the method's authors fit
(Yaoyuxuanyyds/Training-free-Residual-SD3 at e9d7900: `compute_sd3_text_procrustes.py`,
`Flux-Residual/compute_flux_text_procrustes.py` and
`Qwen-Image-Residual/compute_qwen_text_procrustes.py` encode the prompt alone, batch 1); the
empty prompt's tokens are the same few tokens for every sample and would pull the rotation
towards mapping the empty prompt's origin tokens onto its target tokens.

Families (issue 15): SD3/SD3.5 run the loop above by hand; FLUX.1 and Qwen-Image run their own
pipeline from the sample's noise with a step callback (`_run_batch_pipeline`), so distilled
guidance, true CFG and dynamic shifting are exactly the pipeline's. Blocks are found by the
family's `StreamAdapter` (global indices). "valid" keeps T5 tokens through EOS on FLUX.1. On
Qwen-Image both strategies keep the tokens the blocks' text mask keeps: a Qwen-Image prompt has
no padding of its own (the pipeline pads a batch to its longest prompt), so those are the tokens
the prompt has alone, whatever the batch. With `timestep_buckets` N > 1 each row goes
to the accumulator of the bucket its timestep falls in (one rotation per bucket and target);
`col_center` centres the feature columns before each solve (`X^T Y - s_x s_y^T / n`).

Which bucket a timestep falls in: that of the timestep *as the transformer receives it*
(`StreamAdapter.timestep_bucket`, the rule generation looks the rotation up by). FLUX.1 and
Qwen-Image pipelines hand it over as `t.to(model dtype) / 1000` (`flow.transformer_timestep`),
so in bf16 schedule timestep 249.59 arrives as 0.25 (bucket 1 of 4, not 0) and 499 as 0.5. The
plans (which steps a bucket can get, the "bucket" draws, `--xt-source image`'s integer draws)
and the refusal of a bucket no step reaches (at the first batch) use the same rounding
(`received_buckets`), and "image" hands the transformer its drawn t as the pipeline would. The
assignment is exact for generation in the calibration's dtype; a bf16 generation of a float32
calibration can put a step within one bf16 rounding step of an edge in the neighbouring bucket.

Timestep draw (`timestep_draw`): "sample" (default, spec T) draws one step index per sample, so
with N buckets each bucket sees the samples whose step fell in it (about n / N). "bucket" draws
one step per sample *and bucket*, uniformly among the schedule's steps whose timestep falls in
that bucket (`draw_bucket_steps`), so every sample reaches every bucket, as the method's authors
calibrate (each pair once per bucket, e.g. `Flux-Residual/compute_flux_text_procrustes.py` at
e9d7900). The trajectory runs once per sample to its last drawn step and is collected at each.

Under `accelerate launch` the samples run in the batches of a 1-process run, each process
taking batches `rank, rank + world, ...` (`engine.distributed.rank_batches`); the sums are
all-reduced, and rank 0 writes the rotation file, `summary.json` and `procrustes_errors.png`.
Each sample's randomness comes from `(seed, sample index)`, so the result does not depend on
the number of processes (nor, up to float rounding of batched forwards, on the batch size).

Re-runs (spec E: Safety): the rotation file records the run's identity (`calibration_identity`:
the settings that shape it, resolved once from the model card where not given, the samples by
content, and the model's `model_identity`) in its metadata. Before any model loads, an existing
`output` made with other settings (or by an older diffalign that recorded none), or a
`summary.json` beside it that reports another rotation file, is refused in one line naming the
keys; `overwrite` replaces them. An identical re-run rewrites the same rotations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.progress import progress
from diffalign.textstream.adapters import StreamAdapter, stream_adapter
from diffalign.textstream.attach import TextStreamResidual
from diffalign.textstream.procrustes import ProcrustesAccumulator
from diffalign.textstream.residual import standardize
from diffalign.textstream.rotations import (
    RotationSet,
    equal_bucket_edges,
    parse_identity,
    save_rotations,
)
from diffalign.textstream.weights import noisy_latents  # x_s = (1 - s) x0 + s eps, s = t / 1000

TOKEN_STRATEGIES = ("all", "valid")
TIMESTEP_DRAWS = ("sample", "bucket")
XT_SOURCES = ("trajectory", "noise", "image")
COLLECTED_BRANCH = "conditional"  # recorded in rotation files: the rows whose tokens are fitted
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


_SD3 = StreamAdapter("sd3", (), 0)  # the timestep rule of SD3 (no blocks needed for it)


def received_buckets(
    timesteps, edges, adapter: StreamAdapter | None = None, dtype=None
) -> torch.Tensor:
    """Bucket of each schedule timestep as generation will look it up: that of the timestep
    the transformer receives (`StreamAdapter.received_timesteps`; `adapter` None: SD3's), by
    `StreamAdapter.timestep_bucket`."""
    adapter = adapter or _SD3
    return adapter.timestep_bucket(adapter.received_timesteps(timesteps, dtype), edges)


def bucket_dtype_mismatch(
    timesteps, edges, adapter: StreamAdapter | None, calibration_dtype, generation_dtype
) -> list[int]:
    """Indices of the schedule steps whose timestep bucket differs when the transformer receives
    the timesteps in `generation_dtype` rather than in the `calibration_dtype` the rotations were
    fitted in (`received_buckets` under each); [] with one bucket or the same dtype."""
    if edges is None or len(edges) < 3 or calibration_dtype == generation_dtype:
        return []
    fitted = received_buckets(timesteps, edges, adapter, calibration_dtype)
    used = received_buckets(timesteps, edges, adapter, generation_dtype)
    return [int(i) for i in (fitted != used).nonzero().flatten()]


def _empty_bucket_error(empty: list[int], edges, what: str, adapter, dtype, hint: str):
    ranges = ", ".join(f"{edges[b]:g}..{edges[b + 1]:g}" for b in empty)
    rounded = ""
    if adapter is not None and adapter.timestep_scale != 1.0 and dtype is not None:
        rounded = f" as the transformer receives them in {str(dtype).removeprefix('torch.')}"
    return DiffalignError(
        f"timestep bucket(s) {empty} ({ranges}) hold none of {what}{rounded}: {hint} "
        "(nothing written)"
    )


def schedule_buckets(
    timesteps, edges: Sequence[float] | None, adapter: StreamAdapter | None = None, dtype=None
) -> list[list[int]]:
    """Per timestep bucket, the indices of the schedule's steps whose timestep falls in it as
    the transformer receives it (`received_buckets`; one bucket holding every step when `edges`
    is None); a bucket that no step reaches is an error."""
    t = torch.as_tensor(timesteps).reshape(-1)
    what = f"the schedule's {len(t)} timesteps"
    return _indices_per_bucket(t, edges, adapter, dtype, what, "use more --steps or fewer")


def _indices_per_bucket(t, edges, adapter, dtype, what: str, advice: str) -> list[list[int]]:
    """Per bucket of `edges`, the indices of `t` that fall in it as the transformer receives
    them (all of them in one list when `edges` is None); an empty bucket is one error line
    naming `what` was bucketed and ending "`advice` --timestep-buckets"."""
    if edges is None:
        return [list(range(len(t)))]
    owner = received_buckets(t, edges, adapter, dtype).tolist()
    out = [[i for i, b in enumerate(owner) if b == bucket] for bucket in range(len(edges) - 1)]
    empty = [b for b, steps in enumerate(out) if not steps]
    if empty:
        raise _empty_bucket_error(
            empty, edges, what, adapter, dtype, f"{advice} --timestep-buckets"
        )
    return out


def _draw_per_bucket(g: torch.Generator, candidates: list[list[int]]) -> list[int]:
    return [c[int(torch.randint(0, len(c), (1,), generator=g))] for c in candidates]


def draw_bucket_steps(seed: int, index: int, candidates: list[list[int]]) -> list[int]:
    """`--timestep-draw bucket`: one step index per bucket for one sample, uniform among that
    bucket's `candidates` (`schedule_buckets`); independent of process count and batch."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index) + 2**62) % (2**63))
    return _draw_per_bucket(g, candidates)


def train_timestep_candidates(
    edges: Sequence[float] | None,
    adapter: StreamAdapter | None = None,
    dtype=None,
    num_train: int = 1000,
) -> list[list[int]]:
    """`--xt-source image`: per bucket of `edges`, the integer timesteps `0..num_train - 1`
    that fall in it as the transformer receives them (`received_buckets`), or all of them in
    one list when `edges` is None; a bucket that none reaches is an error."""
    t = torch.arange(num_train, dtype=torch.float32)
    what = f"the integer timesteps 0..{num_train - 1}"
    return _indices_per_bucket(t, edges, adapter, dtype, what, "use fewer")


def draw_train_timesteps(seed: int, index: int, candidates: list[list[int]]) -> list[int]:
    """`--xt-source image`: integer timesteps, one per list of `candidates`
    (`train_timestep_candidates`: one per bucket, or one overall), each uniform in its list;
    independent of process count and batch."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index) + 2**61) % (2**63))
    return _draw_per_bucket(g, candidates)


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
    """Forward pre-hooks that stream standardised origin/target tokens into the accumulators.

    Inactive unless `rows` is set: then the rows `rows` of the batch, restricted to the token
    mask `mask [len(rows), n]` (None: every token, or on Qwen-Image with `use_call_mask` the
    mask the blocks get), are collected during the next transformer forward, each row into the
    accumulator of its timestep bucket (`accs[b]`; one accumulator without bucket edges).
    With `call_masks` (pipelines that call the transformer once for the prompts, then once for
    the negative prompt) only the first `len(call_masks)` calls of a step are collected.
    `blocks` is a `StreamAdapter` (or, for SD3, the list of joint blocks).
    """

    def __init__(
        self,
        blocks,
        origin: int,
        targets: list[int],
        accs,
        eps: float,
        transformer: torch.nn.Module | None = None,
        bucket_edges: Sequence[float] | None = None,
    ):
        accs = list(accs) if isinstance(accs, list | tuple) else [accs]
        if not isinstance(blocks, StreamAdapter):
            blocks = StreamAdapter("sd3", tuple(blocks), accs[0].feature_dim)
        self.adapter, self.accs, self.eps, self.origin = blocks, accs, eps, origin
        self.acc = accs[0]
        self.edges = None if bucket_edges is None else list(bucket_edges)
        self.rows: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.use_call_mask = False
        self.call_masks: list[torch.Tensor | None] | None = None  # per call of one step
        self.calls_in_step = 0
        self._active = True  # False during a call of the step that is not collected
        self._row_buckets: torch.Tensor | None = None
        self._x: list | None = None
        self.handles = []
        if transformer is not None:
            self.handles.append(
                transformer.register_forward_pre_hook(self._forward, with_kwargs=True)
            )
        blocks = self.adapter.blocks
        self.handles.append(
            blocks[origin].register_forward_pre_hook(self._origin, with_kwargs=True)
        )
        for t in targets:
            self.handles.append(
                blocks[t].register_forward_pre_hook(self._target(t), with_kwargs=True)
            )

    def _forward(self, module, args, kwargs):
        """Per transformer call: the rows' buckets from its timestep; the call's token mask."""
        self._active = True
        if self.call_masks is not None and self.rows is not None:
            self._active = self.calls_in_step < len(self.call_masks)
            if self._active:
                self.mask = self.call_masks[self.calls_in_step]
        self.calls_in_step += 1
        if self.edges is None:
            self._row_buckets = None
            return
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        if t is None:
            raise DiffalignError("timestep buckets: the transformer was called without timestep")
        self._row_buckets = self.adapter.timestep_bucket(t, self.edges)  # generation's rule

    def _groups(self, args, kwargs) -> list[tuple[int, torch.Tensor]]:
        """(bucket, standardised `[tokens, d]`) of the collected rows of this call."""
        text = self.adapter.get_text(args, kwargs)
        rows = self.rows.to(text.device)
        sel = text[rows].to(device=self.acc.xty.device, dtype=torch.float64)
        mask = self.mask
        if mask is None and self.use_call_mask:
            mask = self.adapter.get_text_mask(args, kwargs)
            mask = None if mask is None else mask[rows].bool()
        if mask is None:
            mask = torch.ones(sel.shape[:2], dtype=torch.bool)
        mask = mask.to(sel.device)
        if self._row_buckets is None:
            buckets = torch.zeros(len(rows), dtype=torch.long)
        else:
            rb = self._row_buckets
            buckets = rb.expand(text.shape[0]) if rb.numel() == 1 else rb
            buckets = buckets[self.rows.cpu()]
        out = []
        for b in sorted(set(buckets.tolist())):
            pick = (buckets == b).to(sel.device)
            tokens = sel[pick][mask[pick]]  # [tokens, d]
            out.append((b, standardize(tokens, self.eps)[0]))
        return out

    def _collecting(self) -> bool:
        return self.rows is not None and self._active

    def _origin(self, module, args, kwargs):
        self._x = self._groups(args, kwargs) if self._collecting() else None

    def _target(self, layer: int):
        def hook(module, args, kwargs):
            if self._collecting():
                for (b, x), (_, y) in zip(self._x, self._groups(args, kwargs)):
                    self.accs[b].add(layer, x, y)

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
    token_strategy: str = "valid",
    xt_source: str = "trajectory",
    steps: int | None = None,
    cfg: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    dtype: str = "auto",
    device: str | None = None,
    max_sequence_length: int | None = None,
    eps: float = 1e-6,
    pipe: Any = None,
    prompts: Sequence[str] | None = None,
    single_file_config: str | None = None,
    timestep_buckets: int = 1,
    col_center: bool = False,
    guidance: float | None = None,
    timestep_draw: str = "sample",
    images: Sequence[str | None] | None = None,
    overwrite: bool = False,
    prompt_field: str = "prompt",
    image_field: str = "image",
) -> dict:
    """Calibrate per-layer Procrustes rotations and write them to `output` (spec T).

    `pipe` (a loaded SD3, FLUX.1 or Qwen-Image pipeline) and `prompts` may be given instead of
    `model` / `dataset`. `cfg > 1` adds the unconditional branch (empty negative prompt) to the
    trajectory; only the conditional rows' tokens are collected. `steps`,
    `max_sequence_length`, FLUX's `guidance` and `height`/`width` default to the model card's
    (`resolve_settings`). `timestep_buckets` N > 1 calibrates one rotation
    per bucket of the 0..1000 schedule (`equal_bucket_edges`), from the samples whose drawn
    timestep falls in it (`timestep_draw` "bucket": every sample, at one step drawn in each
    bucket); `col_center` centres the feature columns before each solve. Returns
    the summary that is also written to `summary.json` beside `output`. `xt_source` "image"
    noises each sample's paired image (the dataset's, or `images` beside `prompts`).
    An existing `output` made with other settings, or a `summary.json` beside it reporting
    another file, is refused before the model loads unless `overwrite` (module doc).
    """
    from diffalign.engine.distributed import process_state

    started = time.time()
    if token_strategy not in TOKEN_STRATEGIES:
        raise DiffalignError(f"--token-strategy must be one of {', '.join(TOKEN_STRATEGIES)}")
    if xt_source not in XT_SOURCES:
        raise DiffalignError(f"--xt-source must be one of {', '.join(XT_SOURCES)}")
    if timestep_draw not in TIMESTEP_DRAWS:
        raise DiffalignError(f"--timestep-draw must be one of {', '.join(TIMESTEP_DRAWS)}")
    for name, value in (
        ("--num-samples", num_samples),
        ("--steps", 1 if steps is None else steps),
        ("--batch-size", batch_size),
        ("--timestep-buckets", timestep_buckets),
        ("--max-sequence-length", 1 if max_sequence_length is None else max_sequence_length),
    ):
        if int(value) < 1:
            raise DiffalignError(f"{name} must be at least 1 (got {value})")
    if not math.isfinite(float(cfg)) or cfg < 0:
        raise DiffalignError(f"--cfg must be a finite number >= 0 (got {cfg})")
    if guidance is not None and (not math.isfinite(float(guidance)) or guidance < 0):
        raise DiffalignError(f"--guidance must be a finite number >= 0 (got {guidance})")
    if not 0 <= int(seed) <= 2**63 - 1:
        raise DiffalignError(f"--seed must be between 0 and 2**63 - 1 (got {seed})")
    output_path = Path(output)
    if output_path.is_dir():
        raise DiffalignError(f"--output {output} is a folder; give a file name")
    if pipe is None and not model:
        raise DiffalignError("calibration needs --model")

    state = process_state(device)
    run_device = torch.device(device) if device else state.device
    torch_dtype = _resolve_dtype(dtype, run_device)
    from diffalign.engine.io import output_lock

    # the rotation file and summary.json/procrustes_errors.png beside it: one run per folder
    with output_lock(output_path.parent or Path("."), "calibration output folder"):
        prompts, images = calibration_samples(
            dataset, datadir, prompts, images, num_samples, xt_source, prompt_field, image_field
        )
        settings = resolve_settings(
            model=model,
            pipe=pipe,
            single_file_config=single_file_config,
            steps=steps,
            max_sequence_length=max_sequence_length,
            guidance=guidance,
            height=height,
            width=width,
        )
        if xt_source == "image" and settings.height != settings.width:
            raise DiffalignError(
                f"--xt-source image centre-crops square images: --height {settings.height} and "
                f"--width {settings.width} must be equal"
            )
        identity = calibration_identity(
            model=model,
            single_file_config=single_file_config,
            pipe=pipe,
            dataset=dataset_identity(dataset, datadir, prompts, images, xt_source),
            num_samples=num_samples,
            origin_layer=origin_layer,
            target_layer_start=target_layer_start,
            target_layers=target_layers,
            seed=seed,
            token_strategy=token_strategy,
            xt_source=xt_source,
            settings=settings,
            cfg=cfg,
            dtype=torch_dtype,
            eps=eps,
            timestep_buckets=timestep_buckets,
            col_center=col_center,
            timestep_draw=timestep_draw,
        )
        if not overwrite:
            check_calibration_output(output_path, identity)
        return _calibrate_locked(
            state,
            identity=identity,
            settings=settings,
            model=model,
            dataset=dataset,
            origin_layer=origin_layer,
            target_layer_start=target_layer_start,
            target_layers=target_layers,
            output_path=output_path,
            seed=seed,
            token_strategy=token_strategy,
            xt_source=xt_source,
            cfg=cfg,
            batch_size=batch_size,
            torch_dtype=torch_dtype,
            run_device=run_device,
            eps=eps,
            pipe=pipe,
            prompts=prompts,
            images=images,
            single_file_config=single_file_config,
            started=started,
            timestep_buckets=int(timestep_buckets),
            col_center=bool(col_center),
            timestep_draw=timestep_draw,
        )


def calibration_samples(
    dataset,
    datadir,
    prompts,
    images,
    num_samples: int,
    xt_source: str,
    prompt_field: str = "prompt",
    image_field: str = "image",
) -> tuple[list[str], list[str | None]]:
    """(prompts, images) of the first `num_samples` samples: `prompts`/`images` given in the
    call, or read from `dataset` (`engine.prompts.load_prompts`, a jsonl's `prompt_field` /
    `image_field`); `xt_source` "image" needs an image for every sample."""
    if prompts is None:
        if not dataset:
            raise DiffalignError("calibration needs --dataset (a prompt file or set name)")
        from diffalign.engine.prompts import load_prompts

        records = load_prompts(
            dataset, datadir, limit=num_samples, prompt_field=prompt_field, image_field=image_field
        )
        prompts, images = [r.prompt for r in records], [r.image for r in records]
    prompts = list(prompts)[:num_samples]
    if not prompts:
        raise DiffalignError("the calibration prompt set is empty")
    images = list(images or [])[: len(prompts)]
    images += [None] * (len(prompts) - len(images))
    if xt_source == "image":
        missing = [i for i, image in enumerate(images) if not image]
        if missing:
            raise DiffalignError(
                f"--xt-source image needs image-caption pairs: sample {missing[0]} has no image "
                "(a .jsonl with an image field, COCO captions with their images, ...)"
            )
        unreadable = [str(image) for image in images if not Path(image).is_file()]
        if unreadable:
            raise DiffalignError(f"--xt-source image: image not found: {unreadable[0]}")
    return prompts, images


def dataset_identity(dataset, datadir, prompts: list[str], images: list, xt_source: str) -> dict:
    """What identifies the samples a calibration reads (spec E: Safety): their content,
    `engine.identity.samples_sha256` of each prompt and, with `xt_source` "image", the sha256 of
    its image's bytes (other sources never read the images), so another spelling of the same
    dataset's path is the same dataset and changed captions or images are another; and, for
    display only (`DISPLAY_ONLY`, not compared), the resolved path(s) it was read from. The
    images' digests come from the engine's digest cache (`cached_files_sha256`, keyed by
    resolved path, size and mtime_ns): a re-run reads only the images that changed."""
    from diffalign.engine.identity import cached_files_sha256, samples_sha256

    if xt_source == "image":
        samples = [[p, d] for p, d in zip(prompts, cached_files_sha256(images))]
    else:
        samples = list(prompts)
    path = None
    if dataset:
        from diffalign.engine.prompts import prompt_set_paths

        path = prompt_set_paths(dataset, datadir)
    return {"samples": len(prompts), "sha256": samples_sha256(samples), "path": path}


# identity keys shown to the user but never compared: where the same content was read from
DISPLAY_ONLY = ("dataset.path",)


@dataclass(frozen=True)
class CalibrationSettings:
    """The settings a calibration takes from the model card where not given, resolved once,
    before the identity is recorded and the model loads (`resolve_settings`)."""

    variant: str  # families.DEFAULTS key: sd3, flux-dev, flux-schnell or qwen-image
    steps: int
    max_sequence_length: int
    guidance: float | None  # FLUX.1's distilled guidance (None: the model has none)
    height: int
    width: int


def resolve_settings(
    *,
    model: str | None,
    pipe: Any,
    single_file_config: str | None,
    steps: int | None,
    max_sequence_length: int | None,
    guidance: float | None,
    height: int | None,
    width: int | None,
) -> CalibrationSettings:
    """The given settings with the model card's defaults filled in (`families.DEFAULTS`; the
    model's own sample size from its config files, `sizes.model_image_size`, or a loaded
    `pipe`'s), so an explicit `--steps 28` on SD3 is the default. The variant is read from
    `pipe` when one is given, else from `model`'s files or name (`families.model_variant`).
    `--guidance` on a model without distilled guidance and a size the model cannot make are
    one-line errors."""
    from diffalign.textstream.families import DEFAULTS, loaded_variant, model_variant
    from diffalign.textstream.sizes import fit_image_size, model_image_size, pipeline_image_size

    if pipe is not None:
        variant = loaded_variant(stream_adapter(pipe.transformer).family, pipe.transformer)
        size, name = pipeline_image_size(pipe), type(pipe).__name__
    else:
        variant = model_variant(model, single_file_config)
        size, name = model_image_size(model, single_file_config), str(model)
    card = DEFAULTS[variant]
    if guidance is not None and card.guidance is None:
        raise DiffalignError(f"--guidance is FLUX.1's distilled guidance; {variant} has none")
    h, w = fit_image_size(size, height, width, name)
    return CalibrationSettings(
        variant=variant,
        steps=card.steps if steps is None else int(steps),
        max_sequence_length=(
            card.max_sequence_length if max_sequence_length is None else int(max_sequence_length)
        ),
        guidance=card.guidance if guidance is None else float(guidance),
        height=h,
        width=w,
    )


def calibration_identity(
    *,
    model,
    single_file_config,
    pipe,
    dataset: dict,
    num_samples,
    origin_layer,
    target_layer_start,
    target_layers,
    seed,
    token_strategy,
    xt_source,
    settings: CalibrationSettings,
    cfg,
    dtype,
    eps,
    timestep_buckets,
    col_center,
    timestep_draw,
) -> dict:
    """What shapes a rotation file, known before the model loads (spec E: Safety): the model's
    `model_identity` (a pipeline passed in: its class), the samples by content
    (`dataset_identity`), and the settings as resolved (`resolve_settings`). Left out, as they
    cannot change the rotations beyond float rounding of batched forwards: batch size, device
    (its dtype stays in), processes."""
    from diffalign.engine.identity import model_identity

    return {
        "model": model_identity(model) if model else {"pipeline": type(pipe).__name__},
        "single_file_config": model_identity(single_file_config),
        "dataset": dataset,
        "num_samples": int(num_samples),
        "origin_layer": int(origin_layer),
        "targets": (
            {"start": int(target_layer_start)}
            if target_layers is None
            else {"layers": [int(t) for t in target_layers]}
        ),
        "seed": int(seed),
        "token_strategy": token_strategy,
        "xt_source": xt_source,
        "steps": settings.steps,
        "cfg": float(cfg),
        "height": settings.height,
        "width": settings.width,
        "dtype": str(dtype).removeprefix("torch."),
        "max_sequence_length": settings.max_sequence_length,
        "eps": float(eps),
        "timestep_buckets": int(timestep_buckets),
        "col_center": bool(col_center),
        "guidance": settings.guidance,
        "timestep_draw": timestep_draw,
    }


def recorded_identity(path: Path) -> dict | None:
    """The `calibration_identity` a rotation file records; None for a file without one (an
    older diffalign's, the seed's `.pt`, or not a rotation file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return parse_identity((f.metadata() or {}).get("identity"))
    except Exception:  # noqa: BLE001 - unreadable: nothing recorded
        return None


def check_calibration_output(output_path: Path, identity: dict) -> None:
    """Refuse (one DiffalignError line, nothing written) a run that would replace a rotation file
    made with other settings, or reports beside it that describe another rotation file."""
    import json

    from diffalign.engine.identity import check_identity

    hint = (
        "rerun with the settings it was made with, pass --overwrite to replace it, or choose "
        "another --output"
    )
    if output_path.exists():
        old = recorded_identity(output_path)
        if old is None:
            raise DiffalignError(
                f"--output {output_path} exists and records no calibration settings (written "
                "by an older diffalign, or not a rotation file), so a re-run cannot be checked "
                "against it: pass --overwrite to replace it, or choose another --output"
            )
        check_identity(old, identity, f"--output {output_path} was", free=DISPLAY_ONLY, hint=hint)
    summary = output_path.parent / "summary.json"
    if summary.exists():
        try:
            owner = json.loads(summary.read_text(encoding="utf-8")).get("output")
        except (OSError, ValueError, AttributeError):
            owner = None
        if not isinstance(owner, str) or Path(owner).name != output_path.name:
            what = f"reports {Path(owner).name}" if isinstance(owner, str) else "is another job's"
            raise DiffalignError(
                f"{summary} {what}, not {output_path.name}: pass --overwrite to replace it and "
                "procrustes_errors.png, or calibrate into another folder"
            )


def _calibrate_locked(
    state,
    *,
    identity: dict,
    settings: CalibrationSettings,
    model,
    dataset,
    origin_layer,
    target_layer_start,
    target_layers,
    output_path: Path,
    seed,
    token_strategy,
    xt_source,
    cfg,
    batch_size,
    torch_dtype: torch.dtype,
    run_device: torch.device,
    eps,
    pipe,
    prompts: list[str],
    images: list,
    single_file_config,
    started,
    timestep_buckets=1,
    col_center=False,
    timestep_draw="sample",
) -> dict:
    from diffalign.engine.distributed import rank_batches
    from diffalign.textstream.families import check_schedule
    from diffalign.textstream.sizes import fit_image_size, pipeline_image_size

    steps, guidance = settings.steps, settings.guidance
    max_sequence_length = settings.max_sequence_length
    height, width = settings.height, settings.width
    if pipe is None:
        pipe = _load_pipeline(model, settings.variant, torch_dtype, run_device, single_file_config)
    pipe = pipe.to(device=run_device, dtype=torch_dtype)
    tr = pipe.transformer
    adapter = stream_adapter(tr)
    family = adapter.family
    check_schedule(pipe, steps)
    fit_image_size(pipeline_image_size(pipe), height, width, str(model or type(pipe).__name__))
    num_layers, feature_dim = adapter.num_blocks, adapter.feature_dim
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

    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    channels = int(tr.config.in_channels) // (1 if family == "sd3" else 4)
    latent_shape = (channels, height // vsf, width // vsf)

    edges = None
    if timestep_buckets > 1:
        num_train = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
        edges = equal_bucket_edges(timestep_buckets, num_train)
    accs = [
        ProcrustesAccumulator(target_layers, feature_dim, device=run_device)
        for _ in range(max(1, timestep_buckets))
    ]
    if xt_source == "image":  # at the first batch: a bucket no integer timestep reaches
        candidates = train_timestep_candidates(edges, adapter, torch_dtype)
        if timestep_draw == "sample":
            candidates = [sorted(t for c in candidates for t in c)]
    # the 1-process batches, rank r taking batches r, r + N, ...: a sample's tokens do not
    # depend on the number of processes (only the order of the float64 sums does)
    batches = rank_batches(
        range(len(prompts)), batch_size, state.process_index, state.num_processes
    )
    drawn: dict[int, list[int]] = {}  # sample -> its step indices ("image": its timesteps)
    collector = _TokenCollector(
        adapter, origin_layer, target_layers, accs, eps, transformer=tr, bucket_edges=edges
    )
    try:
        with torch.no_grad():
            for batch in progress(batches, desc="calibrate", total=len(batches)):
                run = _run_batch if family == "sd3" else _run_batch_pipeline
                extra = {} if family == "sd3" else {"guidance": guidance, "size": (height, width)}
                if xt_source == "image":
                    extra["x0"] = _image_latents(pipe, family, [images[i] for i in batch], height)
                    extra["train_candidates"] = candidates
                ks = run(
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
                    timestep_draw=timestep_draw,
                    **extra,
                )
                drawn.update(zip(batch, ks))
    finally:
        collector.close()

    if state.num_processes > 1:
        import torch.distributed as dist

        for acc in accs:
            flat = acc.state()
            dist.all_reduce(flat)
            acc.load_state(flat)
    # step indices, or with --xt-source image timesteps in 10 bins of 0..1000
    bins, width_of_bin = (10, 100) if xt_source == "image" else (steps, 1)
    counts = torch.zeros(bins, dtype=torch.float64, device=run_device)
    for k in (k for ks in drawn.values() for k in ks):
        counts[min(int(k) // width_of_bin, bins - 1)] += 1
    if state.num_processes > 1:
        dist.all_reduce(counts)
    histogram = [int(c) for c in counts.tolist()]

    bucket_tokens = [int(acc.count[0]) for acc in accs]
    empty = [b for b, n in enumerate(bucket_tokens) if n == 0]
    if empty and edges is not None:
        ranges = ", ".join(f"{edges[b]:g}..{edges[b + 1]:g}" for b in empty)
        raise DiffalignError(
            f"timestep bucket(s) {empty} ({ranges}) got no samples: use more --num-samples or "
            "fewer --timestep-buckets (nothing written)"
        )
    per_layer: list[dict] = []
    bucket_rotations = []
    for b, acc in enumerate(accs):
        rots, report = acc.solve(column_center=col_center)
        bucket_rotations.append(rots)
        per_layer += [{**r, "bucket": b} if edges is not None else r for r in report]
    if edges is None:
        rotations = {t: r.to(torch.float32) for t, r in bucket_rotations[0].items()}
    else:
        rotations = {
            t: torch.stack([rots[t] for rots in bucket_rotations]).to(torch.float32)
            for t in target_layers
        }
    num_valid_tokens = sum(int(acc.count[0]) for acc in accs)  # after solve(): all counted
    summary = {
        "output": str(output_path),
        "model": str(model) if model else type(pipe).__name__,
        "dataset": dataset if isinstance(dataset, str | None) else list(dataset),
        "dataset_path": identity["dataset"]["path"],
        "num_samples": len(prompts),
        "origin_layer": int(origin_layer),
        "target_layers": target_layers,
        "feature_dim": feature_dim,
        "num_valid_tokens": num_valid_tokens,
        "token_strategy": token_strategy,
        "collected_branch": COLLECTED_BRANCH,
        "model_family": family,
        "strategy": "row_ln_then_col_center" if col_center else "row_ln",
        "column_center": bool(col_center),
        "timestep_buckets": len(accs),
        "timestep_bucket_edges": edges,
        "bucket_tokens": bucket_tokens,
        "guidance": guidance,
        "max_sequence_length": int(max_sequence_length),
        "xt_source": xt_source,
        "steps": int(steps),
        "cfg": float(cfg),
        "timestep_draw": timestep_draw,
        "seed": int(seed),
        "height": height,
        "width": width,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "num_processes": state.num_processes,
        "timestep_index_histogram": None if xt_source == "image" else histogram,
        "timestep_histogram_per_100": histogram if xt_source == "image" else None,
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
            "collected_branch",
            "timestep_draw",
            "guidance",
            "max_sequence_length",
        )
        save_rotations(
            output_path,
            RotationSet(
                origin_layer=int(origin_layer),
                target_layers=target_layers,
                rotations=rotations,
                feature_dim=feature_dim,
                num_valid_tokens=num_valid_tokens,
                strategy=summary["strategy"],
                metadata={**{k: summary[k] for k in meta_keys}, "identity": identity},
                timestep_bucket_edges=edges,
                column_center=bool(col_center),
                model_family=family,
                token_strategy=token_strategy,
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
    timestep_draw: str = "sample",
    x0: torch.Tensor | None = None,
    train_candidates: list[list[int]] | None = None,
) -> list[list[int]]:
    """Run one batch to each sample's drawn steps and collect its tokens there; returns each
    sample's step indices (with `xt_source` "image", `x0` the images' latents `[B, C, h, w]`:
    each sample's timesteps drawn from `train_candidates`, `draw_train_timesteps`)."""
    tr = pipe.transformer
    use_cfg = cfg > 1.0
    draws = [draw_sample(seed, i, steps, latent_shape) for i in indices]
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
    else:
        mask = torch.ones(b, n_tok, dtype=torch.bool)
    if use_cfg:  # pipeline order: unconditional rows first
        pe, pooled = torch.cat([npe, pe]), torch.cat([npooled, pooled])

    def collect(sel: list[int]) -> None:
        """Arm the collector for the conditional rows of the samples `sel`."""
        if not sel:
            collector.rows = None
            return
        offset = b if use_cfg else 0  # the conditional rows follow the unconditional ones
        collector.rows = torch.tensor([offset + s for s in sel])
        collector.mask = torch.stack([mask[s] for s in sel])

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device, **_shift_kwargs(scheduler, tr, latents))
    timesteps = scheduler.timesteps
    if len(timesteps) != steps:
        raise DiffalignError(f"the scheduler made {len(timesteps)} timesteps for --steps {steps}")
    if xt_source == "image":
        noise = torch.stack([n for _, n in draws])  # float32, CPU
        plans = [draw_train_timesteps(seed, i, train_candidates) for i in indices]
    else:
        plans = _plans(draws, indices, seed, timestep_draw, timesteps, collector, dtype)
    if xt_source != "trajectory":
        for j in range(len(plans[0])):  # one forward per drawn timestep/step of every sample
            collect(list(range(b)))
            if xt_source == "image":
                t = torch.tensor([float(p[j]) for p in plans])
                xt = noisy_latents(x0, noise, t / 1000.0).to(device=device, dtype=dtype)
                t = collector.adapter.received_timesteps(t, dtype).to(device)
            else:  # "noise": the initial noise at the drawn steps' timesteps
                xt = latents
                t = timesteps[torch.tensor([p[j] for p in plans], device=timesteps.device)]
            tr(
                hidden_states=torch.cat([xt, xt]) if use_cfg else xt,
                timestep=torch.cat([t, t]) if use_cfg else t,
                encoder_hidden_states=pe,
                pooled_projections=pooled,
                return_dict=False,
            )
            collector.rows = None
        return plans

    last = max(max(p) for p in plans)
    for i, t in enumerate(timesteps[: last + 1]):
        collect([s for s in range(b) if i in plans[s]])
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        pred = tr(
            hidden_states=model_in,
            timestep=t.expand(model_in.shape[0]),
            encoder_hidden_states=pe,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        collector.rows = None
        if i == last:
            break
        if use_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + cfg * (cond - uncond)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return plans


def _image_latents(pipe, family: str, images: list[str], size: int) -> torch.Tensor:
    """`[B, C, h, w]` float32 CPU latents of the images, each encoded alone (batch-independent),
    normalised as `textstream cache` stores them."""
    from diffalign.engine.pairs import ImageCaption
    from diffalign.textstream.cache import _load_pixels, encode_image
    from diffalign.textstream.flow import family as flow_family

    flow = flow_family(family)
    pairs = [ImageCaption(id="", image=Path(image), caption="") for image in images]
    return torch.stack([encode_image(flow, pipe, _load_pixels(p, size)) for p in pairs])


def _plans(draws, indices, seed, timestep_draw, timesteps, collector, dtype) -> list[list[int]]:
    """The step indices each sample is collected at: its drawn step ("sample"), or one step
    drawn in each timestep bucket ("bucket"), the buckets of the timesteps as the transformer
    will receive them in `dtype` (`schedule_buckets`, the collector's and generation's rule). A
    bucket that none of them reaches is an error here, at the first batch (no sample could
    ever fall in it), not after the whole run."""
    candidates = schedule_buckets(timesteps, collector.edges, collector.adapter, dtype)
    if timestep_draw == "sample":
        return [[k] for k, _ in draws]
    return [draw_bucket_steps(seed, i, candidates) for i in indices]


def _run_batch_pipeline(
    pipe,
    collector: _TokenCollector,
    indices: list[int],
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    latent_shape,
    cfg: float,
    guidance: float | None,
    size: tuple[int, int],
    xt_source: str,
    token_strategy: str,
    max_sequence_length: int,
    dtype,
    device,
    timestep_draw: str = "sample",
    x0: torch.Tensor | None = None,
    train_candidates: list[list[int]] | None = None,
) -> list[list[int]]:
    """FLUX.1 / Qwen-Image: run the pipeline itself from each sample's noise and collect at the
    drawn steps; returns each sample's step indices (with `xt_source` "image": timesteps).

    The pipeline is driven with `latents=` (the packed noise of `draw_sample`) and a step
    callback that arms the collector for the rows whose step comes next and stops the loop
    after the last one. "noise" resets the latents to the initial noise after every step, so
    the transformer sees pure noise at the drawn step's timestep. With true CFG (`cfg > 1`) the
    pipeline calls the transformer once for the prompts, then once for the negative prompt;
    only the first call (the prompts) is collected. With `timestep_draw` "bucket" the steps
    are drawn once the pipeline has set its schedule (at its first transformer call).
    "image" collects the first calls of the pipeline, one step per drawn timestep, with the
    transformer's `hidden_states` and `timestep` replaced by the noised image latents and the
    drawn timestep (a pre-hook), so text, guidance and positions stay the pipeline's.
    """
    from diffalign.textstream.families import pipeline_kwargs

    family = collector.adapter.family
    draws = [draw_sample(seed, i, steps, latent_shape) for i in indices]
    plans: list[list[int]] = []
    b = len(prompts)
    c, h, w = latent_shape
    noise = torch.stack([n for _, n in draws]).to(device=device, dtype=dtype)
    packed = pipe._pack_latents(noise, b, c, h, w)
    use_cfg = cfg > 1.0
    negative = "" if family == "flux" else " "
    masks: list[torch.Tensor | None] = [None]  # one collected call per step: the prompts'
    # Qwen-Image: the blocks' text mask drops the batch padding (see the module docstring)
    collector.use_call_mask = family == "qwen-image"
    if token_strategy == "valid" and family == "flux":
        masks = [_t5_mask(pipe.tokenizer_2, prompts, max_sequence_length)]

    def arm(step: int) -> None:
        rows = [s for s in range(b) if step in plans[s]]
        collector.calls_in_step = 0
        if not rows:
            collector.rows = None
            return
        collector.rows = torch.tensor(rows)
        collector.call_masks = [None if m is None else m[rows] for m in masks]

    def on_step_end(p, i, t, kwargs):
        step[0] = i + 1
        arm(i + 1)
        if i >= max(max(s) for s in plans):
            p._interrupt = True  # the remaining steps are skipped
        return {"latents": packed.clone()} if xt_source == "noise" else {}

    step = [0]  # the pipeline step the next transformer call belongs to
    drawn_t: list[list[int]] = []  # xt_source "image": each sample's timesteps, step j = draw j

    def plan(module, args, kwargs):  # first transformer call: the pipeline's schedule is set
        if not plans:
            if xt_source == "image":
                drawn_t.extend(draw_train_timesteps(seed, i, train_candidates) for i in indices)
                n = len(drawn_t[0])
                if n > steps:
                    raise DiffalignError(
                        f"--xt-source image: {n} timesteps per sample need --steps >= {n} "
                        "(one pipeline step each)"
                    )
                plans.extend([list(range(n)) for _ in indices])
            else:
                timesteps, cast = pipe.scheduler.timesteps, kwargs["timestep"].dtype
                plans.extend(
                    _plans(draws, indices, seed, timestep_draw, timesteps, collector, cast)
                )
            arm(0)
        if xt_source != "image":
            return None
        t = torch.tensor([float(d[step[0]]) for d in drawn_t])
        xt = pipe._pack_latents(noisy_latents(x0, noise_cpu, t / 1000.0), b, c, h, w)
        hidden = kwargs["hidden_states"]
        received = collector.adapter.received_timesteps(t, dtype)  # as the pipeline rounds it
        return args, {
            **kwargs,
            "hidden_states": xt.to(device=hidden.device, dtype=hidden.dtype),
            "timestep": received.to(hidden.device),
        }

    noise_cpu = torch.stack([n for _, n in draws])
    first_call = pipe.transformer.register_forward_pre_hook(plan, with_kwargs=True, prepend=True)
    try:
        pipe(
            prompt=prompts,
            latents=packed.clone(),
            height=size[0],
            width=size[1],
            output_type="latent",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
            **pipeline_kwargs(
                family,
                steps=steps,
                cfg=cfg,
                guidance=guidance,
                negative_prompt=negative if use_cfg else None,
                max_sequence_length=max_sequence_length,
            ),
        )
    finally:
        first_call.remove()
        collector.rows = None
        collector.call_masks = None
        pipe._interrupt = False
    return drawn_t if xt_source == "image" else plans


def _t5_mask(tokenizer, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
    """Bool `[B, max_sequence_length]`: T5 tokens through EOS, as FLUX's pipeline pads them."""
    enc = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        return_tensors="pt",
    )
    return enc.attention_mask.bool()


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
    """The `--dtype` names only (`DTYPES` or "auto"), resolved by `engine.loading.resolve_dtype`."""
    from diffalign.engine.loading import resolve_dtype

    if dtype != "auto" and dtype not in DTYPES:
        raise DiffalignError(f"--dtype must be auto or one of {', '.join(DTYPES)} (got '{dtype}')")
    return resolve_dtype(dtype, device)


def _load_pipeline(
    model: str,
    variant: str,
    torch_dtype: torch.dtype,
    device: torch.device,
    single_file_config: str | None,
):
    from diffalign.textstream.families import load_text_to_image

    return load_text_to_image(
        model,
        variant,
        dtype=torch_dtype,
        device=str(device),
        single_file_config=single_file_config,
    )


def _write_reports(folder: Path, summary: dict) -> None:
    from diffalign.engine.reports import plot_curves, write_summary

    write_summary(folder / "summary.json", summary)
    curves = {}
    for b in sorted({r.get("bucket", 0) for r in summary["per_layer"]}):
        rows = [r for r in summary["per_layer"] if r.get("bucket", 0) == b]
        tag = f" (bucket {b})" if summary.get("timestep_buckets", 1) > 1 else ""
        layers = [r["layer"] for r in rows]
        curves[f"before rotation{tag}"] = (layers, [r["error_before"] for r in rows])
        curves[f"after rotation{tag}"] = (layers, [r["error_after"] for r in rows])
    plot_curves(
        folder / "procrustes_errors.png",
        curves,
        title=f"text-stream alignment to origin layer {summary['origin_layer']}",
        xlabel="target layer",
        ylabel="||X R - Y||^2 / ||Y||^2",
    )
