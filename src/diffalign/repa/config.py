"""The U-REPA training configuration: one dataclass, loaded from YAML, overridden per key.

`diffalign repa train --config configs/repa_track_a.yaml --lora-rank 16` reads the YAML into
`RepaTrainConfig` (an unknown key is an error that names it), then applies the command-line
overrides, each parsed to the field's type. The defaults are the seed's (003, section 6.1).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from diffalign.engine import config_values
from diffalign.engine.config_values import field_types, typed_overrides, typed_value
from diffalign.engine.errors import DiffalignError


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RepaTrainConfig:
    """Every setting of a U-REPA run (seed 003 sections 2-7; defaults = Track A of seed 6.1)."""

    # data and models
    data_dir: str = _f(
        "", "preprocessed data folder (images.zip, manifest.csv, vae_latents.lmdb/, ...)"
    )
    output_dir: str = _f("runs/repa", "run folder: checkpoints, logs, exports, summary.json")
    model: str = _f("sd15", "SD 1.5 model: diffusers folder, preset (sd15), Hub id or .safetensors")
    train_split: str = _f("train", "manifest split used for training")
    val_split: str = _f("val", "manifest split used for validation ('' = no validation)")
    max_train_samples: int | None = _f(
        None, "use N training rows spread evenly over the manifest (None = all)"
    )
    max_val_samples: int | None = _f(
        None, "use N validation rows spread evenly over the manifest (None = all)"
    )
    teacher: str = _f(
        "cached", "cached (tokens from dino_tokens.lmdb) | online (DINOv2 on the batch's images)"
    )
    teacher_model: str = _f(
        "facebook/dinov2-large", "online teacher: DINOv2 folder or Hub id (ViT-L/14 default)"
    )
    token_layout: str = _f(
        "grid",
        "online teacher: grid (spatially correct) | seed (the reference SD 1.5 code's 36x36 slice)",
    )
    # model
    align_layers: list[str] = _f(["mid"], "aligned U-Net blocks: mid, enc_last, dec_first")
    head: str = _f("mlp", "AlignHead: mlp (conv-GELU-conv, the seed) | linear (one conv)")
    head_hidden_dim: int = _f(1024, "AlignHead hidden width")
    grid: int = _f(16, "token grid side (16 -> 256 tokens, as the teacher's)")
    lora_rank: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(8.0, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_blocks: list[str] = _f(
        ["mid"], "U-Net blocks with LoRA: mid, down, up, all, down_blocks.N"
    )
    lora_conv: bool = _f(False, "also put LoRA on the ResNet convolutions of those blocks")
    # objective
    prediction_type: str = _f("v_prediction", "v_prediction (the seed) | epsilon (SD 1.5's own)")
    noise_schedule: str = _f(
        "linear",
        "linear: betas linear from beta_start to beta_end over 1000 steps (the reference SD 1.5 recipe) | model: "
        "the checkpoint's own scheduler config (SD 1.5: scaled_linear)",
    )
    align_coeff: float = _f(0.5, "lambda after warm-up")
    align_warmup_steps: int = _f(3000, "steps of linear lambda warm-up from 0 (0 = none)")
    manifold_weight: float = _f(3.0, "w: manifold loss weight relative to the token loss")
    manifold_mask_diag: bool = _f(True, "mask the Gram-matrix diagonal")
    manifold_upper_only: bool = _f(True, "average the strict upper triangle only")
    manifold_cap: float | None = _f(
        None,
        "anomaly guard: cap the manifold loss at this value (None = off; the reference SD 1.5 recipe: 0.1)",
    )
    cfg_dropout: float = _f(0.1, "probability of the empty-prompt embedding (classifier-free)")
    # optimisation
    lr: float = _f(1e-4, "learning rate of LoRA and heads")
    lora_weight_decay: float = _f(0.0, "AdamW weight decay of the LoRA parameters")
    head_weight_decay: float = _f(0.01, "AdamW weight decay of the AlignHead parameters")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    batch_size: int = _f(128, "batch size per process")
    num_workers: int = _f(8, "DataLoader workers")
    max_steps: int | None = _f(62480, "optimizer steps (None = use epochs)")
    epochs: int | None = _f(None, "epochs, when max_steps is None")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    lr_scheduler: str = _f("cosine", "cosine | linear | constant (after the warm-up)")
    warmup_ratio: float = _f(0.1, "fraction of the steps with linear LR warm-up")
    max_grad_norm: float | None = _f(1.0, "global gradient-norm clip (None = off)")
    mixed_precision: str = _f("bf16", "no | fp16 | bf16")
    ema_decay: float | None = _f(
        0.9995, "EMA decay (constant, the reference SD 1.5 recipe's; None = no EMA)"
    )
    ema_warmup: bool = _f(False, "diffusers EMAModel ramp min(decay, (1+s)/(10+s)) instead")
    validate_every: int = _f(3000, "validate on the EMA weights every N steps (0 = at the end)")
    checkpoint_every: int = _f(6000, "resumable checkpoint every N steps (0 = at the end)")
    keep_checkpoints: int = _f(2, "resumable checkpoints kept (0 = all)")
    log_every: int = _f(10, "log every N steps")
    max_nonfinite_steps: int = _f(10, "anomaly guard: stop after N consecutive non-finite steps")
    seed: int = _f(0, "random seed")
    tracker: str = _f("tensorboard", "tensorboard | wandb | none")
    gradient_checkpointing: bool = _f(False, "U-Net gradient checkpointing (saves memory)")
    deterministic: bool = _f(
        False, "deterministic CUDA kernels (slower): needed for a bit-exact resume on a GPU"
    )
    compile: bool = _f(
        False,
        "torch.compile the U-Net's transformer blocks and the heads (faster steps, cold start)",
    )
    channels_last: bool = _f(False, "U-Net and head convolutions in channels_last (NHWC) layout")

    def validate(self) -> None:
        """One-line errors for values no run can use."""
        choices = {
            "teacher": ("cached", "online"),
            "token_layout": ("grid", "seed"),
            "head": ("mlp", "linear"),
            "prediction_type": ("v_prediction", "epsilon"),
            "noise_schedule": ("linear", "model"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise DiffalignError(
                    f"config: {key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'"
                )
        if not self.data_dir:
            raise DiffalignError("config: data_dir is not set (the preprocessed data folder)")
        for key in ("head_hidden_dim", "grid", "lora_rank", "batch_size"):
            if getattr(self, key) < 1:
                raise DiffalignError(f"config: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "align_warmup_steps"):
            if getattr(self, key) < 0:
                raise DiffalignError(f"config: {key} must be >= 0, got {getattr(self, key)}")
        for key in ("cfg_dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise DiffalignError(f"config: {key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("align_coeff", "manifold_weight", "lora_weight_decay", "head_weight_decay"):
            v = getattr(self, key)
            if not (v >= 0.0 and v < float("inf")):
                raise DiffalignError(f"config: {key} must be finite and >= 0, got {v}")
        if not 0 <= self.seed <= 2**63 - 1:
            raise DiffalignError(f"config: seed must be in [0, 2**63 - 1], got {self.seed}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise DiffalignError(f"config: lr must be > 0, got {self.lr}")
        if not (self.lora_alpha > 0 and self.lora_alpha < float("inf")):  # 0: the LoRA adds nothing
            raise DiffalignError(f"config: lora_alpha must be > 0, got {self.lora_alpha}")
        from diffalign.engine.train import check_adam_settings

        check_adam_settings((self.adam_beta1, self.adam_beta2), self.adam_eps, "config")
        if self.manifold_cap is not None and not self.manifold_cap > 0:
            raise DiffalignError(f"config: manifold_cap must be > 0, got {self.manifold_cap}")


FIELDS = {f.name: f for f in dataclasses.fields(RepaTrainConfig)}

# keys that may change between a checkpoint and its resume (how the run is watched, not trained;
# `deterministic`, `compile` and `channels_last` pick kernels, not the model or the objective)
RESUME_FREE = frozenset(
    {
        "deterministic",
        "compile",
        "channels_last",
        "output_dir",
        "data_dir",
        "num_workers",
        "validate_every",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "tracker",
        "max_nonfinite_steps",
        "max_val_samples",
        "model",
        "teacher_model",
    }
)


TYPES = field_types(RepaTrainConfig)


def coerce(key: str, value: Any, where: str = "config") -> Any:
    """Convert a YAML value or a command-line string to the type of field `key`."""
    return typed_value(TYPES, key, value, where)


def load_config(
    path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> RepaTrainConfig:
    """Read `path` (YAML mapping of RepaTrainConfig keys), apply `overrides`, validate."""
    values: dict[str, Any] = read_config_file(path) if path is not None else {}
    values.update(typed_overrides(TYPES, overrides))
    cfg = RepaTrainConfig(**values)
    cfg.validate()
    return cfg


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Typed values of a YAML config; `base: other.yaml` (relative to the file) is read first and
    overridden by the file's own keys (the ablation configs build on a track's)."""
    return config_values.read_config_file(path, TYPES)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (outside RESUME_FREE) whose values differ between two config dicts."""
    return config_values.config_differences(saved, current, RESUME_FREE)
