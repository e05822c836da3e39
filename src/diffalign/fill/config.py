"""The FLUX Fill training config: one dataclass schema, loaded from YAML, `--key value`
overrides typed by the schema (spec F: Train). An unknown key is an error naming it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class FillTrainConfig:
    """Every option of `diffalign fill train` (YAML keys; `--kebab-case` on the command line)."""

    # data
    data: str | None = _opt(None, "triptych folder ([visible | target | semantic] images)")
    captions: str | None = _opt(
        None, "captions.jsonl (default: <data>/captions.jsonl if present, else .txt side files)"
    )
    image_field: str = _opt("image", "image-name field of captions.jsonl")
    prompt_field: str = _opt("prompt", "prompt field of captions.jsonl")
    panel: int | None = _opt(
        512, "panel size in pixels, divisible by 16 (panels are resized; null: native size)"
    )
    max_panel_size: int = _opt(
        1024, "largest panel (given or native): FLUX.1's resolution, a 1024 x 2048 diptych"
    )
    batch_size: int = _opt(1, "triptychs per micro-batch and process")
    num_workers: int = _opt(0, "DataLoader workers")
    cache_text: bool = _opt(False, "encode each prompt once and keep the embeddings on disk")
    text_cache_dir: str | None = _opt(None, "text cache folder (default: <output_dir>/text_cache)")
    max_sequence_length: int = _opt(512, "T5 tokens per prompt (FLUX.1-Fill-dev: 512)")
    # model
    model: str = _opt("flux-fill", "FLUX.1-Fill model: preset, diffusers folder or Hub id")
    base_dtype: str = _opt(
        "float32",
        "dtype of the frozen weights",
        ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
    )
    lora_rank: int = _opt(16, "LoRA rank")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: the rank)")
    lora_targets: str = _opt(
        "default",
        "default (diffusers' FLUX LoRA layers) | all-linear | comma list of module names",
    )
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    semantic: bool = _opt(True, "train the semantic cross-attention branch (false: LoRA only)")
    semantic_heads: int = _opt(8, "heads of the semantic cross-attention")
    semantic_layers: int = _opt(1, "stacked semantic cross-attention layers")
    semantic_layout: str = _opt(
        "target-half",
        "the semantic K/V tokens: target-half (diptych grid, zeros on the visible half), "
        "both-halves, or panel (the seed's: the semantic panel's own tokens)",
        ("target-half", "both-halves", "panel"),
    )
    guidance: float = _opt(30.0, "guidance-embedding value (FLUX.1-Fill-dev: 30)")
    gradient_checkpointing: bool = _opt(False, "gradient checkpointing of the transformer")
    cudnn_attention: bool = _opt(
        False,
        "let attention use cuDNN's SDPA kernels on CUDA (off by default: torch 2.11's failed "
        "in the backward pass of a FLUX.1-Fill-size step on an H200)",
    )
    # loss and timesteps
    loss_region: str = _opt("all", "MSE over all tokens or the target half", ("all", "target"))
    timestep_sampling: str = _opt(
        "uniform", "t distribution (uniform is the seed's)", ("uniform", "logit-normal", "mode")
    )
    logit_mean: float = _opt(
        0.0,
        "mean of logit-normal sampling of t, the noise level (SD3 paper); diffusers' FLUX "
        "trainers use sigma = 1 - u, so their --logit_mean m is our -m",
    )
    logit_std: float = _opt(1.0, "std of logit-normal sampling")
    mode_scale: float = _opt(1.29, "scale of mode sampling")
    resolution_shift: bool = _opt(False, "shift t by FLUX's resolution-dependent mu")
    # optimisation
    lr_lora: float = _opt(1e-4, "learning rate of the LoRA parameters")
    lr_semantic: float = _opt(1e-4, "learning rate of the semantic cross-attention")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_steps: int | None = _opt(1000, "optimizer steps")
    epochs: int | None = _opt(None, "epochs (when max_steps is null)")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    mixed_precision: str = _opt("no", "autocast precision", ("no", "bf16", "fp16"))
    max_grad_norm: float | None = _opt(1.0, "global-norm clipping (null: none)")
    lr_scheduler: str = _opt("constant", "schedule after warm-up", ("constant", "cosine", "linear"))
    warmup_steps: int = _opt(0, "linear warm-up steps")
    ema_decay: float | None = _opt(None, "EMA decay of the trainable weights (null: no EMA)")
    seed: int = _opt(0, "seed of noise, timesteps and data order")
    deterministic: bool = _opt(
        False, "deterministic CUDA kernels (slower): needed for a bit-exact resume on a GPU"
    )
    compile: bool = _opt(
        False, "torch.compile the transformer's blocks (regional: faster steps, cold start)"
    )
    # run
    output_dir: str = _opt("runs/fill_semantic", "run folder")
    log_every: int = _opt(10, "log every N steps (cross-attention scales included)")
    validate_every: int = _opt(0, "validation grid every N steps (0: at the end only)")
    num_validation: int = _opt(4, "fixed validation examples (the first N triptychs)")
    validation_steps: int = _opt(20, "sampling steps of the validation images")
    checkpoint_every: int = _opt(500, "resumable checkpoint every N steps")
    keep_checkpoints: int = _opt(2, "resumable checkpoints kept")
    tracker: str = _opt("tensorboard", "tracker", ("tensorboard", "wandb", "none"))
    resume: str | None = _opt(None, "latest or a checkpoint folder")
    overwrite: bool = _opt(False, "start over in an output_dir holding a run")

    def validate(self) -> None:
        """One DiffalignError line per impossible value."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise DiffalignError(
                    f"{f.name}: '{getattr(self, f.name)}' is not one of {', '.join(choices)}"
                )
        if self.data is None:
            raise DiffalignError("data: the triptych folder is required (data: or --data)")
        if self.panel is not None and (self.panel < 16 or self.panel % 16):
            raise DiffalignError(f"panel must be a positive multiple of 16, got {self.panel}")
        from diffalign.fill.data import check_panel_bound

        check_panel_bound(self.panel, self.max_panel_size)
        positive = (
            "batch_size",
            "lora_rank",
            "semantic_heads",
            "semantic_layers",
            "gradient_accumulation_steps",
            "validation_steps",
            "max_sequence_length",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise DiffalignError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "num_workers",
            "warmup_steps",
            "log_every",
            "validate_every",
            "num_validation",
        ):
            if getattr(self, name) < 0:
                raise DiffalignError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr_lora", "lr_semantic", "logit_std", "guidance"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name != "guidance" and v == 0):
                raise DiffalignError(f"{name} must be a positive number, got {v}")
        if not 0 <= self.seed < 2**63:
            raise DiffalignError(f"seed must be in 0..2**63-1, got {self.seed}")
        if self.weight_decay < 0:
            raise DiffalignError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise DiffalignError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DiffalignError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_steps is None and self.epochs is None:
            raise DiffalignError("set max_steps or epochs")


def _field_types() -> dict[str, Any]:
    from diffalign.engine.config_values import field_types

    return field_types(FillTrainConfig)


def convert_value(key: str, value: Any) -> Any:
    """`value` (from YAML or a `--key value` string) as the schema's type of `key`."""
    from diffalign.engine.config_values import typed_value

    return typed_value(_field_types(), key, value)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> FillTrainConfig:
    """The YAML file at `path` (if any; `base: other.yaml` inherits) with `overrides` on top,
    typed and validated."""
    from diffalign.engine.config_values import read_config_file, typed_overrides

    types_ = _field_types()
    values: dict[str, Any] = read_config_file(path, types_) if path is not None else {}
    values.update(typed_overrides(types_, overrides))
    config = FillTrainConfig(**values)
    config.validate()
    return config


# Keys a resume may change: where data, logs, checkpoints and caches go, how the run is watched,
# how fast a step runs (workers, checkpointing, precision, deterministic kernels) and, with a
# constant learning rate, how long it runs. Everything else (module shape, LoRA, objective,
# optimiser, data order) must match the checkpoint: a resume with another one is one error line
# naming the key.
RESUME_FREE = frozenset(
    {
        "data",
        "captions",
        "num_workers",
        "max_panel_size",
        "cache_text",
        "text_cache_dir",
        "model",
        "base_dtype",
        "mixed_precision",
        "gradient_checkpointing",
        "deterministic",
        "compile",
        "output_dir",
        "log_every",
        "validate_every",
        "num_validation",
        "validation_steps",
        "checkpoint_every",
        "keep_checkpoints",
        "tracker",
        "resume",
        "overwrite",
    }
)


def resume_free_keys(saved: dict, current: dict) -> frozenset[str]:
    """RESUME_FREE, plus `max_steps` / `epochs` when both runs use a constant learning rate."""
    if saved.get("lr_scheduler") == current.get("lr_scheduler") == "constant":
        return RESUME_FREE | {"max_steps", "epochs"}
    return RESUME_FREE


def config_fields() -> list[tuple[str, Any, dict]]:
    """(name, default, metadata) of every option, for the CLI."""
    return [(f.name, f.default, dict(f.metadata)) for f in dataclasses.fields(FillTrainConfig)]
