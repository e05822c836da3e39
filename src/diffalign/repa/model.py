"""Loading SD 1.5's U-Net and noise schedule, and assembling the U-REPA model (seed 003, 2.1).

`load_sd15_unet(model)` takes what every `--model` takes (a diffusers folder, the `sd15` preset,
a Hub id or a single `.safetensors` file) and returns the U-Net plus the `alphas_cumprod` of the
training schedule: by default the seed's (section 4.2: betas LINEAR from 0.00085 to 0.012 over
1000 steps, the model's own start, end and length), or with `noise_schedule="model"` the model's
own scheduler config (SD 1.5: `scaled_linear`, i.e. linear in sqrt(beta)).
`RepaModel` bundles the U-Net with LoRA, the feature hooks and the AlignHeads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError, ModelNotFoundError
from diffalign.repa.heads import FeatureHooks, add_lora, lora_config, make_heads

# SD 1.5's scheduler/scheduler_config.json, for a folder that lacks one
SD15_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


NOISE_SCHEDULES = ("linear", "model")


def load_sd15_unet(model: str, dtype: torch.dtype = torch.float32, noise_schedule: str = "linear"):
    """(UNet2DConditionModel, alphas_cumprod [T] fp32, schedule config dict); `noise_schedule`
    'linear' (seed 4.2) or 'model' (the checkpoint's scheduler config)."""
    if noise_schedule not in NOISE_SCHEDULES:
        raise DiffalignError(
            f"unknown noise_schedule '{noise_schedule}' (choose {' or '.join(NOISE_SCHEDULES)})"
        )
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from diffalign.engine.loading import (
        _hub_errors,
        damaged_weights,
        hub_offline,
        load_pipeline,
        model_not_found,
        require_component,
        resolve_model,
    )

    resolved = resolve_model(model, "sd15")
    if resolved.kind == "single_file":
        pipe = load_pipeline(model, StableDiffusionPipeline, "sd15", dtype=dtype, device=None)
        unet, sched_cfg = pipe.unet, dict(pipe.scheduler.config)
    else:
        kw: dict = {}
        if resolved.kind == "folder":
            folder = Path(resolved.source)
            if not (folder / "unet" / "config.json").is_file():
                raise ModelNotFoundError(
                    model, resolved.download_name, f"{folder} has no unet/config.json"
                )
            require_component(
                folder, "unet", "diffusers", "UNet2DConditionModel", resolved.download_name
            )
        else:
            kw["local_files_only"] = hub_offline()
        try:
            unet = UNet2DConditionModel.from_pretrained(
                resolved.source, subfolder="unet", torch_dtype=dtype, **kw
            )
        except _hub_errors() as e:
            if resolved.kind == "folder":
                damaged = damaged_weights(model, resolved.source, resolved.download_name, "unet")
                if damaged is not None:
                    raise damaged from None
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            if resolved.kind == "hub" and hub_offline():
                detail = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
            raise model_not_found(model, resolved, detail) from None
        try:
            sched_cfg = dict(
                DDPMScheduler.load_config(resolved.source, subfolder="scheduler", **kw)
            )
        except _hub_errors():
            sched_cfg = dict(SD15_SCHEDULE)
    if unet.config.in_channels != 4:
        raise DiffalignError(
            f"--model {model}: its U-Net takes {unet.config.in_channels} input channels, "
            "not the 4 latent channels of SD 1.5"
        )
    return unet, *training_schedule(sched_cfg, noise_schedule)


def training_schedule(sched_cfg: dict, noise_schedule: str = "linear"):
    """(alphas_cumprod [T] fp32, schedule config) of a model's scheduler config: 'model' keeps
    it, 'linear' keeps its length and beta range with betas linear in t (seed 4.2)."""
    from diffusers import DDPMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    cfg = {k: sched_cfg[k] for k in keep if k in sched_cfg}
    if noise_schedule == "linear":
        cfg.pop("trained_betas", None)
        cfg["beta_schedule"] = "linear"
    sched = DDPMScheduler.from_config(cfg)
    return sched.alphas_cumprod.to(torch.float32).clone(), dict(sched.config)


@dataclass
class RepaSpec:
    """What shapes the U-REPA model: recorded with every export so extraction rebuilds it."""

    align_layers: Sequence[str] = ("mid",)
    head: str = "mlp"
    head_hidden_dim: int = 1024
    grid: int = 16
    teacher_dim: int = 1024
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_blocks: Sequence[str] = ("mid",)
    lora_conv: bool = False

    def to_dict(self) -> dict:
        return {
            "align_layers": list(self.align_layers),
            "head": self.head,
            "head_hidden_dim": self.head_hidden_dim,
            "grid": self.grid,
            "teacher_dim": self.teacher_dim,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_blocks": list(self.lora_blocks),
            "lora_conv": self.lora_conv,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RepaSpec:
        """The spec a run recorded (repa_model.json, state.json), each value checked."""
        if not isinstance(d, dict):
            raise DiffalignError(f"U-REPA spec must be a mapping, got {type(d).__name__}")
        known = set(cls().to_dict())
        spec = cls(**{k: v for k, v in d.items() if k in known})
        for key in ("head_hidden_dim", "grid", "teacher_dim", "lora_rank"):
            v = getattr(spec, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DiffalignError(f"U-REPA spec: {key} must be an integer >= 1, got {v!r}")
        for key in ("lora_alpha", "lora_dropout"):
            v = getattr(spec, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise DiffalignError(f"U-REPA spec: {key} must be a finite number, got {v!r}")
        if not spec.lora_alpha > 0:
            raise DiffalignError(f"U-REPA spec: lora_alpha must be > 0, got {spec.lora_alpha}")
        if not 0.0 <= spec.lora_dropout <= 1.0:
            raise DiffalignError(
                f"U-REPA spec: lora_dropout must be in [0, 1], got {spec.lora_dropout}"
            )
        for key in ("align_layers", "lora_blocks"):
            v = getattr(spec, key)
            if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v) or not v:
                raise DiffalignError(f"U-REPA spec: {key} must be a list of names, got {v!r}")
        if not isinstance(spec.head, str) or not isinstance(spec.lora_conv, bool):
            raise DiffalignError("U-REPA spec: head must be a name and lora_conv a boolean")
        return spec


class RepaModel:
    """The frozen U-Net with LoRA, forward hooks on the aligned blocks, one AlignHead each."""

    def __init__(self, unet: nn.Module, spec: RepaSpec, lora: bool = True) -> None:
        self.unet = unet
        self.spec = spec
        self.lora_modules: list[str] = []
        if lora:
            cfg = lora_config(
                spec.lora_rank, spec.lora_alpha, spec.lora_dropout, spec.lora_blocks, spec.lora_conv
            )
            self.lora_modules = add_lora(unet, cfg)
        else:
            unet.requires_grad_(False)
        self.heads = make_heads(
            unet, spec.align_layers, spec.teacher_dim, spec.head_hidden_dim, spec.grid, spec.head
        )
        self.hooks = FeatureHooks(unet, spec.align_layers)

    def forward(
        self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(U-Net prediction, raw features per layer, aligned tokens per layer)."""
        self.hooks.pop()
        pred = self.unet(latents, t, encoder_hidden_states=cond).sample
        feats = self.hooks.pop()
        missing = [layer for layer in self.spec.align_layers if layer not in feats]
        if missing:
            raise DiffalignError(f"the U-Net forward did not reach the aligned block(s) {missing}")
        tokens = {layer: self.heads[layer](feats[layer]) for layer in self.spec.align_layers}
        return pred, feats, tokens
