"""U-REPA training on the shared loop (seed 003, sections 4-7).

    L = L_diff + lambda(step) * (L_token + w * L_manifold)

SD 1.5's U-Net stays frozen; LoRA (mid-block attention by default) and one AlignHead per aligned
layer train with AdamW (LoRA weight decay 0, heads 0.01, lr 1e-4), cosine schedule after a 10 %
warm-up, clipping 1.0, bf16 autocast, a constant-decay EMA of 0.9995 (the seed's, not diffusers'
`EMAModel` ramp: the engine's EMA with `ema_warmup=False`), validation on the EMA weights
(`val/total`, `val/diffusion`, `val/token`, `val/manifold`) and exactly resumable checkpoints,
all owned by `diffalign.engine.train`. Timesteps are uniform over the 1000-step schedule with
betas linear from 0.00085 to 0.012 (seed 4.2; `noise_schedule: model` takes the checkpoint's own,
SD 1.5's `scaled_linear`); noise and timesteps draw from the global RNG, which every checkpoint saves, and the
dataset draws the classifier-free dropout from (seed, epoch, index), so a resumed run repeats the
uninterrupted one.

Anomaly guard (seed 10.3): `manifold_cap` rescales a manifold loss above the cap down to the cap
(its gradient keeps its direction, scaled by cap / value) and counts the step; a non-finite loss
skips the optimizer step (the loop's guard) and is counted too. Both appear in the logs
(`manifold_capped`, `nonfinite_loss`: fraction of the logged steps) and in summary.json
(`task.anomalies.manifold_capped_steps`, `skipped_nonfinite`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffalign.engine.checkpoints import check_task_config
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import write_json
from diffalign.engine.train import OptimizerSpec, StepContext, TrainConfig, TrainTask, train
from diffalign.repa.config import RESUME_FREE, RepaTrainConfig
from diffalign.repa.data import CLIP, LATENTS, RepaDataset, collate
from diffalign.repa.heads import lora_parameters
from diffalign.repa.losses import (
    add_noise,
    align_coeff,
    cap_loss,
    diffusion_loss,
    diffusion_target,
    manifold_loss,
    token_loss,
    total_loss,
)
from diffalign.repa.model import RepaModel, RepaSpec, load_sd15_unet
from diffalign.repa.preprocess import check_vae_fits

logger = logging.getLogger("diffalign.repa")

MODEL_JSON = "repa_model.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


class RepaTask(TrainTask):
    """LoRA + AlignHead training of seed 003 as a task of the shared loop."""

    def __init__(self, cfg: RepaTrainConfig) -> None:
        self.cfg = cfg
        root = Path(cfg.data_dir)
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.mixed_precision, torch.float32
        )
        # the dataset yields each sample's class embedding, or the empty prompt's under
        # classifier-free dropout (drawn from (seed, epoch, index): resume-exact)
        self.train_ds = RepaDataset(
            root,
            cfg.train_split,
            cfg.teacher,
            cfg.max_train_samples,
            cfg_dropout=cfg.cfg_dropout,
            seed=cfg.seed,
        )
        if len(self.train_ds) == 0:
            raise self.train_ds.empty_split_error()
        if len(self.train_ds) < cfg.batch_size:
            raise DiffalignError(
                f"batch_size {cfg.batch_size} is larger than the {len(self.train_ds)} training "
                "samples (full batches only: the manifold loss depends on the batch)"
            )
        self.val_ds = None
        if cfg.val_split:
            val = RepaDataset(root, cfg.val_split, cfg.teacher, cfg.max_val_samples)
            if len(val):
                self.val_ds = val
            else:
                logger.warning("no '%s' samples: validation is off", cfg.val_split)

        unet, self.alphas_cumprod, self.schedule = load_sd15_unet(
            cfg.model, noise_schedule=cfg.noise_schedule
        )
        self.num_timesteps = len(self.alphas_cumprod)
        latent = self.train_ds.latent_shape
        if len(latent) != 3 or latent[0] != unet.config.in_channels:
            raise DiffalignError(
                f"latents in {root} have shape {list(latent)}; the U-Net takes "
                f"{unet.config.in_channels} channels"
            )
        meta = self.train_ds.latents.meta
        if "scaling_factor" in meta:  # our stores record their VAE (the seed's caches do not)
            check_vae_fits(
                meta["scaling_factor"],
                meta.get("latent_channels", latent[0]),
                cfg.model,
                f"{root / LATENTS} (made with {meta.get('model')})",
            )

        self.dino = None
        if cfg.teacher == "cached":
            tshape = self.train_ds.token_shape
            if len(tshape) != 2 or tshape[0] != cfg.grid * cfg.grid:
                raise DiffalignError(
                    f"teacher tokens in {root} have shape {list(tshape)}; grid {cfg.grid} needs "
                    f"[{cfg.grid * cfg.grid}, D]"
                )
            teacher_dim = int(tshape[1])
        else:
            from diffalign.repa.teacher import check_grid, load_dino

            self.dino = load_dino(cfg.teacher_model, "cpu", torch.float32)
            check_grid(self.dino, cfg.grid, cfg.token_layout)
            self.dino.requires_grad_(False)
            teacher_dim = int(self.dino.config.hidden_size)

        width = self.train_ds.class_table.shape[-1]
        if width != unet.config.cross_attention_dim:
            raise DiffalignError(
                f"{root / CLIP}: embeddings are {width} wide, the U-Net "
                f"cross-attends to {unet.config.cross_attention_dim}"
            )

        self.spec = RepaSpec(
            align_layers=list(cfg.align_layers),
            head=cfg.head,
            head_hidden_dim=cfg.head_hidden_dim,
            grid=cfg.grid,
            teacher_dim=teacher_dim,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            lora_blocks=list(cfg.lora_blocks),
            lora_conv=cfg.lora_conv,
        )
        torch.manual_seed(cfg.seed)  # LoRA and head initialisation depend on the seed only
        self.model = RepaModel(unet, self.spec)
        if self.weight_dtype != torch.float32:
            # frozen base weights in the autocast dtype (as diffusers' LoRA scripts); LoRA fp32
            for p in unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.weight_dtype)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet
        self.heads = self.model.heads
        self.step_seen = 0
        self._capped_window = torch.zeros(())
        self._capped_total = torch.zeros(())

    # -- the loop's interface ------------------------------------------------------------------

    def trainable(self):
        return {"unet": self.unet, "heads": self.heads}

    def frozen(self):
        return {"dino": self.dino} if self.dino is not None else {}

    def optimizers(self):
        cfg = self.cfg
        return {
            "main": OptimizerSpec(
                [
                    {"params": lora_parameters(self.unet), "weight_decay": cfg.lora_weight_decay},
                    {
                        "params": list(self.heads.parameters()),
                        "weight_decay": cfg.head_weight_decay,
                    },
                ],
                lr=cfg.lr,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_eps,
            )
        }

    def _loader(self, ds, shuffle: bool, drop_last: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
        )

    def train_dataloader(self):
        return self._loader(self.train_ds, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return self._loader(self.val_ds, False, False) if self.val_ds is not None else None

    # -- losses --------------------------------------------------------------------------------

    def _teacher_tokens(self, batch: dict, device) -> torch.Tensor:
        if "tokens" in batch:
            return batch["tokens"].to(device, non_blocking=True).float()
        from diffalign.repa.teacher import dino_tokens

        # pixels in [0, 1]: `dino_tokens` applies the §3.3 transform once, exactly as
        # `repa preprocess dino` does for the cached store
        images = batch["image"].to(device).float() / 255.0
        with torch.no_grad():
            tokens = dino_tokens(
                self.dino, images, grid=self.cfg.grid, layout=self.cfg.token_layout
            )
        return tokens.float()

    def _losses(self, batch: dict, step: int, generator: torch.Generator | None) -> dict:
        cfg = self.cfg
        device = next(self.heads.parameters()).device
        x0 = batch["latent"].to(device, non_blocking=True).float()
        b = x0.shape[0]
        # random numbers drawn on the CPU: the same on every device, saved with each checkpoint
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        cond = batch["class_embedding"].to(device, self.weight_dtype, non_blocking=True)
        t, noise = t.to(device), noise.to(device)

        zt = add_noise(x0, noise, self.alphas_cumprod, t)
        target = diffusion_target(x0, noise, self.alphas_cumprod, t, cfg.prediction_type)
        pred, _, tokens = self.model.forward(zt.to(self.weight_dtype), t, cond)
        teacher = self._teacher_tokens(batch, device)

        # every loss is fp32: the alignment losses switch this autocast off themselves (seed 8.1)
        l_diff = diffusion_loss(pred, target)
        l_tok = torch.stack([token_loss(v, teacher) for v in tokens.values()]).mean()
        l_man = torch.stack(
            [
                manifold_loss(v, teacher, cfg.manifold_mask_diag, cfg.manifold_upper_only)
                for v in tokens.values()
            ]
        ).mean()
        l_man_used, capped = cap_loss(l_man, cfg.manifold_cap)
        lam = align_coeff(step, cfg.align_coeff, cfg.align_warmup_steps)
        total = total_loss(l_diff, l_tok, l_man_used, lam, cfg.manifold_weight)
        return {
            "total": total,
            "diffusion": l_diff.detach(),
            "token": l_tok.detach(),
            "manifold": l_man.detach(),
            "align_coeff": lam,
            "capped": capped,
        }

    def training_step(self, batch, step: int, ctx: StepContext) -> dict:
        out = self._losses(batch, step, None)
        self.step_seen = step + 1
        # counted on the device (no host sync per step): a step is capped if any micro-batch was
        self._capped_window = torch.maximum(
            self._capped_window.to(out["capped"].device), out["capped"]
        )
        if ctx.sync_gradients:
            self._capped_total = self._capped_window + self._capped_total.to(out["capped"].device)
            self._capped_window = torch.zeros_like(self._capped_window)
        return {
            "loss": out["total"],
            "diffusion": out["diffusion"],
            "token": out["token"],
            "manifold": out["manifold"],
            "align_coeff": out["align_coeff"],
            "manifold_capped": out["capped"],
            "nonfinite_loss": (~torch.isfinite(out["total"].detach())).float(),
        }

    def validation_step(self, batch) -> dict:
        # fixed random numbers per batch (seeded by its first sample): every validation of a run
        # sees the same timesteps and noise, so val curves compare weights, not draws
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(batch["index"][0]))
        out = self._losses(batch, self.step_seen, g)
        return {k: out[k] for k in ("total", "diffusion", "token", "manifold")}

    # -- records -------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        return {
            **dataclasses.asdict(self.cfg),
            "teacher_dim": self.spec.teacher_dim,
            "latent_shape": list(self.train_ds.latent_shape),
            "schedule": {
                k: self.schedule.get(k)
                for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
            },
        }

    def identity(self) -> dict:
        """Compared on resume (`engine.identity`): the settings outside RESUME_FREE, the U-Net
        (and online teacher) by identity, and the identity each data store records."""
        from diffalign.engine.identity import file_sha256

        stores = {"latents": self.train_ds.latents.meta.get("identity")}
        if self.train_ds.tokens is not None:
            stores["tokens"] = self.train_ds.tokens.meta.get("identity")
        data = {**stores, "clip_sha256": file_sha256(Path(self.cfg.data_dir) / CLIP)}
        return _repa_identity(self.cfg, self.config_dict(), data)

    def check_resume(self, saved_config: dict | None, path: Path) -> None:
        check_task_config(saved_config, self.config_dict(), path, RESUME_FREE, missing=NO_CONFIG)

    def state_dict(self) -> dict:
        return {"manifold_capped": self.manifold_capped, "step_seen": self.step_seen}

    @property
    def manifold_capped(self) -> int:
        """Optimizer steps whose manifold loss was capped (this process)."""
        return int(self._capped_total.item())

    def load_state_dict(self, state: dict) -> None:
        self._capped_total = torch.tensor(float(state.get("manifold_capped", 0)))
        self.step_seen = int(state.get("step_seen", 0))

    def summary(self) -> dict:
        return {
            "anomalies": {
                "manifold_capped_steps": self.manifold_capped,
                "manifold_cap": self.cfg.manifold_cap,
            },
            "spec": self.spec.to_dict(),
        }

    def export(self, out_dir: Path) -> None:
        """`unet.safetensors` (peft LoRA names) and `heads.safetensors` for `repa extract`, the
        LoRA in diffusers' format (`pipe.load_lora_weights(folder)`), and `repa_model.json`."""
        super().export(out_dir)
        from diffusers import StableDiffusionPipeline

        from diffalign.engine.lora import save_unet_lora
        from diffalign.repa.heads import ADAPTER_NAME

        save_unet_lora(StableDiffusionPipeline, out_dir, self.unet, ADAPTER_NAME, torch.float32)
        write_json(
            Path(out_dir) / MODEL_JSON,
            {
                "format": "diffalign-repa-1",
                "model": self.cfg.model,
                "spec": self.spec.to_dict(),
                "prediction_type": self.cfg.prediction_type,
                "noise_schedule": self.cfg.noise_schedule,
                "teacher": self.cfg.teacher,
                "teacher_model": self.cfg.teacher_model,
                "token_layout": self.cfg.token_layout,
            },
        )


# config_dict()'s keys that only the loaded models and data tell, and the identity's data part
LOADED = ("teacher_dim", "latent_shape", "schedule")


# a checkpoint without a task configuration (`check_task_config`) is not resumed
NO_CONFIG = "it records no U-REPA configuration"


ONLINE_TEACHER_INPUT = "pixels in [0, 1], ImageNet-normalised once"


def _repa_identity(cfg: RepaTrainConfig, config: dict, data: dict | None) -> dict:
    from diffalign.engine.identity import model_identity
    from diffalign.repa.teacher import _resolve_dino

    online = cfg.teacher == "online"
    return {
        **{k: v for k, v in config.items() if k not in RESUME_FREE},
        # online runs before 2026-12-07 normalised DINOv2's pixels twice: not resumed with these
        **({"teacher_input": ONLINE_TEACHER_INPUT} if online else {}),
        "models": {
            "unet": model_identity(cfg.model, ("unet", "scheduler")),
            "teacher": model_identity(_resolve_dino(cfg.teacher_model)[0]) if online else None,
        },
        "data": data,
    }


def check_before_loading(cfg: RepaTrainConfig, loop: TrainConfig) -> None:
    """The trainer's used-folder and resume refusals (`engine.checkpoints.check_before_setup`)
    from the config alone, before the U-Net, VAE or teacher loads: a re-run with other
    settings is refused in seconds (the trainer compares everything again on resume)."""
    from diffalign.engine.checkpoints import check_before_setup

    config = dataclasses.asdict(cfg)
    check_before_setup(
        loop,
        lambda: _repa_identity(cfg, config, None),
        unknown=(*LOADED, "data"),
        check_task=lambda saved, path: check_task_config(
            saved, config, path, RESUME_FREE, LOADED, missing=NO_CONFIG
        ),
    )


def loop_config(cfg: RepaTrainConfig, resume: str | None, overwrite: bool) -> TrainConfig:
    """The shared loop's options from a U-REPA configuration."""
    return TrainConfig(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        epochs=cfg.epochs if cfg.max_steps is None else None,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler=cfg.lr_scheduler,
        warmup_ratio=cfg.warmup_ratio,
        ema_decay=cfg.ema_decay,
        ema_warmup=cfg.ema_warmup,
        validate_every=cfg.validate_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        best_metric="val/total",
        log_every=cfg.log_every,
        seed=cfg.seed,
        tracker=cfg.tracker,
        resume=resume,
        run_name="repa",
        overwrite=overwrite,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
        deterministic=cfg.deterministic,
        compile=cfg.compile,
        channels_last=cfg.channels_last,
    )


def train_repa(
    cfg: RepaTrainConfig, resume: str | None = None, overwrite: bool = False, progress: bool = True
):
    """Train (or resume) a U-REPA run; returns the loop's TrainResult."""
    lcfg = loop_config(cfg, resume, overwrite)
    lcfg.progress = progress
    lcfg.validate()
    check_before_loading(cfg, lcfg)  # a used folder or another run's checkpoint: refused now
    task = RepaTask(cfg)
    try:
        return train(task, lcfg)
    except DiffalignError as e:
        raise DiffalignError(_worker_message(str(e))) from None
    finally:
        task.model.hooks.remove()


def _worker_message(text: str) -> str:
    """A DiffalignError raised in a DataLoader worker comes back wrapped in its traceback:
    keep the original one-line message."""
    if not text.startswith("Caught ") or "\n" not in text:
        return text
    for line in reversed(text.strip().splitlines()):
        if "DiffalignError: " in line:
            return line.split("DiffalignError: ", 1)[1]
    return text.splitlines()[0]
