"""Image generation with the text-stream residual: `sample`, `generate`, `geneval`, `dpg`,
`compbench` (spec T: Generation; seeds 002 and 000).

Each command is a list of prompts turned into images by one SD3/SD3.5, FLUX.1 or Qwen-Image
pipeline (`families`) with an optional `TextStreamResidual` attached to its transformer.
Unset sampling options (steps, cfg, FLUX guidance, token length) take the model card's values. What differs is only where the images go:

- `sample`:   `OUT/<model>_<prompt slug>/000.png ...` + `settings.json` per folder (seed 002:
  one folder per prompt/model combination), `grid.png` when there are several samples.
- `generate`: `OUT/<index:05d>_<prompt slug>/000.png ...` + `prompt.json` and `settings.json` per folder;
  `OUT/settings.json` and `OUT/summary.json` for the run.
- `geneval`:  `OUT/<index:05d>/metadata.jsonl` (the prompt's input line) and
  `OUT/<index:05d>/samples/0000.png ...` + `grid.png`; run files `OUT/settings.json` and
  `OUT/summary.json` (non-digit names, skipped by the evaluator). FORMATS.md: GenEval.
- `dpg`:      `OUT/<id>.png`, a row-major 2x2 grid of 4 square tiles, nothing else in `OUT`;
  run files beside it: `OUT.settings.json` and `OUT.summary.json`. FORMATS.md: DPG-Bench.
- `compbench`: `OUT/samples/<prompt>_<counter:06d>.png` for one `<category>_val.txt`
  (`OUT/<category>/samples/...` for a folder of them), counter `i * n_samples + k`;
  `OUT/settings.json` and `OUT/summary.json`. FORMATS.md: T2I-CompBench.

Every unit of output (a prompt folder, a DPG png, a CompBench image) appears atomically, so an interrupted run
leaves only finished units; a re-run skips them (`overwrite=True` redoes them). The settings a
run records include its prompt set by content (identity key `prompts`:
`engine.identity.samples_sha256` of the whole set in order, before `--limit`), so a re-run with other prompts is refused (`sample`: the
folder's prompt and its index), the same prompts by another path resume, and a larger `--limit`
extends. Image k of prompt i uses the seed `seed + i * n_samples + k` (CPU generator),
independent of the batch size and of how prompts are sharded over processes. Under `accelerate launch` process r of w takes
prompts `i % w == r`; rank 0 writes the run-level settings and, after all ranks finish, the
summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import earlier_units, remove_units
from diffalign.textstream.sizes import fit_image_size, model_image_size

SEED_RULE = "image k of prompt i uses seed + i * n_samples + k (torch CPU generator)"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "bfloat16": "bf16",
}
# options that do not change the pixels: a finished folder made with other values is reused
_NOT_IMAGE_AFFECTING = {"batch_size", "device", "overwrite"}


@dataclass
class GenerationConfig:
    """Sampling options shared by all generation commands (spec T: Generation)."""

    model: str = "sd3"
    vae: str | None = None
    single_file_config: str | None = None
    steps: int | None = None  # None: the model card's (families.DEFAULTS)
    cfg: float | None = None
    height: int | None = None  # None: the model's own sample size (`model_image_size`)
    width: int | None = None
    seed: int = 0
    n_samples: int = 1
    batch_size: int | None = None  # None: all samples of a prompt in one pipeline call
    negative_prompt: str | None = None
    dtype: str | None = None  # fp32 | fp16 | bf16; None: bf16 on cuda, fp32 otherwise
    device: str | None = None  # None: the accelerate process's device (cuda if available)
    max_sequence_length: int | None = None
    overwrite: bool = False
    guidance: float | None = None  # FLUX.1 distilled guidance; None: the model card's


@dataclass
class ResidualConfig:
    """Residual options as the user gave them (seed 002 / 000 names).

    `target_layers=None` means "not given" (the rotation file's layers if one is given, else
    off); `[]` means off. `mode=None` lets `build_residual` choose.
    """

    origin_layer: int | None = None
    target_layers: list[int] | None = None
    weights: list[float] | None = None
    weights_file: str | None = None  # learned weights (`train-weights`): see apply_weights_file
    mode: str | None = None
    procrustes_path: str | None = None
    layernorm: bool = False
    col_center: bool = False  # check: the rotation file was calibrated with --col-center


@dataclass
class RunSummary:
    """What a run did; written as `summary.json` by rank 0."""

    command: str
    prompts_total: int = 0
    prompts_done: int = 0
    prompts_skipped: int = 0
    images_written: int = 0
    seconds: float = 0.0
    world_size: int = 1
    outputs: list[str] = field(default_factory=list)
    # steps put in another rotation bucket than calibration's by the dtype (ResidualGenerator)
    bucket_dtype_mismatch_steps: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.bucket_dtype_mismatch_steps:
            del d["bucket_dtype_mismatch_steps"]
        d["seconds"] = round(self.seconds, 3)
        d["seconds_per_image"] = (
            round(self.seconds / self.images_written, 4) if self.images_written else None
        )
        return d


# ------------------------------------------------------------------------------------------------
# small pure helpers


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug of a prompt: lowercase ascii letters/digits joined by `_`."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_len].rstrip("_") or "prompt"


def compbench_image_name(prompt: str, counter: int) -> str:
    """T2I-CompBench's image name `<prompt>_<counter, 6 digits>.png` (their inference_eval.py;
    their evaluators read the prompt up to the first `_`, the counter after the last)."""
    return f"{prompt}_{counter:06d}.png"


def model_short_name(model: str) -> str:
    """Short name for folder names: a preset as is, else the last path part without suffix."""
    name = str(model).rstrip("/\\")
    name = re.split(r"[/\\]", name)[-1]
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return name or "model"


def image_seeds(seed: int, prompt_index: int, n_samples: int) -> list[int]:
    """Seeds of the images of one prompt: `seed + prompt_index * n_samples + k`."""
    return [seed + prompt_index * n_samples + k for k in range(n_samples)]


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The prompt indices process `rank` of `world_size` takes: `i % world_size == rank`."""
    return [i for i in range(n) if i % world_size == rank]


def normalize_dtype(dtype: str | None, device: str) -> str:
    """`fp32`/`fp16`/`bf16` from any common spelling; None -> bf16 on cuda, fp32 elsewhere."""
    if dtype is None:
        return "bf16" if str(device).startswith("cuda") else "fp32"
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPE_ALIASES:
        raise DiffalignError(f"unknown dtype '{dtype}' (use fp32, fp16 or bf16)")
    return _DTYPE_ALIASES[key]


def sample_folder_names(models: Sequence[str], prompts: Sequence[str]) -> list[list[str]]:
    """`<model>_<slug>` per (model, prompt); clashing names get a short hash of the prompt."""
    out = []
    shorts = [model_short_name(m) for m in models]
    for m, short in zip(models, shorts):
        if shorts.count(short) > 1:  # two checkpoints with one file name
            short = f"{short}_{hashlib.sha1(str(m).encode()).hexdigest()[:6]}"
        names = [f"{short}_{slugify(p)}" for p in prompts]
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        fixed = []
        for n, p in zip(names, prompts):
            if counts[n] > 1:
                n = f"{n}_{hashlib.sha1(p.encode()).hexdigest()[:8]}"
            fixed.append(n)
        out.append(fixed)
    return out


# ------------------------------------------------------------------------------------------------
# validation before anything is loaded or written


def resolve_sampling(cfg: GenerationConfig) -> GenerationConfig:
    """`cfg` with the unset sampling options filled from the model card of `cfg.model`'s
    family (families.DEFAULTS); `--guidance` on a model without distilled guidance is an
    error."""
    from diffalign.textstream.families import DEFAULTS, model_variant

    variant = model_variant(cfg.model, cfg.single_file_config)
    d = DEFAULTS[variant]
    if cfg.guidance is not None and d.guidance is None:
        raise DiffalignError(
            f"--guidance is FLUX.1's distilled guidance; --model {cfg.model} ({variant}) has "
            "none (use --cfg)"
        )
    return GenerationConfig(
        **{
            **asdict(cfg),
            "steps": d.steps if cfg.steps is None else cfg.steps,
            "cfg": d.cfg if cfg.cfg is None else cfg.cfg,
            "guidance": d.guidance if cfg.guidance is None else cfg.guidance,
            "max_sequence_length": (
                d.max_sequence_length
                if cfg.max_sequence_length is None
                else cfg.max_sequence_length
            ),
        }
    )


def validate_config(cfg: GenerationConfig) -> None:
    """Check the sampling options that need no model; one-line DiffalignError on bad values."""
    import math

    if None in (cfg.steps, cfg.cfg, cfg.max_sequence_length):
        cfg = resolve_sampling(cfg)
    if cfg.guidance is not None and (not math.isfinite(float(cfg.guidance)) or cfg.guidance < 0):
        raise DiffalignError(f"--guidance must be a finite number >= 0 (got {cfg.guidance})")
    for name in ("steps", "height", "width", "n_samples", "max_sequence_length"):
        if getattr(cfg, name) is not None and int(getattr(cfg, name)) < 1:
            raise DiffalignError(f"--{name.replace('_', '-')} must be at least 1")
    if not math.isfinite(float(cfg.cfg)) or cfg.cfg < 0:
        raise DiffalignError(f"--cfg must be a finite number >= 0 (got {cfg.cfg})")
    if not 0 <= int(cfg.seed) <= 2**63 - 1:
        raise DiffalignError(f"--seed must be between 0 and 2**63 - 1 (got {cfg.seed})")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise DiffalignError("--batch-size must be at least 1")
    normalize_dtype(cfg.dtype, "cpu")


def validate_residual_config(
    rc: ResidualConfig, model: str | None = None, single_file_config: str | None = None
) -> None:
    """Checks that need no loaded model: list lengths, file existence, origin < targets, and
    (for a local folder `model`) targets within its transformer's block count."""
    from diffalign.textstream.families import config_block_count

    blocks = config_block_count(model) if model is not None else None
    count = f" (the transformer has {blocks} blocks)" if blocks else ""
    if rc.procrustes_path is not None and not Path(rc.procrustes_path).is_file():
        raise DiffalignError(f"rotation file not found: {rc.procrustes_path}")
    if rc.mode not in (None, "plain", "ln"):
        raise DiffalignError(f"--residual-mode must be plain or ln (got '{rc.mode}')")
    if rc.mode == "plain" and (rc.layernorm or rc.procrustes_path or rc.col_center):
        raise DiffalignError(
            "--residual-layernorm, --residual-procrustes-path and --col-center need "
            "--residual-mode ln"
        )
    if rc.col_center and rc.procrustes_path is None:
        raise DiffalignError("--col-center needs a rotation file calibrated with --col-center")
    targets = rc.target_layers
    if targets:
        if len(set(targets)) != len(targets):
            raise DiffalignError(f"--residual-target-layers has duplicates: {targets}")
        if any(t < 0 for t in targets):
            raise DiffalignError(f"--residual-target-layers must be >= 0 (got {targets})")
        if rc.weights is not None and len(rc.weights) not in (1, len(targets)):
            raise DiffalignError(
                f"--residual-weights has {len(rc.weights)} values for {len(targets)} target "
                "layers (give one value, or one per target)"
            )
        if rc.origin_layer is not None and any(t <= rc.origin_layer for t in targets):
            raise DiffalignError(
                f"residual target layers {targets} must all be after the origin layer "
                f"{rc.origin_layer}{count}"
            )
        if blocks and max(targets) > blocks - 1:
            raise DiffalignError(
                f"residual target layers {[t for t in targets if t > blocks - 1]} out of range: "
                f"the transformer has {blocks} blocks (0..{blocks - 1})"
            )
    if rc.origin_layer is not None and rc.origin_layer < 0:
        raise DiffalignError(f"--residual-origin-layer must be >= 0 (got {rc.origin_layer})")
    if rc.weights is not None:
        import math

        if not all(math.isfinite(w) for w in rc.weights):
            raise DiffalignError(f"--residual-weights must be finite numbers (got {rc.weights})")
        if not targets and rc.procrustes_path is None:
            raise DiffalignError(
                "--residual-weights does nothing without target layers (the residual is off): "
                "add --residual-target-layers (or a --residual-procrustes-path rotation file)"
            )
    if rc.weights_file is not None:
        from diffalign.textstream.families import family_of_variant, model_variant
        from diffalign.textstream.weights import apply_weights_file

        family = (
            family_of_variant(model_variant(model, single_file_config))
            if model is not None
            else None
        )
        apply_weights_file(rc, family)  # the file's own checks, before any model loads


def sized_config(cfg: GenerationConfig) -> GenerationConfig:
    """`cfg` with the model's own sample size where --height/--width are not given; a size the
    model cannot make is a one-line error here, before anything is loaded or written."""
    size = model_image_size(cfg.model, cfg.single_file_config)
    h, w = fit_image_size(size, cfg.height, cfg.width, cfg.model)
    return GenerationConfig(**{**asdict(cfg), "height": h, "width": w})


def _resolve_device(cfg: GenerationConfig, state_device: Any) -> str:
    import torch

    device = cfg.device or str(state_device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffalignError(f"--device {device} asked for, but no CUDA device is available")
    return device


# ------------------------------------------------------------------------------------------------
# the generator: one pipeline, one residual


class ResidualGenerator:
    """A loaded SD3/SD3.5, FLUX.1 or Qwen-Image pipeline plus an optional residual;
    `images(prompt, seeds)`."""

    def __init__(self, cfg: GenerationConfig, rc: ResidualConfig, device: str):
        import torch

        from diffalign.textstream.adapters import stream_adapter
        from diffalign.textstream.families import (
            check_schedule,
            family_of_variant,
            load_text_to_image,
            model_variant,
        )

        cfg = resolve_sampling(cfg)
        self.cfg = cfg
        self.device = device
        self.variant = model_variant(cfg.model, cfg.single_file_config)
        self.family = family_of_variant(self.variant)
        self.dtype_name = normalize_dtype(cfg.dtype, device)
        dtype = getattr(torch, DTYPES[self.dtype_name])
        self.pipe = load_text_to_image(
            cfg.model,
            self.variant,
            dtype=dtype,
            device=device,
            vae=cfg.vae,
            single_file_config=cfg.single_file_config,
        )
        self.pipe.set_progress_bar_config(disable=True)
        check_schedule(self.pipe, cfg.steps)
        adapter = stream_adapter(self.pipe.transformer)
        self.num_layers = adapter.num_blocks
        self.feature_dim = adapter.feature_dim
        self.residual = build_residual_from_config(
            rc, self.num_layers, self.feature_dim, family=adapter.family
        )
        self.adapter = adapter
        # steps whose rotation bucket differs from calibration's (dtype rounding of the
        # timestep); None until the first pipeline call sets the schedule
        self.bucket_dtype_mismatch_steps: list[int] | None = None
        self._calibration_dtype = _calibration_dtype(self.residual)
        if self._calibration_dtype is None or self._calibration_dtype == dtype:
            self.bucket_dtype_mismatch_steps = []
        if self.family == "sd3":
            patch = int(getattr(self.pipe, "patch_size", 1) or 1)
        else:  # FLUX / Qwen-Image pack 2x2 latent patches
            patch = 2
        multiple = int(self.pipe.vae_scale_factor) * patch
        for name in ("height", "width"):
            if getattr(cfg, name) % multiple:
                raise DiffalignError(
                    f"--{name} {getattr(cfg, name)} must be a multiple of {multiple} for this model"
                )

    def residual_settings(self) -> dict:
        return self.residual.settings() if self.residual is not None else {"enabled": False}

    def images(self, prompt: str, seeds: Sequence[int]) -> list:
        """PIL images of `prompt`, one per seed, in batches of `cfg.batch_size`."""
        import contextlib

        import torch

        from diffalign.textstream.families import pipeline_kwargs

        cfg = self.cfg
        bs = cfg.batch_size or len(seeds)
        out = []
        for start in range(0, len(seeds), bs):
            chunk = list(seeds[start : start + bs])
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk]
            ctx = (
                self.residual.attach(self.pipe.transformer)
                if self.residual is not None
                else contextlib.nullcontext()
            )
            with ctx, self._bucket_dtype_check():
                result = self.pipe(
                    prompt=prompt,
                    height=cfg.height,
                    width=cfg.width,
                    num_images_per_prompt=len(chunk),
                    generator=gens,
                    output_type="pil",
                    **pipeline_kwargs(
                        self.family,
                        steps=cfg.steps,
                        cfg=cfg.cfg,
                        guidance=cfg.guidance,
                        negative_prompt=cfg.negative_prompt,
                        max_sequence_length=cfg.max_sequence_length,
                    ),
                )
            out.extend(result.images)
        return out

    def _bucket_dtype_check(self):
        """Until the check has run: a pre-hook that, at the first transformer call (the
        pipeline has set its schedule), finds the steps whose timestep bucket differs between
        the rotation file's calibration dtype and this pipeline's dtype and prints one
        warning naming them (`calibrate.bucket_dtype_mismatch`)."""
        import contextlib

        if self.bucket_dtype_mismatch_steps is not None:
            return contextlib.nullcontext()

        def check(module, args, kwargs):
            if self.bucket_dtype_mismatch_steps is None:
                timesteps = self.pipe.scheduler.timesteps.detach().float().cpu()
                self.bucket_dtype_mismatch_steps = _report_bucket_dtype_mismatch(
                    self.residual, self.adapter, timesteps, self._calibration_dtype, self.dtype
                )

        handle = self.pipe.transformer.register_forward_pre_hook(
            check, with_kwargs=True, prepend=True
        )
        stack = contextlib.ExitStack()
        stack.callback(handle.remove)
        return stack

    @property
    def dtype(self):
        return self.pipe.transformer.dtype

    def close(self) -> None:
        import gc

        import torch

        del self.pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _calibration_dtype(residual):
    """The torch dtype a bucketed rotation file records as its calibration's (its identity's
    "dtype", as `build_residual` read it with the rotations); None without buckets, without a
    file, or when the file records none."""
    import torch

    if residual is None or residual.num_buckets < 2 or "path" not in residual.source:
        return None
    name = (residual.rotation_identity or {}).get("dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _report_bucket_dtype_mismatch(
    residual, adapter, timesteps, calibrated, generating
) -> list[int]:
    """The steps of `timesteps` that land in another rotation bucket in `generating` than in
    the `calibrated` dtype; when there are any, rank 0 prints one warning line naming them."""
    from diffalign.textstream.calibrate import bucket_dtype_mismatch, received_buckets

    edges = residual.timestep_bucket_edges
    steps = bucket_dtype_mismatch(timesteps, edges, adapter, calibrated, generating)
    from diffalign.engine.progress import is_main_process

    if steps and is_main_process():  # one line per run, not per rank
        fitted = received_buckets(timesteps, edges, adapter, calibrated).tolist()
        used = received_buckets(timesteps, edges, adapter, generating).tolist()
        cal, gen = (str(d).removeprefix("torch.") for d in (calibrated, generating))
        which = ", ".join(
            f"{k} (timestep {float(timesteps[k]):.2f}: bucket {used[k]}, not {fitted[k]})"
            for k in steps
        )
        print(
            f"diffalign: warning: {residual.source['path']} was calibrated in {cal}; in {gen} "
            f"the transformer receives step(s) {which} in another timestep bucket than "
            f"calibration put them in; calibrating in {gen} (--dtype {gen}) avoids it",
            file=sys.stderr,
            flush=True,
        )
    return steps


def build_residual_from_config(
    rc: ResidualConfig, num_layers: int, feature_dim: int, family: str | None = None
):
    """`diffalign.textstream.build_residual` for these options (None when the feature is off)."""
    from diffalign.textstream import build_residual
    from diffalign.textstream.weights import apply_weights_file

    rc = apply_weights_file(rc, family)
    kwargs: dict[str, Any] = {
        "origin_layer": rc.origin_layer,
        "target_layers": rc.target_layers,
        "weights": rc.weights,
        "procrustes_path": rc.procrustes_path,
        "layernorm": rc.layernorm,
        "family": family,
        "column_center": rc.col_center,
    }
    if rc.mode is not None:
        kwargs["mode"] = rc.mode
    return build_residual(num_layers, feature_dim, **kwargs)


# ------------------------------------------------------------------------------------------------
# run bookkeeping


def _settings_key(settings: dict) -> dict:
    """The part of a settings dict that decides the pixels (used to refuse mixing runs): the
    identity recorded when the images were made (`engine.identity`: models by resolved path and
    hashes), or, for a settings.json of an older diffalign, the options as written."""
    if isinstance(settings.get("identity"), dict):
        return settings["identity"]
    opts = {k: v for k, v in settings.get("options", {}).items() if k not in _NOT_IMAGE_AFFECTING}
    return {"options": opts, "residual_options": settings.get("residual_options")}


def _settings_identity(settings: dict) -> dict:
    """`_settings_key` of a new run, with its model, VAE and Procrustes file by identity."""
    from diffalign.engine.identity import file_sha256, model_identity, path_key

    key = _settings_key({k: v for k, v in settings.items() if k != "identity"})
    opts, rc = dict(key["options"]), dict(key["residual_options"] or {})
    for k in ("model", "vae", "single_file_config"):  # a single file's encoders come from it
        if opts.get(k):
            opts[k] = model_identity(opts[k])
    proc = rc.get("procrustes_path")
    if proc and Path(proc).is_file():
        rc["procrustes_path"] = {"path": path_key(proc), "sha256": file_sha256(proc)}
    if rc.get("col_center"):  # a check of the file since the centring left generation: a folder
        # whose images were centred at generation (older diffalign) is not resumed with these
        rc["col_center"] = "file check only, not applied at generation"
    learned = rc.get("weights_file")
    if learned and Path(learned).is_file():  # by content: a moved copy is the same weights
        rc["weights_file"] = {"sha256": file_sha256(learned)}
    return {"options": opts, "residual_options": rc}


def _check_compatible(path: Path, settings: dict, overwrite: bool, out: Path) -> None:
    """Refuse to add images to the output folder `out` made with other settings (unless
    overwriting); settings recorded by a run that wrote no image bind nothing
    (`engine.identity.binding`): the corrected rerun replaces them."""
    from diffalign.engine.identity import binding

    if overwrite or not path.is_file():
        return
    written = out.is_dir() and any(out.rglob("*.png"))
    try:
        old = binding(json.loads(path.read_text(encoding="utf-8")), written)
    except (OSError, json.JSONDecodeError):
        if not written:
            return
        raise DiffalignError(f"{path} is unreadable; pass --overwrite to start afresh") from None
    diffs = _settings_diff(old, settings) if old is not None else []
    if diffs:
        raise DiffalignError(
            f"{out} holds images made with other settings ({'; '.join(diffs[:3])}); "
            "pass --overwrite or choose another --output-dir"
        )


def _settings_diff(old: dict, new: dict) -> list[str]:
    """The image-affecting settings that differ, as `name: old -> new` or, for a model's
    identity or a prompt set, `model.weights` / `prompts`; a key the old record lacks, at any
    depth (an older diffalign recorded no `prompts`, and `--single-file-config` by its path, not
    its identity), once as `name: not recorded` (empty: compatible)."""
    from diffalign.engine.identity import identity_differences

    a, b = _settings_key(old), _settings_key(new)
    out = []
    for key in identity_differences(a, b):
        lacking = _unrecorded_prefix(a, b, key)
        if lacking is not None:
            line = f"{_diff_name(lacking)}: not recorded (made by an older diffalign)"
            if line not in out:
                out.append(line)
            continue
        name = _diff_name(key)
        va, vb = _dotted(a, key), _dotted(b, key)
        short = not isinstance(va, dict) and not isinstance(vb, dict)
        out.append(f"{name}: {va!r} -> {vb!r}" if short and len(repr((va, vb))) < 80 else name)
    return out


def _diff_name(key: str) -> str:
    return key.removeprefix("options.").replace("residual_options", "residual options")


def _unrecorded_prefix(old: dict, new: dict, key: str) -> str | None:
    """The first part of the dotted `key` that the old record lacks (missing, or a value other
    than None where the new record holds a mapping: recorded in an older form), or None (an
    old None is a setting not given then: a real change)."""
    d, e = old, new
    parts = key.split(".")
    for n, part in enumerate(parts):
        if not isinstance(d, dict):
            return None if d is None else ".".join(parts[:n])
        if part not in d:
            return ".".join(parts[: n + 1])
        d, e = d[part], e.get(part) if isinstance(e, dict) else None
        if isinstance(e, dict) and d is not None and not isinstance(d, dict):
            return ".".join(parts[: n + 1])
    return None


def _dotted(d: Any, key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _sample_unit(prompt: str, index: int) -> dict:
    """`sample`'s identity of one folder's prompt: its text and its index (the seeds)."""
    from diffalign.engine.identity import samples_sha256

    return {"prompts": samples_sha256([prompt]), "prompt_index": index}


def _base_settings(
    command: str,
    cfg: GenerationConfig,
    rc: ResidualConfig,
    extra: dict | None = None,
    **identity: Any,
) -> dict:
    """The settings a run records; `identity`: keys of the prompts it read (`prompts`, ...),
    compared on re-run beside the options and models."""
    from diffalign import __version__

    settings = {
        "command": command,
        "diffalign_version": __version__,
        "options": asdict(cfg),
        "residual_options": asdict(rc),
        "seed_rule": SEED_RULE,
        **(extra or {}),
    }
    settings["identity"] = {**_settings_identity(settings), **identity}
    return settings


def _unit_settings(base: dict, extra: dict, **identity: Any) -> dict:
    """`_base_settings(..., extra, **identity)` from `base`, the same call without the unit's
    `extra` and `identity` (its models' identities computed once for all its units): the same
    dict, keys in the same order."""
    settings = {k: v for k, v in base.items() if k != "identity"}
    return {**settings, **extra, "identity": {**base["identity"], **identity}}


def _clean_stale(folder: Path) -> None:
    """Remove temporaries an interrupted run left (`.<name>.*.tmp`, `.<name>.old`)."""
    from diffalign.engine.io import clean_stale_temporaries

    clean_stale_temporaries(folder)


@dataclass
class _Job:
    index: int  # global prompt index: decides the seeds
    prompt: str
    is_done: Callable[[], bool]
    write: Callable[[list, list[int]], None]  # (images, seeds) -> writes atomically
    label: str
    settings: dict | None = None  # completed with the loaded model's facts before writing


def _generator_if_needed(
    jobs: Sequence[_Job],
    cfg: GenerationConfig,
    rc: ResidualConfig,
    device: str,
    state,
    shared_settings: dict | None = None,
) -> ResidualGenerator | None:
    """Load the model only when this process has a prompt left to do (a resume where every
    prompt is finished takes seconds, not the minute a real model takes to load)."""
    mine = [jobs[i] for i in shard_indices(len(jobs), state.process_index, state.num_processes)]
    if not cfg.overwrite and all(job.is_done() for job in mine):
        return None
    gen = ResidualGenerator(cfg, rc, device)
    facts = {"dtype": gen.dtype_name, "residual": gen.residual_settings()}
    for settings in [shared_settings, *(job.settings for job in jobs)]:
        if settings is not None:
            settings.update(facts)
    return gen


def _distributed(cfg: GenerationConfig):
    """The accelerate process state (rank, world size, device) for this run's device."""
    from diffalign.engine.distributed import process_state

    return process_state(cfg.device)


def _run_jobs(
    jobs: Sequence[_Job],
    gen: ResidualGenerator | None,
    cfg: GenerationConfig,
    summary: RunSummary,
    rank: int,
    world_size: int,
    desc: str,
) -> None:
    from diffalign.engine.progress import progress

    mine = [jobs[i] for i in shard_indices(len(jobs), rank, world_size)]
    for job in progress(mine, desc=desc, total=len(mine)):
        if not cfg.overwrite and job.is_done():
            summary.prompts_skipped += 1
            continue
        assert gen is not None, "the model is loaded whenever a prompt is left"
        seeds = image_seeds(cfg.seed, job.index, cfg.n_samples)
        images = gen.images(job.prompt, seeds)
        if gen.bucket_dtype_mismatch_steps:
            steps = gen.bucket_dtype_mismatch_steps
            summary.bucket_dtype_mismatch_steps = sorted(
                {*summary.bucket_dtype_mismatch_steps, *steps}
            )
            if job.settings is not None:
                job.settings["bucket_dtype_mismatch_steps"] = list(steps)
        job.write(images, seeds)
        summary.prompts_done += 1
        summary.images_written += len(images)
        summary.outputs.append(job.label)


def _finish(state, summary: RunSummary, path: Path, t0: float) -> dict:
    """Gather every rank's counts; rank 0 writes `summary.json`. Returns the merged summary."""
    from diffalign.engine.reports import write_summary

    summary.seconds = time.perf_counter() - t0
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        state.wait_for_everyone()
        parts = gather_object([summary.to_dict()])
        merged = RunSummary(command=summary.command, world_size=state.num_processes)
        merged.prompts_total = summary.prompts_total
        for p in parts:
            merged.prompts_done += p["prompts_done"]
            merged.prompts_skipped += p["prompts_skipped"]
            merged.images_written += p["images_written"]
            merged.seconds = max(merged.seconds, p["seconds"])
            merged.outputs.extend(p["outputs"])
            steps = {*merged.bucket_dtype_mismatch_steps, *p.get("bucket_dtype_mismatch_steps", [])}
            merged.bucket_dtype_mismatch_steps = sorted(steps)
        merged.outputs.sort()
        summary = merged
    result = summary.to_dict()
    if state.is_main_process:
        write_summary(path, result)
    return result


def _save_folder_images(
    tmp: Path,
    images: list,
    names: list[str],
    grid_name: str | None,
    seeds: Sequence[int] | None = None,
) -> None:
    """The images, and a grid of them whose rows name the seed of their first image and
    whose columns the offset from it (image k uses seed `first + k`)."""
    import math

    from diffalign.engine.reports import label_grid, make_grid, save_image

    for img, name in zip(images, names):
        save_image(tmp / name, img)
    if grid_name and len(images) > 1:
        ncols = min(len(images), 4)
        nrows = math.ceil(len(images) / ncols)
        grid = make_grid(images, ncols=ncols)
        if seeds is not None:
            grid = label_grid(
                grid,
                nrows,
                ncols,
                row_labels=[f"seed {seeds[r * ncols]}" for r in range(nrows)],
                col_labels=[f"+{c}" for c in range(ncols)],
            )
        save_image(tmp / grid_name, grid)


def _write_folder(dest: Path, fill: Callable[[Path], None]) -> None:
    """Write a whole output folder atomically (it appears complete or not at all)."""
    from diffalign.engine.io import atomic_dir

    with atomic_dir(dest) as tmp:
        fill(tmp)


# ------------------------------------------------------------------------------------------------
# the commands


def run_sample(
    prompts: Sequence[str],
    models: Sequence[str],
    output_dir: str | os.PathLike,
    cfg: GenerationConfig,
    rc: ResidualConfig,
) -> dict:
    """Seed 002's `sd3_infer.py`: one folder per prompt/model under `output_dir` (spec T).

    Folder `<model>_<slug>/` holds `000.png ...`, `grid.png` (several samples) and
    `settings.json` (all options, resolved residual, model source, version, seed per image).
    """
    prompts = [p.strip() for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise DiffalignError("--prompt must be a non-empty text")
    if not models:
        raise DiffalignError("no --model given")
    repeated = next((m for i, m in enumerate(models) if m in models[:i]), None)
    if repeated is not None:  # it made a hashed folder name and counted its images as skipped
        raise DiffalignError(f"--model lists {repeated} twice: give each model once")
    validate_config(cfg)
    for m in models:
        validate_residual_config(rc, m, cfg.single_file_config)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    names = sample_folder_names(models, prompts)
    from diffalign.engine.loading import check_model_available, check_vae_available, resolve_model
    from diffalign.textstream.families import model_variant

    for m in models:  # a missing model or one of another family fails here, before torch loads
        model_variant(m, cfg.single_file_config)
        check_model_available(m)
    check_vae_available(cfg.vae)
    state = _distributed(cfg)
    device = _resolve_device(cfg, state.device)
    t0 = time.perf_counter()
    summary = RunSummary(
        command="sample", prompts_total=len(prompts) * len(models), world_size=state.num_processes
    )
    from diffalign.engine.io import output_lock

    with output_lock(out):
        if state.is_main_process:
            _clean_stale(out)
        # a finished folder made with other settings is kept: these images go to `<name>_2` ...
        model_settings = [_base_settings("sample", _with_model(cfg, m), rc) for m in models]
        for base, folder_names in zip(model_settings, names):
            for j, p in enumerate(prompts):
                probe = _unit_settings(base, {"prompt": p}, **_sample_unit(p, j))
                chosen, diffs = _pick_sample_folder(out, folder_names[j], probe, cfg.overwrite)
                if chosen != folder_names[j] and state.is_main_process:
                    print(
                        f"sample: {out / folder_names[j]} holds images made with other settings "
                        f"({'; '.join(diffs[:3])}); these images go to {out / chosen} "
                        "(--overwrite replaces the first folder instead)",
                        flush=True,
                    )
                folder_names[j] = chosen
        for m, base, folder_names in zip(models, model_settings, names):
            mcfg = _with_model(cfg, m)
            source = _describe_source(resolve_model, m)
            jobs = []
            for i, (p, name) in enumerate(zip(prompts, folder_names)):
                dest = out / name
                settings = _unit_settings(
                    base,
                    {
                        "prompt": p,
                        "prompt_index": i,
                        "model_source": source,
                        "device": device,
                        "seeds": image_seeds(cfg.seed, i, cfg.n_samples),
                        "images": [f"{k:03d}.png" for k in range(cfg.n_samples)],
                    },
                    **_sample_unit(p, i),
                )
                jobs.append(
                    _Job(
                        index=i,
                        prompt=p,
                        is_done=_folder_done(dest, settings["images"] + ["settings.json"]),
                        write=_sample_writer(dest, settings),
                        label=str(dest),
                        settings=settings,
                    )
                )
            gen = _generator_if_needed(jobs, mcfg, rc, device, state)
            _run_jobs(jobs, gen, mcfg, summary, state.process_index, state.num_processes, "sample")
            if gen is not None:
                gen.close()
        return _finish(state, summary, out / "summary.json", t0)


def _checked(cfg: GenerationConfig, rc: ResidualConfig) -> GenerationConfig:
    """`cfg` with the model card's defaults filled in, after the checks that need no model
    (generate, geneval, dpg: before their prompts are read)."""
    cfg = resolve_sampling(cfg)
    validate_config(cfg)
    validate_residual_config(rc, cfg.model, cfg.single_file_config)
    return cfg


def _first(items: list, limit: int | None) -> list:
    """The first `limit` items (None: all); a `limit` below 1 is an error."""
    if limit is None:
        return items
    if limit < 1:
        raise DiffalignError(f"--limit must be at least 1 (got {limit})")
    return items[:limit]


def run_generate(
    prompts: str | Sequence[str],
    output_dir: str | os.PathLike,
    cfg: GenerationConfig,
    rc: ResidualConfig,
    *,
    datadir: str | None = None,
    limit: int | None = None,
    prompt_field: str = "prompt",
) -> dict:
    """Prompt file/set (anything `load_prompts` reads) to `OUT/<index:05d>_<slug>/NNN.png`.

    Each folder also holds `prompt.json` (prompt, id, seeds) and `settings.json` (the run's
    settings plus that prompt); `OUT/settings.json` records the run.
    """
    from diffalign.engine.prompts import load_prompts

    cfg = _checked(cfg, rc)
    every = load_prompts(prompts, datadir, prompt_field=prompt_field)  # the identity's set
    records = _first(every, limit)
    out = Path(output_dir)
    run_extra = {"prompts": _spec_text(prompts), "datadir": datadir, "limit": limit}
    return _run_layout(
        "generate",
        out,
        out / "settings.json",
        out / "summary.json",
        cfg,
        rc,
        run_extra,
        jobs_for=lambda settings: [
            _generate_job(out, i, r.prompt, r.id, cfg, settings) for i, r in enumerate(records)
        ],
        total=len(records),
        clean=out,
        prompt_set=[[r.prompt, r.id] for r in every],  # what its folders record of each
        earlier=lambda: earlier_units(out, r"\d{5}_.*", "prompt.json"),
    )


def run_geneval(
    metadata: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: GenerationConfig,
    rc: ResidualConfig,
    *,
    limit: int | None = None,
    grid: bool = True,
) -> dict:
    """GenEval `evaluation_metadata.jsonl` to the GenEval image layout (FORMATS.md: GenEval);
    `grid=False` leaves out each prompt's `grid.png` (GenEval's `--skip_grid`)."""
    from diffalign.engine.prompts import load_geneval_metadata

    cfg = _checked(cfg, rc)
    every = load_geneval_metadata(metadata)
    lines = _first(every, limit)
    out = Path(output_dir)
    return _run_layout(
        "geneval",
        out,
        out / "settings.json",
        out / "summary.json",
        cfg,
        rc,
        {"metadata": str(metadata), "limit": limit},
        jobs_for=lambda settings: [
            _geneval_job(out, i, line, cfg, grid) for i, line in enumerate(lines)
        ],
        total=len(lines),
        clean=out,
        prompt_set=every,  # whole lines: each folder's metadata.jsonl is its line
        earlier=lambda: earlier_units(out, r"\d{5}", "metadata.jsonl"),
    )


def run_dpg(
    prompts_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: GenerationConfig,
    rc: ResidualConfig,
    *,
    resolution: int | None = None,
    limit: int | None = None,
) -> dict:
    """DPG-Bench `prompts/<id>.txt` to `OUT/<id>.png` 2x2 grids (FORMATS.md: DPG-Bench).

    Tiles are `resolution x resolution` (height and width are set to it; None: the model's own
    sample size); 4 samples a prompt.
    Run files go beside the folder: `OUT.settings.json`, `OUT.summary.json`.
    """
    from diffalign.engine.prompts import load_dpg_prompts

    if resolution is not None and resolution < 1:
        raise DiffalignError("--resolution must be at least 1")
    cfg = GenerationConfig(**{**asdict(cfg), "height": resolution, "width": resolution})
    cfg.n_samples = 4
    cfg = _checked(cfg, rc)
    every = load_dpg_prompts(prompts_dir)
    items = _first(every, limit)
    out = Path(output_dir)
    base = str(out).rstrip("/\\")
    record = Path(base + ".settings.json")
    return _run_layout(
        "dpg",
        out,
        record,
        Path(base + ".summary.json"),
        cfg,
        rc,
        {"prompts_dir": str(prompts_dir), "resolution": resolution, "limit": limit},
        jobs_for=lambda settings: [
            _dpg_job(out, i, pid, text) for i, (pid, text) in enumerate(items)
        ],
        total=len(items),
        clean=out,
        prompt_set=[[pid, text] for pid, text in every],
        # the folder holds only tiles, when the run record beside it says a dpg run made them
        earlier=lambda: earlier_units(out, r"[^.].*\.png") if record.is_file() else [],
    )


def run_compbench(
    prompts: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: GenerationConfig,
    rc: ResidualConfig,
    *,
    limit: int | None = None,
) -> dict:
    """T2I-CompBench prompts to its image layout (FORMATS.md: T2I-CompBench).

    A `<category>_val.txt` file: `OUT/samples/<prompt>_<counter:06d>.png`; a folder of them:
    `OUT/<category>/samples/...` per category (their evaluators take `--out_dir` and read its
    `samples/`). The counter runs over the category's images from 0: image k of prompt i (its
    line among the file's prompts) is `i * n_samples + k`, seeded `seed + i * n_samples + k`.
    `limit` keeps the first N prompts of each category. Run files: `OUT/settings.json`,
    `OUT/summary.json`. An image in a `samples/` folder that these prompts would not name (another
    prompt file's, another `n_samples`') is refused: the evaluators score every image there.
    """
    from diffalign.engine.prompts import load_compbench_prompts

    cfg = _checked(cfg, rc)
    categories = load_compbench_prompts(prompts)
    out = Path(output_dir)
    single = not Path(prompts).is_dir()
    folders = [(out if single else out / cat) / "samples" for cat, _ in categories]
    n = cfg.n_samples
    units = [  # --limit checked here, before anything is written
        (folder, i, p)
        for folder, (_, lines) in zip(folders, categories)
        for i, p in enumerate(_first(lines, limit))
    ]

    def preflight() -> None:
        for folder, (_, lines) in zip(folders, categories):
            _check_compbench_folder(folder, lines, n)

    return _run_layout(
        "compbench",
        out,
        out / "settings.json",
        out / "summary.json",
        cfg,
        rc,
        {
            "prompts": str(prompts),
            "categories": [cat for cat, _ in categories],
            "limit": limit,
        },
        jobs_for=lambda settings: [_compbench_job(folder, i, p, n) for folder, i, p in units],
        total=len(units),
        clean=[out, *folders],
        preflight=preflight,
        earlier=lambda: [  # only where OUT/settings.json records a compbench run
            p
            for f in folders
            for p in earlier_units(f, r"[^.].*\.png")
            if (out / "settings.json").is_file()
        ],
        # a folder's category names its samples/ folder; a single file's writes OUT/samples
        prompt_set=[[None if single else cat, lines] for cat, lines in categories],
    )


def _check_compbench_folder(samples: Path, prompts: Sequence[str], n_samples: int) -> None:
    """Refuse a `samples/` folder holding images these prompts would not name."""
    if not samples.is_dir():
        return
    names = {
        compbench_image_name(p, c)
        for i, p in enumerate(prompts)
        for c in range(i * n_samples, (i + 1) * n_samples)
    }
    # dot-names are our own temporaries of a killed run, removed before generating
    foreign = sorted(e.name for e in samples.iterdir() if e.name not in names and e.name[:1] != ".")
    if foreign:
        raise DiffalignError(
            f"{samples} holds {len(foreign)} file(s) these prompts with --n-samples {n_samples} "
            f"would not write (e.g. {foreign[0]!r}); T2I-CompBench's evaluators read every file "
            "there: remove them or choose another --output-dir"
        )


def _run_layout(
    command: str,
    out: Path,
    settings_path: Path,
    summary_path: Path,
    cfg: GenerationConfig,
    rc: ResidualConfig,
    run_extra: dict,
    jobs_for: Callable[[dict], list[_Job]],
    total: int,
    clean: Path | Sequence[Path],
    preflight: Callable[[], None] | None = None,
    *,
    prompt_set: Sequence,
    earlier: Callable[[], list[Path]],
) -> dict:
    """Shared body of generate/geneval/dpg/compbench: check, lock, load, write settings,
    generate, summarise. `prompt_set`: every prompt the command read, before `--limit`, each as
    its images and records depend on (JSON): its `samples_sha256` is the identity's
    `prompts` (by content: the same for another spelling of its path, another when a prompt,
    its id, its metadata, their order or their number differ), so a re-run with other prompts is refused and a larger `--limit` extends. The output folder is locked for the whole run (`engine.io.output_lock`);
    dpg, whose folder holds only `<id>.png`, locks the folder `OUT.lock` beside it. `clean`: the
    folders the images are written in (stale temporaries removed); `preflight`: the layout's own
    check of what is already there, under the lock, before the model loads; `earlier`: the
    units an earlier run left, which `overwrite` removes once the model has loaded and before
    the new settings are recorded (so neither a killed `--overwrite` run that a plain re-run
    finishes nor a smaller prompt set leaves old images beside new ones)."""
    from diffalign.engine.identity import samples_sha256
    from diffalign.engine.io import output_lock, write_json
    from diffalign.engine.loading import check_model_available, check_vae_available, resolve_model

    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} exists and is not a folder")
    from diffalign.textstream.families import model_variant

    model_variant(cfg.model, cfg.single_file_config)  # of another family: fails before torch
    check_model_available(cfg.model)  # missing: fails before torch
    check_vae_available(cfg.vae)
    cfg = sized_config(cfg)
    state = _distributed(cfg)
    t0 = time.perf_counter()
    device = _resolve_device(cfg, state.device)
    lock_dir = out if command != "dpg" else Path(str(out).rstrip("/\\") + ".lock")
    prompts_id = samples_sha256(prompt_set)
    with output_lock(lock_dir):
        probe = _base_settings(command, cfg, rc, run_extra, prompts=prompts_id)
        _check_compatible(settings_path, probe, cfg.overwrite, out)
        if preflight is not None:
            preflight()
        settings = _base_settings(
            command,
            cfg,
            rc,
            {
                **run_extra,
                "model_source": _describe_source(resolve_model, cfg.model),
                "device": device,
                "world_size": state.num_processes,
                "num_prompts": total,
            },
            prompts=prompts_id,
        )
        jobs = jobs_for(settings)
        # model errors and residual range errors end here; nothing is loaded when all is done
        gen = _generator_if_needed(jobs, cfg, rc, device, state, shared_settings=settings)
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            for folder in [clean] if isinstance(clean, Path) else clean:
                _clean_stale(folder)
            if cfg.overwrite:
                remove_units(earlier())
            if gen is not None or not settings_path.is_file():
                write_json(settings_path, settings)
        state.wait_for_everyone()
        summary = RunSummary(command=command, prompts_total=total, world_size=state.num_processes)
        _run_jobs(jobs, gen, cfg, summary, state.process_index, state.num_processes, command)
        if gen is not None:
            gen.close()
        return _finish(state, summary, summary_path, t0)


def _pick_sample_folder(
    out: Path, name: str, settings: dict, overwrite: bool
) -> tuple[str, list[str]]:
    """`name`, or `name_2`, `name_3`, ... : the first folder that is free or was made with
    the same settings (so a re-run resumes it and a changed run never replaces it), and how the
    settings of `name` differ when another folder is chosen."""
    if overwrite:
        return name, []
    k = 1
    first_diffs: list[str] = []
    while True:
        cand = name if k == 1 else f"{name}_{k}"
        folder = out / cand
        if not folder.exists():
            return cand, first_diffs
        try:
            old = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
            diffs = _settings_diff(old, settings)
        except (OSError, json.JSONDecodeError, AttributeError):
            diffs = ["unreadable settings.json"]
        if not diffs:
            return cand, first_diffs
        if k == 1:
            first_diffs = diffs
        k += 1


def _with_model(cfg: GenerationConfig, model: str) -> GenerationConfig:
    """`cfg` for `model`, with that model card's defaults for the options left unset and its
    own sample size unless one was given (`sized_config`)."""
    return sized_config(resolve_sampling(GenerationConfig(**{**asdict(cfg), "model": model})))


def _spec_text(spec: str | Sequence[str]) -> str | list[str]:
    return str(spec) if isinstance(spec, str | os.PathLike) else [str(s) for s in spec]


def _describe_source(resolve_model: Callable, model: str) -> Any:
    """What `--model` resolved to, JSON-friendly (recorded in settings.json)."""
    try:
        src = resolve_model(model)
    except DiffalignError:
        return str(model)
    if hasattr(src, "__dataclass_fields__"):
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(src).items()}
    if isinstance(src, tuple | list):
        return [str(x) for x in src]
    return str(src)


def _folder_done(folder: Path, names: list[str]) -> Callable[[], bool]:
    return lambda: folder.is_dir() and all((folder / n).is_file() for n in names)


def _sample_writer(dest: Path, settings: dict) -> Callable[[list, list[int]], None]:
    from diffalign.engine.io import write_json

    def write(images: list, seeds: list[int]) -> None:
        def fill(tmp: Path) -> None:
            _save_folder_images(tmp, images, settings["images"], "grid.png", seeds)
            write_json(tmp / "settings.json", settings)

        _write_folder(dest, fill)

    return write


def _generate_job(
    out: Path, i: int, prompt: str, pid: str, cfg: GenerationConfig, settings: dict
) -> _Job:  # `settings` is completed in place once the model is loaded
    from diffalign.engine.io import write_json

    dest = out / f"{i:05d}_{slugify(prompt)}"
    names = [f"{k:03d}.png" for k in range(cfg.n_samples)]

    def write(images: list, seeds: list[int]) -> None:
        def fill(tmp: Path) -> None:
            _save_folder_images(tmp, images, names, "grid.png", seeds)
            record = {"prompt": prompt, "id": pid, "index": i, "seeds": seeds}
            write_json(tmp / "prompt.json", record)
            write_json(tmp / "settings.json", {**settings, **record})  # the run's, plus this prompt

        _write_folder(dest, fill)

    done = _folder_done(dest, names + ["prompt.json", "settings.json"])
    return _Job(i, prompt, done, write, str(dest), settings=settings)


def _geneval_job(out: Path, i: int, line: dict, cfg: GenerationConfig, grid: bool = True) -> _Job:
    from diffalign.engine.io import write_text

    dest = out / f"{i:05d}"
    names = [f"samples/{k:04d}.png" for k in range(cfg.n_samples)]

    def write(images: list, seeds: list[int]) -> None:
        def fill(tmp: Path) -> None:
            (tmp / "samples").mkdir()
            _save_folder_images(tmp, images, names, "grid.png" if grid else None, seeds)
            write_text(tmp / "metadata.jsonl", json.dumps(line) + "\n")

        _write_folder(dest, fill)

    return _Job(
        i, line["prompt"].strip(), _folder_done(dest, names + ["metadata.jsonl"]), write, str(dest)
    )


def _dpg_job(out: Path, i: int, pid: str, prompt: str) -> _Job:
    from diffalign.engine.reports import make_grid, save_image

    dest = out / f"{pid}.png"

    def write(images: list, seeds: list[int]) -> None:
        save_image(dest, make_grid(images, ncols=2))

    return _Job(i, prompt, dest.is_file, write, str(dest))


def _compbench_job(samples: Path, i: int, prompt: str, n_samples: int) -> _Job:
    """Prompt `i` of a category: images `<prompt>_<i*n+k:06d>.png` in its flat `samples/`."""
    from diffalign.engine.reports import save_image

    first = i * n_samples
    names = [compbench_image_name(prompt, first + k) for k in range(n_samples)]

    def write(images: list, seeds: list[int]) -> None:
        for img, name in zip(images, names):
            save_image(samples / name, img)

    def done() -> bool:
        return all((samples / name).is_file() for name in names)

    last = f"..{first + n_samples - 1:06d}" if n_samples > 1 else ""
    return _Job(i, prompt, done, write, f"{samples / prompt}_{first:06d}{last}.png")
