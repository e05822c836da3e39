"""Run options of the shared training loop (`engine.train`, spec E): `TrainConfig` and its
checks, `OptimizerSpec` (one AdamW) and `check_adam_settings`, the learning-rate schedule
(`lr_multiplier`), the loop options that decide the trained weights (`LOOP_IDENTITY`) and the
deterministic-kernel switch of `TrainConfig.deterministic` (`deterministic_algorithms`,
`set_cublas_workspace_config`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from diffalign.engine.errors import DiffalignError

logger = logging.getLogger("diffalign.train")

SCHEDULES = ("cosine", "constant", "linear")

MIXED_PRECISION = ("no", "fp16", "bf16")

TRACKERS = ("tensorboard", "wandb", "none")

# TrainConfig options that change the trained weights (compared on resume, engine.identity);
# the others say how the run is watched or saved (deterministic: kernel choice, resume-free)
LOOP_IDENTITY = (
    "gradient_accumulation_steps",
    "mixed_precision",
    "max_grad_norm",
    "lr_scheduler",
    "ema_decay",
    "ema_warmup",
    "seed",
)


@dataclass
class TrainConfig:
    """Run options of the shared loop (spec E); the defaults are generic, spec R sets its own."""

    output_dir: str
    max_steps: int | None = None  # optimizer steps (wins over `epochs` when both are given)
    epochs: int | None = None  # -> max_steps = epochs * ceil(len(train_dataloader) / accumulation)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    max_grad_norm: float | None = 1.0  # global-norm clipping per optimizer; None = no clipping
    lr_scheduler: str = "cosine"  # cosine (with linear warm-up) | constant | linear
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0  # used when warmup_steps is None
    ema_decay: float | None = None  # None = no EMA; constant decay by default (U-REPA seed)
    ema_warmup: bool = False  # True = diffusers-style min(decay, (1+s)/(10+s)) ramp
    validate_every: int = 0  # 0 = only at the end, if the task has a val loader
    checkpoint_every: int = 0  # 0 = only the final resumable checkpoint
    keep_checkpoints: int = 2  # resumable checkpoints kept (0 = all)
    export_every_epoch: bool = False  # checkpoint-epoch-NNN exports (seed 001)
    best_metric: str | None = "val/loss"  # lower is better; checkpoint-best when it improves
    log_every: int = 10  # 0 = only at the end
    seed: int = 0
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    resume: str | None = None  # "latest" or a checkpoint folder
    progress: bool = True
    run_name: str = "train"
    overwrite: bool = False  # start over in an output_dir that already holds a run
    max_nonfinite_steps: int = 10  # consecutive non-finite steps before the run stops
    deterministic: bool = False  # deterministic kernels during train() (CUDA: slower)
    compile: bool = False  # torch.compile the trainable modules (engine.compile.compile_module)
    channels_last: bool = False  # NHWC weights for trainable modules with convolutions (U-Nets)

    def validate(self) -> None:
        """Raise DiffalignError on an impossible combination of options."""
        if self.max_steps is None and self.epochs is None:
            raise DiffalignError("training needs max_steps or epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise DiffalignError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs < 1:
            raise DiffalignError(f"epochs must be >= 1, got {self.epochs}")
        if self.gradient_accumulation_steps < 1:
            raise DiffalignError("gradient_accumulation_steps must be >= 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DiffalignError(
                f"unknown mixed_precision '{self.mixed_precision}' (choose from {', '.join(MIXED_PRECISION)})"
            )
        if self.lr_scheduler not in SCHEDULES:
            raise DiffalignError(
                f"unknown lr_scheduler '{self.lr_scheduler}' (choose from {', '.join(SCHEDULES)})"
            )
        if self.tracker not in TRACKERS:
            raise DiffalignError(
                f"unknown tracker '{self.tracker}' (choose from {', '.join(TRACKERS)})"
            )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise DiffalignError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise DiffalignError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise DiffalignError(f"max_grad_norm must be > 0 (or None), got {self.max_grad_norm}")
        for name in ("validate_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 0:
                raise DiffalignError(f"{name} must be >= 0")
        if self.max_nonfinite_steps < 1:
            raise DiffalignError("max_nonfinite_steps must be >= 1")
        if isinstance(self.seed, bool) or not 0 <= int(self.seed) <= 2**63 - 1:
            raise DiffalignError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")


@dataclass
class OptimizerSpec:
    """One AdamW optimizer: torch param-group dicts (per-group "lr"/"weight_decay" override)."""

    param_groups: list[dict]
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def check_adam_settings(betas: tuple[float, float], eps: float, what: str = "AdamW") -> None:
    """AdamW's betas in [0, 1) and eps > 0 (finite), else one DiffalignError line."""
    for i, beta in enumerate(betas, 1):
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta < 1.0:
            raise DiffalignError(f"{what}: adam_beta{i} must be in [0, 1), got {beta!r}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 < eps < math.inf:
        raise DiffalignError(f"{what}: adam_eps must be a finite number > 0, got {eps!r}")


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor after `step` scheduler steps: linear warm-up `step / warmup`, then
    cosine `0.5 (1 + cos(pi p))`, linear `1 - p` or constant 1, `p = (step - W) / (T - W)`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise DiffalignError(f"unknown lr_scheduler '{schedule}'")


CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def set_cublas_workspace_config() -> bool:
    """Set CUBLAS_WORKSPACE_CONFIG=:4096:8 unless the environment has a value; returns whether it
    set it. cuBLAS is reproducible with a fixed per-stream workspace: torch sizes it from this
    variable when the process's first cuBLAS handle gets its workspace (the first matmul on CUDA)
    and, in deterministic mode, checks the variable once, so a command that runs CUDA matmuls
    before training (the EM loop's E-step, FLUX Fill's text cache) calls this first."""
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        return False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    return True


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Deterministic kernels inside the block (`TrainConfig.deterministic`; slower): what a
    bit-exact resume on a GPU needs, since CUDA kernels (atomics in backward passes, cuBLAS's
    algorithm choice) round differently from run to run. Sets
    `torch.use_deterministic_algorithms(True, warn_only=True)` (an op without a deterministic
    kernel warns, naming itself, instead of stopping the run), `cudnn.deterministic = True`,
    `cudnn.benchmark = False` and CUBLAS_WORKSPACE_CONFIG (`set_cublas_workspace_config`; it
    stays set: the cuBLAS handles keep the workspace they were given), and restores the torch
    settings when the block ends or raises. No-op when `enabled` is false."""
    if not enabled:
        yield
        return
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    if set_cublas_workspace_config() and cuda_in_use:
        logger.warning(
            "deterministic: CUDA was in use before CUBLAS_WORKSPACE_CONFIG was set; matmuls that "
            "already ran fixed cuBLAS's workspace: export CUBLAS_WORKSPACE_CONFIG=%s before "
            "starting for deterministic matmuls",
            CUBLAS_WORKSPACE_CONFIG,
        )
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]
        torch.backends.cudnn.benchmark = before[3]
