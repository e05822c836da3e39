"""`diffalign textstream train-weights`: learn one residual weight per target layer with the
transformer frozen (spec T: learned weights; the authors' `train_residual_weights.py`), on the
shared training loop (`engine.train`).

Each step draws a batch of cached pairs (`textstream cache`), noise `eps` and flow times `s`
(`weights.sample_times`), runs the frozen transformer on `x_s = (1 - s) x0 + s eps` at timestep
`1000 s` with the residual attached (its `weights` set to `softplus(raw)` before each forward,
read by the hooks), and
minimises `||v - (eps - x0)||^2 + smoothness_weight * mean (w_{k+1} - w_k)^2`. Only `raw`
trains (AdamW, warm-up + cosine, clipping, exact resume, TensorBoard through the loop).

Run folder: `residual_weights.safetensors` (the result, read by `--residual-weights-file`),
`residual_weights.png` (weight per target layer: initial and learned),
`residual_weights_history.png` (each weight over the steps), `validation/step-*/` (images
sampled from cached captions with the weights of that step, and `weights.json`),
`checkpoints/`, `checkpoint-final/`, `logs/` (TensorBoard), `train_history.png`,
`summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from diffalign.engine.checkpoints import check_task_config
from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import file_sha256
from diffalign.engine.train import OptimizerSpec, StepContext, TrainConfig, TrainTask, train
from diffalign.textstream.cache import (
    EMPTY_KEY,
    LATENTS,
    POOLED,
    PROMPT_EMBEDS,
    CacheInfo,
    open_cache,
)
from diffalign.textstream.flow import family
from diffalign.textstream.weights import (
    WEIGHTS_FILE,
    LearnedWeights,
    ResidualWeights,
    TimeSampling,
    load_learned_weights,
    noisy_latents,
    sample_times,
    sample_unit_times,
    save_learned_weights,
    shift_times,
    smoothness_penalty,
    velocity_loss,
)

# options that may change between a checkpoint and its resume
RESUME_FREE = {
    "max_steps",
    "eval_every",
    "eval_samples",
    "eval_steps",
    "eval_cfg",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "resume",
    "overwrite",
    "tracker",
    "num_workers",
    "output_dir",
    "cache",
    "model",
    "procrustes_path",
}


@dataclass
class WeightsTrainConfig:
    """Options of `train-weights` (CLI names with dashes)."""

    cache: str
    model: str | None  # None: the model the cache was made with (its job.json)
    output_dir: str
    origin_layer: int | None = None
    target_layers: list[int] | None = None
    procrustes_path: str | None = None
    mode: str | None = None  # plain | ln; None: ln with a rotation file, else plain
    layernorm: bool = False
    init: str = "1.0"  # a constant, or a weights file / JSON list
    time_mode: str = "logitnorm"  # the authors' default
    time_mean: float | None = None  # None: the mode's (weights.TIME_DEFAULTS)
    time_std: float | None = None
    time_alpha: float | None = None
    time_beta: float | None = None
    time_shift: float | None = 1.0  # 1: none, as the authors; None: the scheduler's shift
    smoothness_weight: float = 0.0
    max_steps: int = 1000
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3  # the authors' runs (all three families)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    num_val: int = 0  # held-out pairs (the last ones) for the validation loss
    eval_every: int = 0
    eval_samples: int = 2
    eval_steps: int | None = None  # None: the model card's (families.DEFAULTS)
    eval_cfg: float | None = None
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    resolution: int | None = None  # must equal the cache's when given
    num_workers: int = 0
    tracker: str = "tensorboard"
    resume: str | None = None
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Checks that need neither model nor cache (one DiffalignError line)."""
        for name in ("lr", "smoothness_weight", "weight_decay", "eval_cfg"):
            value = getattr(self, name)
            if value is None and name == "eval_cfg":
                continue
            if not math.isfinite(float(value)) or value < 0:
                raise DiffalignError(
                    f"--{name.replace('_', '-')} must be a finite number >= 0 (got {value})"
                )
        if self.lr <= 0:
            raise DiffalignError(f"--lr must be > 0 (got {self.lr})")
        if self.max_grad_norm is not None and not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise DiffalignError(f"--max-grad-norm must be > 0 (got {self.max_grad_norm})")
        for name in ("max_steps", "batch_size", "eval_samples", "eval_steps"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise DiffalignError(f"--{name.replace('_', '-')} must be at least 1")
        if self.num_val < 0 or self.warmup_steps < 0:
            raise DiffalignError("--num-val and --warmup-steps must be >= 0")
        if self.mode not in (None, "plain", "ln"):
            raise DiffalignError(f"--residual-mode must be plain or ln (got '{self.mode}')")
        self.time_sampling().validate()

    def time_sampling(self, default_shift: float = 1.0) -> TimeSampling:
        return TimeSampling.of(
            self.time_mode,
            shift=default_shift if self.time_shift is None else self.time_shift,
            mean=self.time_mean,
            std=self.time_std,
            alpha=self.time_alpha,
            beta=self.time_beta,
        )


# ---------------------------------------------------------------------------------------------
# data


class CachedPairs(Dataset):
    """Cached pairs by index: `{"id", "latents", "prompt_embeds", "pooled"}` (fp16 tensors)."""

    def __init__(self, cache: CacheInfo, ids: list[str]):
        self.cache = cache
        self.ids = list(ids)
        self._stores = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stores": None}

    def __getitem__(self, index: int) -> dict:
        if self._stores is None:
            self._stores = {n: self.cache.store(n) for n in (LATENTS, PROMPT_EMBEDS, POOLED)}
        key = self.ids[index]
        return {
            "id": key,
            "latents": self._stores[LATENTS].get(key).clone(),
            "prompt_embeds": self._stores[PROMPT_EMBEDS].get(key).clone(),
            "pooled": self._stores[POOLED].get(key).clone(),
        }


def parse_init(init: str | float, targets: list[int]) -> torch.Tensor:
    """Initial weights `[len(targets)]` (> 0): a constant, a `residual_weights.safetensors`
    (same targets) or a JSON file (a list, or `{"residual_weights": [...]}`)."""
    n = len(targets)
    text = str(init).strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        values = [value] * n
    else:
        path = Path(text)
        if not path.is_file():
            raise DiffalignError(f"--init {text}: not a number and no such file")
        if path.suffix.lower() == ".json":
            from diffalign.engine.io import read_json

            data = read_json(path)
            if isinstance(data, dict):
                data = data.get("residual_weights", data.get("weights"))
            if not isinstance(data, list):
                raise DiffalignError(f"--init {path}: expected a JSON list of weights")
            values = data
        else:
            lw = load_learned_weights(path)
            if lw.target_layers != list(targets):
                raise DiffalignError(
                    f"--init {path} holds weights for target layers {lw.target_layers}, "
                    f"not {list(targets)}"
                )
            values = lw.weights
        if len(values) != n:
            raise DiffalignError(f"--init {path}: {len(values)} weights for {n} target layers")
    try:
        out = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        raise DiffalignError(f"--init {text}: weights must be numbers") from None
    if not bool(torch.isfinite(out).all()) or not bool((out > 0).all()):
        raise DiffalignError(
            f"--init must give finite weights > 0 (softplus cannot reach {out.min().item():g})"
        )
    return out


def scheduler_shift(scheduler_config: Any, image_seq_len: int) -> float:
    """The time shift the model's scheduler applies at inference: its static `shift`, or, with
    dynamic shifting, `exp(mu)` (`mu` for the "linear" shift type) of the resolution's `mu`:
    both give `s = shift u / (1 + (shift - 1) u)`."""
    cfg = dict(scheduler_config)
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", 1.0))
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.16),
    )
    return float(mu) if cfg.get("time_shift_type") == "linear" else float(math.exp(mu))


# ---------------------------------------------------------------------------------------------
# the task


class WeightsTask(TrainTask):
    """Residual weights on a frozen transformer (of the cache's model family) as a `TrainTask`."""

    def __init__(self, cfg: WeightsTrainConfig, log=print):
        from diffalign.textstream import build_residual
        from diffalign.textstream.adapters import stream_adapter
        from diffalign.textstream.families import DEFAULTS, check_schedule, loaded_variant

        self.cfg = cfg
        self.log = log
        self.cache = open_cache(cfg.cache)
        if not cfg.model:
            cfg.model = self.cache.job.get("made_with")
            if not cfg.model:
                raise DiffalignError(
                    f"cache {self.cache.root} does not name its model: give --model"
                )
        # a single file's text encoders and VAE came from this config (None: a folder, or one
        # the loader finds from the file itself)
        self.single_file_config = self.cache.job.get("made_with_config")
        self._check_cache_identity()
        self.flow = family(self.cache.job.get("family", "sd3"))
        # no text encoders (the cache holds the text); the frozen weights in the autocast dtype
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.mixed_precision, "float32")
        self.pipe = self.flow.load(
            cfg.model, dtype=dtype, text=False, single_file_config=self.single_file_config
        )
        tr = self.pipe.transformer
        self.transformer = tr
        self._check_cache_shapes()
        card = DEFAULTS[loaded_variant(self.flow.name, tr)]
        if cfg.eval_steps is None:  # validation images as the model card samples
            cfg.eval_steps = card.steps
        if cfg.eval_cfg is None:
            cfg.eval_cfg = card.cfg
        check_schedule(self.pipe, cfg.eval_steps)  # Qwen-Image: validation images need 2 steps
        adapter = stream_adapter(tr)  # blocks in execution order (FLUX.1: double, then single)
        self.residual = build_residual(
            adapter.num_blocks,
            adapter.feature_dim,
            family=adapter.family,
            origin_layer=cfg.origin_layer,
            target_layers=cfg.target_layers,
            weights=None,
            mode=cfg.mode,
            procrustes_path=cfg.procrustes_path,
            layernorm=cfg.layernorm,
        )
        if self.residual is None:
            raise DiffalignError(
                "train-weights needs target layers: --residual-target-layers (or a "
                "--residual-procrustes-path rotation file)"
            )
        self.targets = list(self.residual.target_layers)
        self.init = parse_init(cfg.init, self.targets)
        self.weights = ResidualWeights(self.init)
        self.rotation_sha256 = file_sha256(cfg.procrustes_path) if cfg.procrustes_path else ""
        seq_len = self.flow.image_seq_len(tr, self.cache.job["shapes"][LATENTS])
        self.time = cfg.time_sampling(scheduler_shift(self.pipe.scheduler.config, seq_len))
        self.time.validate()
        if cfg.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        tr.requires_grad_(False)
        self.residual.weights = self.weights()  # a tensor: every target is hooked
        self.handle = self.residual.attach(tr)
        ids = self.cache.complete_ids()
        if len(ids) <= cfg.num_val:
            raise DiffalignError(
                f"cache {self.cache.root} has {len(ids)} complete pairs; --num-val {cfg.num_val} "
                "leaves none to train on"
            )
        split = len(ids) - cfg.num_val
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        self.eval_ids = (self.val_ids or self.train_ids)[: cfg.eval_samples]
        self.init_val_loss: float | None = None

    # -- checks --------------------------------------------------------------------------------

    def _check_cache_identity(self) -> None:
        job, cfg = self.cache.job, self.cfg
        if cfg.resolution is not None and cfg.resolution != job["resolution"]:
            raise DiffalignError(
                f"cache {self.cache.root} was made at resolution {job['resolution']}, not "
                f"--resolution {cfg.resolution}"
            )
        from diffalign.engine.identity import check_identity, model_identity
        from diffalign.textstream.cache import model_family

        made_for, wanted = (
            job.get("family", "sd3"),
            model_family(cfg.model, self.single_file_config),
        )
        if made_for != wanted:
            raise DiffalignError(
                f"cache {self.cache.root} was made for a {made_for} model "
                f"({job.get('made_with', '?')}); --model {cfg.model} is {wanted}: cache the "
                "pairs with this model"
            )
        check_identity(
            {"model": job.get("model")},
            {"model": model_identity(cfg.model)},
            f"cache {self.cache.root} ({job.get('made_with', '?')}) was",
            hint=f"it was made with another model than --model {cfg.model}: cache the pairs "
            "with this model",
        )

    def _check_cache_shapes(self) -> None:
        shapes = self.cache.job["shapes"]
        named = {"latents": shapes[LATENTS], "prompt_embeds": shapes[PROMPT_EMBEDS]}
        named["pooled"] = shapes[POOLED]
        for what, have, need in self.flow.check_shapes(self.transformer, named):
            raise DiffalignError(
                f"cache {self.cache.root} has {what} {have}, --model {self.cfg.model} needs "
                f"{need} (made with another model?)"
            )

    # -- TrainTask -----------------------------------------------------------------------------

    def trainable(self) -> dict[str, torch.nn.Module]:
        return {"residual_weights": self.weights}

    def frozen(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "vae": self.pipe.vae}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {
            "main": OptimizerSpec(
                [{"params": [self.weights.raw]}], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
            )
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            CachedPairs(self.cache, self.train_ids),
            batch_size=self.cfg.batch_size,
            shuffle=True,
            num_workers=self.cfg.num_workers,
        )

    def val_dataloader(self) -> DataLoader | None:
        if not self.val_ids:
            return None
        return DataLoader(CachedPairs(self.cache, self.val_ids), batch_size=self.cfg.batch_size)

    def flow_loss(
        self, batch: dict, eps: torch.Tensor, s: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Velocity MSE of the frozen transformer with the residual at the current weights."""
        x0 = batch["latents"].to(device, torch.float32)
        eps, s = eps.to(device), s.to(device)
        xs = noisy_latents(x0, eps, s)
        timestep = s * float(self.pipe.scheduler.config.num_train_timesteps)
        pe, pooled = batch["prompt_embeds"], batch["pooled"]
        self.residual.weights = self.weights()  # read by the hooks: this forward's weights
        pred = self.flow.velocity(self.transformer, xs, timestep, pe, pooled)
        return velocity_loss(pred, x0, eps)

    def training_step(self, batch: Any, step: int, ctx: StepContext) -> dict:
        if step == 0 and self.init_val_loss is None and self.val_ids:
            with torch.no_grad():  # the held-out loss of the initial weights, for the summary
                self.init_val_loss = self.validation_loss()
        n = batch["latents"].shape[0]
        eps = torch.randn(batch["latents"].shape, dtype=torch.float32)  # CPU RNG: exact resume
        s = sample_times(n, self.time)
        flow = self.flow_loss(batch, eps, s, ctx.device)
        w = self.weights()
        smooth = smoothness_penalty(w)
        loss = flow + self.cfg.smoothness_weight * smooth if self.cfg.smoothness_weight else flow
        return {"loss": loss, "flow_loss": flow.detach(), "smoothness": smooth}

    def log_state(self) -> dict[str, float]:
        """Each target's weight as it is after the logged optimizer step (logged from
        `training_step`, it was the window's mean of the weights before each update)."""
        w = self.weights().detach().cpu().tolist()
        return {f"weight/{layer}": value for layer, value in zip(self.targets, w)}

    def validation_step(self, batch: Any) -> dict[str, float]:
        """Flow loss of held-out pairs with noise and times seeded per pair (batch-independent)."""
        device = next(self.transformer.parameters()).device
        eps, s = self.validation_draws(batch["id"], tuple(batch["latents"].shape[1:]))
        return {"loss": float(self.flow_loss(batch, eps, s, device))}

    def validation_draws(
        self, ids: list[str], shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and flow time of each held-out pair, from a generator seeded by (seed, id)."""
        import hashlib

        eps, us = [], []
        for key in ids:
            digest = hashlib.sha256(f"{self.cfg.seed}:{key}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            us.append(sample_unit_times(1, self.time, g))
            eps.append(torch.randn(shape, generator=g))
        return torch.stack(eps), shift_times(torch.cat(us), self.time.shift)

    def validation_loss(self) -> float | None:
        """Mean held-out loss at the current weights (None without held-out pairs)."""
        dl = self.val_dataloader()
        if dl is None:
            return None
        losses, counts = 0.0, 0
        batches = iter(dl)
        with torch.no_grad():
            while True:
                # called from `training_step`, i.e. under the loop's autocast: collating the fp16
                # cache records there fails under CPU bf16 autocast, so fetch outside it
                with torch.autocast("cpu", enabled=False):
                    batch = next(batches, None)
                if batch is None:
                    break
                losses += self.validation_step(batch)["loss"]
                counts += 1
        return losses / counts

    def on_validation_end(self, step: int, out_dir: Path) -> dict | None:
        """Images of the first cached captions with the current weights, and `weights.json`."""
        from diffalign.engine.io import write_json

        weights = self.weights().detach().cpu().tolist()
        write_json(out_dir / "weights.json", self.weights_record(weights))
        images = self.sample_images(self.eval_ids)
        from diffalign.engine.reports import save_image, save_image_grid

        for i, img in enumerate(images):
            save_image(out_dir / f"{i:03d}.png", img)
        captions = {p["id"]: p["caption"] for p in self.cache.pairs}
        save_image_grid(
            out_dir / "grid.png",
            images,
            ncols=len(images),
            title=f"step {step}: " + " | ".join(captions[k][:30] for k in self.eval_ids),
        )
        return {"weight_mean": sum(weights) / len(weights)}

    @torch.no_grad()
    def sample_images(self, ids: list[str], seed: int | None = None) -> list:
        """PIL images of cached captions `ids` (their cached embeddings, CFG against the cached
        empty prompt), image k seeded `seed + k`, with the residual at the current weights."""
        stores = {n: self.cache.store(n) for n in (PROMPT_EMBEDS, POOLED)}
        tr = self.transformer
        device = next(tr.parameters()).device
        dtype = next(tr.parameters()).dtype
        seed = self.cfg.seed if seed is None else seed

        def get(store: str, key: str) -> torch.Tensor:
            return stores[store].get(key).to(device, dtype)[None]

        self.residual.weights = self.weights().detach()
        out = []
        for k, key in enumerate(ids):
            out += self.flow.sample(
                self.pipe,
                get(PROMPT_EMBEDS, key),
                get(POOLED, key),
                get(PROMPT_EMBEDS, EMPTY_KEY),
                get(POOLED, EMPTY_KEY),
                steps=self.cfg.eval_steps,
                cfg=self.cfg.eval_cfg,
                resolution=self.cache.resolution,
                seed=seed + k,
            )
        return out

    def weights_record(self, weights: list[float]) -> dict:
        return {
            "weights": weights,
            "origin_layer": self.residual.origin_layer,
            "target_layers": self.targets,
            "mode": self.residual.mode,
            "layernorm": self.residual.layernorm,
            "rotation_sha256": self.rotation_sha256,
        }

    def learned(self) -> LearnedWeights:
        weights = self.weights().detach().cpu().tolist()
        return LearnedWeights(
            weights=weights,
            origin_layer=self.residual.origin_layer,
            target_layers=self.targets,
            mode=self.residual.mode,
            layernorm=self.residual.layernorm,
            rotation_sha256=self.rotation_sha256,
            metadata={
                "model": str(self.cfg.model),
                "family": self.flow.name,  # generation refuses the weights on another family
                "cache": str(self.cache.root),
                "procrustes_path": str(self.cfg.procrustes_path or ""),
            },
        )

    def export(self, out_dir: Path) -> None:
        save_learned_weights(Path(out_dir) / WEIGHTS_FILE, self.learned())

    def config_dict(self) -> dict:
        d = _settings(self.cfg)
        d.update(
            resolved_origin_layer=self.residual.origin_layer,
            resolved_target_layers=self.targets,
            resolved_mode=self.residual.mode,
            rotation_sha256=self.rotation_sha256,
            time_shift_used=self.time.shift,
            family=self.flow.name,
            family_settings=self.flow.settings(self.transformer),
            init_weights=self.init.tolist(),
            cache_job=self.cache.job,
            train_pairs=len(self.train_ids),
            val_pairs=len(self.val_ids),
        )
        return d

    def identity(self) -> dict:
        """What decides the learned weights (compared on resume by the loop): the settings
        outside RESUME_FREE, the cache's job record (model identity included)."""
        return _weights_identity(self.config_dict())

    def check_resume(self, saved_config: dict | None, path: Path) -> None:
        check_task_config(saved_config, self.config_dict(), path, RESUME_FREE)

    def state_dict(self) -> dict:
        return {"init_val_loss": self.init_val_loss}

    def load_state_dict(self, state: dict) -> None:
        self.init_val_loss = state.get("init_val_loss")

    def close(self) -> None:
        self.handle.detach()


# config_dict()'s keys that only the loaded model (or the full setup) tells
LOADED = (
    "resolved_origin_layer",
    "resolved_target_layers",
    "resolved_mode",
    "rotation_sha256",
    "time_shift_used",
    "family",
    "family_settings",
    "init_weights",
    "train_pairs",
    "val_pairs",
)


def _settings(cfg: WeightsTrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("extra", None)
    return d


def _weights_identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RESUME_FREE}


def check_before_loading(cfg: WeightsTrainConfig, loop: TrainConfig) -> None:
    """The trainer's used-folder and resume refusals (`engine.checkpoints.check_before_setup`)
    from the config and the cache's job record, before the transformer loads: a re-run with
    other settings is refused in seconds (the trainer compares everything again on resume)."""
    import functools

    from diffalign.engine.checkpoints import check_before_setup

    @functools.cache  # read once, for the task check and the identity
    def config() -> dict:  # called on resume only (a missing cache: open_cache's own error)
        return {**_settings(cfg), "cache_job": open_cache(cfg.cache).job}

    check_before_setup(
        loop,
        lambda: _weights_identity(config()),
        unknown=LOADED,
        check_task=lambda saved, path: check_task_config(
            saved, config(), path, RESUME_FREE, LOADED
        ),
    )


# ---------------------------------------------------------------------------------------------
# the run


def loop_config(cfg: WeightsTrainConfig) -> TrainConfig:
    """The shared loop's options."""
    return TrainConfig(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        validate_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        log_every=cfg.log_every,
        seed=cfg.seed,
        tracker=cfg.tracker,
        resume=cfg.resume,
        run_name="residual-weights",
        overwrite=cfg.overwrite,
        best_metric="val/loss" if cfg.num_val > 0 else None,
    )


def run_train_weights(cfg: WeightsTrainConfig, log=print):
    """Train (or resume) the weights; writes the run folder (module docstring) and returns the
    loop's `TrainResult` with the final summary."""
    from diffalign.engine.io import output_lock

    cfg.validate()
    loop = loop_config(cfg)
    loop.validate()
    if cfg.procrustes_path is not None and not Path(cfg.procrustes_path).is_file():
        raise DiffalignError(f"rotation file not found: {cfg.procrustes_path}")
    with output_lock(cfg.output_dir, "training output folder"):
        return _run(cfg, loop, log)


def _run(cfg: WeightsTrainConfig, loop: TrainConfig, log):
    import shutil

    from diffalign.engine.progress import is_main_process
    from diffalign.engine.reports import plot_curves, write_summary

    check_before_loading(cfg, loop)  # a used folder or another run's checkpoint: refused now
    task = WeightsTask(cfg, log=log)
    try:
        result = train(task, loop)
    finally:
        task.close()
    if not is_main_process():
        return result
    out = Path(cfg.output_dir)
    shutil.copyfile(result.final_dir / WEIGHTS_FILE, out / f".{WEIGHTS_FILE}.tmp")
    os.replace(out / f".{WEIGHTS_FILE}.tmp", out / WEIGHTS_FILE)
    learned = load_learned_weights(out / WEIGHTS_FILE)
    init = task.init.tolist()
    plot_curves(
        out / "residual_weights.png",
        {
            "initial": (task.targets, init),
            "learned": (task.targets, learned.weights),
        },
        title=f"learned residual weights (origin layer {learned.origin_layer})",
        xlabel="target layer",
        ylabel="weight",
    )
    history = {  # step 0: the initial weights, then the weights after each logged step
        f"layer {t}": (
            [0, *(e["step"] for e in result.history if f"weight/{t}" in e)],
            [w0, *(e[f"weight/{t}"] for e in result.history if f"weight/{t}" in e)],
        )
        for t, w0 in zip(task.targets, init)
    }
    if any(xs for xs, _ in history.values()):
        plot_curves(
            out / "residual_weights_history.png",
            history,
            title="residual weight per target layer during training",
            ylabel="weight",
        )
    val = [e["val/loss"] for e in result.history if "val/loss" in e]
    summary = {
        **result.summary,
        "residual_weights": {
            "file": str(out / WEIGHTS_FILE),
            "origin_layer": learned.origin_layer,
            "target_layers": learned.target_layers,
            "mode": learned.mode,
            "rotation_sha256": learned.rotation_sha256,
            "initial": init,
            "learned": learned.weights,
            "val_loss_initial": task.init_val_loss,
            "val_loss_final": val[-1] if val else None,
            "time_shift": task.time.shift,
            "family": task.flow.name,
            **task.flow.settings(task.transformer),
            "train_pairs": len(task.train_ids),
            "val_pairs": len(task.val_ids),
        },
    }
    for name in ("train_summary.json", "summary.json"):
        write_summary(out / name, summary)
    result.summary = summary
    log(
        f"[train-weights] {result.step} steps; weights "
        f"{json.dumps([round(w, 4) for w in learned.weights])} for layers "
        f"{learned.target_layers} -> {out / WEIGHTS_FILE}"
    )
    return result
