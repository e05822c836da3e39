"""The shared training loop on accelerate (spec E: Training loop; seed defaults of spec R).

A capability describes *what* to train by subclassing `TrainTask` (its trainable and frozen
modules, named AdamW optimizers, data loaders and a `training_step`) and calls
`train(task, TrainConfig(...))`, which owns *how*: an `accelerate.Accelerator` for mixed
precision (no/fp16/bf16 autocast) and multi-process runs under `accelerate launch` (the data is
sharded by accelerate; gradients of the trainable parameters are averaged across processes at
each accumulation boundary, so a task may call its own modules directly), gradient accumulation
(the loss of a window is divided by the window's length), AdamW per optimizer with a cosine /
linear / constant schedule after a linear warm-up (`lr_multiplier`), global-norm clipping, an fp32
EMA of the trainable parameters (`diffalign.engine.ema.EMA`), validation on the EMA weights,
TensorBoard / W&B trackers, a progress bar, `train_history.png`, `train_summary.json` (also as
`summary.json`) and `run_config.json`. Resumable checkpoints `<output_dir>/checkpoints/checkpoint-<step>/` are written
atomically and hold `<module>.safetensors` (trainable parameters and buffers), `ema.safetensors`,
`optimizer-<name>.pt` / `scheduler-<name>.pt` / `scaler.pt` (state dicts, read back with
`weights_only=True`), `rng.pt` (python/numpy/torch RNG of every process) and `state.json` (step,
epoch, position in the epoch, best metric, config, loss history). Resuming replays the seeded
sampler of the current epoch and skips the batches already consumed, so k steps + resume to N
gives the same weights as N steps straight (bit-identical on CPU, given a dataset whose items do
not draw from the global RNG; on CUDA it needs `deterministic=True`: deterministic kernels for the
run). Exports (`checkpoint-final/`, `checkpoint-best/`,
`checkpoint-epoch-NNN/`) go through `task.export` with the EMA weights applied. A non-finite loss
skips the optimizer step; `max_nonfinite_steps` consecutive ones stop the run with a
`DiffalignError`, and so does a run that ends without one finite step since it started or
resumed (nothing was trained: no checkpoint-final is written). Several optimizers (a GAN):
`training_step` calls `ctx.backward(loss, name)` for each; all gradients are cleared at the start
of every accumulation window. Data parallel only (no DeepSpeed/FSDP). On a CPU-only machine two
processes need `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 script.py`
(`--cpu` alone starts a single process).

    class Regression(TrainTask):
        def trainable(self): return {"net": self.net}
        def optimizers(self): return {"main": OptimizerSpec([{"params": self.net.parameters()}])}
        def train_dataloader(self): return DataLoader(self.data, batch_size=8, shuffle=True)
        def training_step(self, batch, step, ctx): return {"loss": mse(self.net(batch[0]), batch[1])}

    result = train(Regression(), TrainConfig(output_dir="runs/reg", max_steps=1000, ema_decay=0.999))
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from diffalign.engine.ema import EMA
from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import check_identity
from diffalign.engine.io import (
    atomic_dir,
    clean_stale_temporaries,
    load_pt,
    load_tensors,
    locked_output_dir,
    read_json,
    save_pt,
    save_tensors,
    write_json,
)

logger = logging.getLogger("diffalign.train")

SCHEDULES = ("cosine", "constant", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "none")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
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


# ----------------------------------------------------------------------------------------------
# public configuration and task interface


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


class TrainTask:
    """What to train; subclass it and override the methods marked required."""

    def trainable(self) -> dict[str, nn.Module]:
        """Required: modules whose parameters train; saved in checkpoints and EMA'd."""
        raise NotImplementedError

    def frozen(self) -> dict[str, nn.Module]:
        """Modules used but not trained: moved to the device, eval(), requires_grad False."""
        return {}

    def optimizers(self) -> dict[str, OptimizerSpec]:
        """Required: name -> AdamW spec; the single-optimizer case uses the name "main"."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        """Required: the training data; accelerate shards it across processes."""
        raise NotImplementedError

    def training_step(self, batch: Any, step: int, ctx: StepContext) -> dict:
        """Required: return {"loss": tensor, ...} or call ctx.backward(loss, name) yourself."""
        raise NotImplementedError

    def val_dataloader(self) -> DataLoader | None:
        """Optional validation data."""
        return None

    def validation_step(self, batch: Any) -> dict[str, float]:
        """Metrics of one validation batch (runs under no_grad with EMA weights swapped in)."""
        raise NotImplementedError

    def on_validation_end(self, step: int, out_dir: Path) -> dict | None:
        """Main process only, EMA weights in: e.g. write sample grids; may return extra metrics."""
        return None

    def export(self, out_dir: Path) -> None:
        """Write the trained result (EMA applied); default: <module>.safetensors per module."""
        for name, module in self.trainable().items():
            save_tensors(Path(out_dir) / f"{name}.safetensors", trainable_state(module))

    def config_dict(self) -> dict:
        """Task settings recorded in run_config.json and in each checkpoint's state.json."""
        return {}

    def identity(self) -> dict:
        """What decides the trained weights besides the loop's options (the models used and the
        settings that change the bytes; not how the run is watched): recorded in every checkpoint
        and compared on resume (`engine.identity`). Default: `config_dict()`."""
        return self.config_dict()

    def check_resume(self, saved_config: dict | None, path: Path) -> None:
        """Raise DiffalignError when checkpoint `path` (task settings `saved_config`, None for
        checkpoints written before this field existed) cannot resume this task."""

    def state_dict(self) -> dict:
        """JSON-able task state (e.g. counters) saved in each checkpoint and restored on resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (called once on resume)."""

    def log_state(self) -> dict[str, float]:
        """Optional: values of the task's state (e.g. a learned gate) logged as they are at each
        log step, after that step's optimizer update (not averaged over the log window)."""
        return {}

    def summary(self) -> dict:
        """Extra entries for summary.json under "task" (main process)."""
        return {}


class StepContext:
    """What `training_step` gets besides the batch: the accelerator, device, step and epoch."""

    def __init__(self, trainer: _Trainer):
        self._trainer = trainer
        self.accelerator = trainer.accelerator
        self.device = trainer.accelerator.device
        self.step = 0  # optimizer steps done before this one (0-based index of this step)
        self.epoch = 0
        self.max_steps = trainer.max_steps
        self.sync_gradients = True  # True on the last micro-batch of an accumulation window
        self._backward_calls = 0

    def backward(self, loss: torch.Tensor, optimizer: str = "main") -> None:
        """Backward of `loss` (divided by the accumulation window); at the window's end: gradient
        all-reduce, unscale, clip, optimizer step, scheduler step, zero_grad (EMA after the step)."""
        self._trainer.backward(loss, optimizer)
        self._backward_calls += 1


@dataclass
class TrainResult:
    """What a run produced: per-log history, folders, final step and the summary written."""

    history: list[dict]
    output_dir: Path
    final_dir: Path
    best_dir: Path | None
    step: int
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# small pure helpers


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


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad plus persistent buffers: what a checkpoint stores."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in module.named_buffers()}
    out = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if k in names or (k in buffers and not isinstance(v, nn.Parameter)):
            out[k] = v.detach().cpu().clone()
    return out


def load_trainable_state(
    module: nn.Module, tensors: dict[str, torch.Tensor], where: str = "checkpoint"
) -> None:
    """Load `trainable_state` tensors back; names and shapes must match exactly."""
    expected = {k: tuple(v) for k, v in trainable_state_shapes(module).items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise DiffalignError(f"{where} does not match the module ({what})")
    for k, v in tensors.items():
        if tuple(v.shape) != expected[k]:
            raise DiffalignError(
                f"{where}: '{k}' has shape {list(v.shape)}, the module has {list(expected[k])}"
            )
    module.load_state_dict(tensors, strict=False)


def trainable_state_shapes(module: nn.Module) -> dict[str, list[int]]:
    """Names and shapes of `trainable_state` without copying tensors."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in module.named_buffers()}
    return {
        k: list(v.shape)
        for k, v in module.state_dict(keep_vars=True).items()
        if k in names or (k in buffers and not isinstance(v, nn.Parameter))
    }


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Resumable checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def _rng_state() -> dict:
    """RNG states as tensors / ints / tuples, so that weights_only loading works."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _sum_parts(
    parts: list[tuple[dict[str, float], dict[str, float]]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Key-wise totals of the (sums, counts) pairs gathered from every process."""
    total_s: dict[str, float] = {}
    total_c: dict[str, float] = {}
    for sums, counts in parts:
        for k in sums:
            total_s[k] = total_s.get(k, 0.0) + sums[k]
            total_c[k] = total_c.get(k, 0.0) + counts[k]
    return total_s, total_c


def _set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def _json_config(obj: dict) -> dict:
    """Tracker-friendly flat config: scalars kept, everything else as a string."""
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            for k2, v2 in _json_config(v).items():
                out[f"{k}.{k2}"] = v2
        elif isinstance(v, bool | int | float | str):
            out[k] = v
        else:
            out[k] = str(v)
    return out


def _to_float_tensor(v: Any) -> torch.Tensor | None:
    if isinstance(v, torch.Tensor):
        if v.numel() == 0:
            return None
        return v.detach().float().mean()
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float | np.floating | np.integer):
        return torch.tensor(float(v))
    return None


# ----------------------------------------------------------------------------------------------
# the loop


def train(task: TrainTask, config: TrainConfig) -> TrainResult:
    """Run (or resume) training of `task` under `config`; see the module docstring."""
    config.validate()
    with deterministic_algorithms(config.deterministic):
        return _Trainer(task, config).run()


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


class _Trainer:
    def __init__(self, task: TrainTask, config: TrainConfig):
        self.task = task
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = self._make_accelerator()
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device

    # -- setup ---------------------------------------------------------------------------------

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        cfg = self.config
        log_with = None
        if cfg.tracker == "tensorboard":
            log_with = "tensorboard"
        elif cfg.tracker == "wandb":
            from accelerate.utils import is_wandb_available

            if not is_wandb_available():
                raise DiffalignError("tracker 'wandb' needs the wandb package: pip install wandb")
            log_with = "wandb"
        # train() may run several times in one process (tests, the EM loop): start from a clean
        # accelerator state, keeping the process group (PartialState).
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        try:
            return Accelerator(
                mixed_precision=cfg.mixed_precision,
                log_with=log_with,
                project_config=ProjectConfiguration(
                    project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
                ),
                dataloader_config=DataLoaderConfiguration(
                    use_seedable_sampler=True, data_seed=cfg.seed
                ),
                step_scheduler_with_optimizer=False,
            )
        except (ValueError, RuntimeError) as e:
            raise DiffalignError(
                f"cannot set up accelerate with mixed_precision='{cfg.mixed_precision}': "
                f"{str(e).splitlines()[0]}"
            ) from None

    def _setup(self) -> None:
        from accelerate.utils import set_seed

        cfg, task, acc = self.config, self.task, self.accelerator
        # numpy's legacy seeding (inside set_seed) takes 32 bits; small seeds are unchanged
        set_seed(cfg.seed % (2**32 - 2**16), device_specific=True)

        self.modules = dict(task.trainable())
        if not self.modules:
            raise DiffalignError("the task has no trainable modules")
        for m in self.modules.values():
            m.to(self.device)
            m.train()
        self.frozen_modules = dict(task.frozen())
        for m in self.frozen_modules.values():
            m.to(self.device)
            m.eval()
            m.requires_grad_(False)
        if self.world > 1:
            self._broadcast_trainable()

        # optimizers: one AdamW per name, every parameter must belong to a trainable module
        owned = {id(p) for m in self.modules.values() for p in m.parameters()}
        specs = dict(task.optimizers())
        if not specs:
            raise DiffalignError("the task defines no optimizer")
        self.optimizers: dict[str, Any] = {}
        self.opt_params: dict[str, list[nn.Parameter]] = {}
        for name, spec in specs.items():
            groups = []
            for g in spec.param_groups:
                g = dict(g)
                params = g.get("params")
                if isinstance(params, torch.Tensor):
                    params = [params]
                g["params"] = [p for p in params if p.requires_grad]
                if g["params"]:
                    groups.append(g)
            params = [p for g in groups for p in g["params"]]
            if not params:
                raise DiffalignError(f"optimizer '{name}' has no parameter that requires grad")
            if any(id(p) not in owned for p in params):
                raise DiffalignError(
                    f"optimizer '{name}' updates a parameter that is in no trainable() module "
                    "(it would be neither checkpointed nor EMA'd)"
                )
            check_adam_settings(spec.betas, spec.eps, f"optimizer '{name}'")
            opt = torch.optim.AdamW(
                groups, lr=spec.lr, weight_decay=spec.weight_decay, betas=spec.betas, eps=spec.eps
            )
            self.optimizers[name] = acc.prepare_optimizer(opt)
            self.opt_params[name] = params
        seen: set[int] = set()
        for name, params in self.opt_params.items():
            ids = {id(p) for p in params}
            if len(ids) != len(params) or ids & seen:
                raise DiffalignError(f"optimizer '{name}' repeats a parameter of another group")
            seen |= ids

        # data
        self.train_dl = acc.prepare_data_loader(task.train_dataloader())
        try:
            self.batches_per_epoch = len(self.train_dl)
        except TypeError:
            raise DiffalignError("the training DataLoader must have a length") from None
        if self.batches_per_epoch == 0:
            raise DiffalignError("the training DataLoader is empty")
        val = task.val_dataloader()
        self.val_dl = acc.prepare_data_loader(val) if val is not None else None

        accum = cfg.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accum)
        self.max_steps = (
            cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        )
        if cfg.warmup_steps is not None:
            self.warmup_steps = int(cfg.warmup_steps)
        else:
            self.warmup_steps = int(round(cfg.warmup_ratio * self.max_steps))

        schedule, warm, total = cfg.lr_scheduler, self.warmup_steps, self.max_steps

        def lr_lambda(s: int) -> float:
            return lr_multiplier(s, schedule, warm, total)

        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lr_lambda)
            for name, opt in self.optimizers.items()
        }
        self.ema = (
            EMA(self.modules, cfg.ema_decay, warmup=cfg.ema_warmup)
            if cfg.ema_decay is not None
            else None
        )

        # counters (overwritten by a resume)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped_nonfinite = 0
        self.consecutive_nonfinite = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.last_val_step = -1
        self.last_ckpt_step = -1
        self.seconds_before = 0.0
        self._reset_log_window()

    def _broadcast_trainable(self) -> None:
        """Start every process from rank 0's weights (as DDP does)."""
        import torch.distributed as dist

        for m in self.modules.values():
            tensors = [p for p in m.parameters() if p.requires_grad] + list(m.buffers())
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def _prepare_output_dir(self) -> None:
        cfg = self.config
        if self.is_main:  # a kill during a checkpoint or an export leaves `.<name>.*.tmp`
            for folder in (self.output_dir, self.output_dir / "checkpoints"):
                for p in clean_stale_temporaries(folder):
                    logger.info("removed the stale temporary %s of an interrupted run", p)
        has_run = (
            bool(list_checkpoints(self.output_dir))
            or (self.output_dir / "checkpoint-final").is_dir()
        )
        if cfg.resume is None and has_run:
            if not cfg.overwrite:
                raise DiffalignError(
                    f"{self.output_dir} already holds a training run; resume it with "
                    "resume='latest' (--resume latest) or start over with overwrite=True (--overwrite)"
                )
            if self.is_main:
                for name in (
                    "checkpoints",
                    "checkpoint-final",
                    "checkpoint-best",
                    "logs",
                    "validation",
                ):
                    shutil.rmtree(self.output_dir / name, ignore_errors=True)
                for p in self.output_dir.glob("checkpoint-epoch-*"):
                    shutil.rmtree(p, ignore_errors=True)
                for name in (
                    "train_summary.json",
                    "summary.json",
                    "train_history.png",
                    "run_config.json",
                ):
                    (self.output_dir / name).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    # -- resume --------------------------------------------------------------------------------

    def _resolve_resume(self) -> Path | None:
        r = self.config.resume
        if r is None:
            return None
        if r == "latest":
            ckpts = list_checkpoints(self.output_dir)
            if ckpts:
                return ckpts[-1]
            if (self.output_dir / "checkpoint-final").is_dir() and not self.config.overwrite:
                raise DiffalignError(
                    f"{self.output_dir} holds a finished run without a resumable checkpoint "
                    "(checkpoints/): nothing to resume; pass --overwrite to start over"
                )
            # documented (README): a first run with --resume latest starts fresh, and says so
            if self.is_main:
                print(
                    f"diffalign: --resume latest: no checkpoint under {self.output_dir}; "
                    "starting a new run",
                    flush=True,
                )
            return None
        path = Path(r)
        if not path.is_dir():
            raise DiffalignError(f"resume checkpoint not found: {path}")
        if not (path / "state.json").is_file():
            raise DiffalignError(f"{path} is not a diffalign checkpoint folder (no state.json)")
        return path

    def _identity(self) -> dict:
        """The run's identity (`engine.identity`): the loop options that change the weights
        (max_steps only under a schedule that depends on it) and the task's; computed once (a
        task's identity may hash model files)."""
        if getattr(self, "_identity_cache", None) is not None:
            return self._identity_cache
        cfg = self.config
        loop = {k: getattr(cfg, k) for k in LOOP_IDENTITY}
        loop["warmup_steps"] = self.warmup_steps
        if cfg.lr_scheduler != "constant":
            loop["max_steps"] = self.max_steps
        self._identity_cache = {"loop": loop, "task": self.task.identity()}
        return self._identity_cache

    def _module_shapes(self) -> dict[str, dict[str, list[int]]]:
        return {name: trainable_state_shapes(m) for name, m in self.modules.items()}

    def _load_checkpoint(self, path: Path) -> None:
        state = read_json(path / "state.json")
        where = f"cannot resume from {path}"
        self.task.check_resume(state.get("task"), path)
        saved = state.get("modules", {})
        here = self._module_shapes()
        if sorted(saved) != sorted(here):
            raise DiffalignError(
                f"{where}: it holds trainable modules {sorted(saved)}, this task has {sorted(here)}"
            )
        for name in here:
            a, b = saved[name], here[name]
            if set(a) != set(b):
                diff = sorted(set(a) ^ set(b))
                raise DiffalignError(
                    f"{where}: module '{name}' parameters differ (e.g. '{diff[0]}')"
                )
            for k in b:
                if list(a[k]) != list(b[k]):
                    raise DiffalignError(
                        f"{where}: '{name}.{k}' has shape {a[k]} there, {b[k]} here"
                    )
        if sorted(state.get("optimizers", [])) != sorted(self.optimizers):
            raise DiffalignError(
                f"{where}: it holds optimizers {sorted(state.get('optimizers', []))}, "
                f"this task has {sorted(self.optimizers)}"
            )
        check_identity(
            state.get("identity"),
            self._identity(),
            f"cannot resume from {path}: it holds a run",
            hint="resume with the settings it was made with, or start over (no --resume, "
            "--overwrite) or in another --output-dir",
        )
        if (self.ema is None) != (not (path / "ema.safetensors").is_file()):
            logger.warning(
                "EMA setting differs from %s; EMA restarts from the current weights", path
            )

        for name, m in self.modules.items():
            tensors, _ = load_tensors(path / f"{name}.safetensors")
            load_trainable_state(m, tensors, where=f"{path / (name + '.safetensors')}")
        if self.ema is not None and (path / "ema.safetensors").is_file():
            tensors, _ = load_tensors(path / "ema.safetensors")
            self.ema.load_state_dict(tensors)
        try:
            for name, opt in self.optimizers.items():
                opt.load_state_dict(load_pt(path / f"optimizer-{name}.pt"))
                self.schedulers[name].load_state_dict(load_pt(path / f"scheduler-{name}.pt"))
        except (ValueError, KeyError) as e:
            raise DiffalignError(f"{where}: optimizer state does not fit ({e})") from None
        scaler = self.accelerator.scaler
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(load_pt(path / "scaler.pt"))

        rng = load_pt(path / "rng.pt")["ranks"]
        if len(rng) != self.world:
            logger.warning(
                "%s was written by %d processes, this run has %d: the data order differs",
                path,
                len(rng),
                self.world,
            )
        mine = rng[self.rank % len(rng)]
        _set_rng_state(mine["rng"])
        self._log_sums = {k: v.to(self.device) for k, v in mine["log_sums"].items()}
        self._log_counts = {k: v.to(self.device) for k, v in mine["log_counts"].items()}
        self._log_steps = int(mine["log_steps"])

        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.history = list(state.get("history", []))
        self.best = state.get("best")
        self.last_val_step = int(state.get("last_val_step", -1))
        self.last_ckpt_step = self.step
        self.seconds_before = float(state.get("seconds", 0.0))
        self.task.load_state_dict(state.get("task_state") or {})
        logger.info("resumed from %s at step %d", path, self.step)

    # -- checkpoints and exports ---------------------------------------------------------------

    def _state_json(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "batches_per_epoch": self.batches_per_epoch,
            "num_processes": self.world,
            "skipped_nonfinite": self.skipped_nonfinite,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "best": self.best,
            "last_val_step": self.last_val_step,
            "seconds": self._seconds(),
            "modules": self._module_shapes(),
            "optimizers": sorted(self.optimizers),
            "config": dataclasses.asdict(self.config),
            "task": self.task.config_dict(),
            "identity": self._identity(),
            "task_state": self.task.state_dict(),
            "history": self.history,
        }

    def _rank_payload(self) -> dict:
        return {
            "rng": _rng_state(),
            "log_sums": {k: v.detach().cpu() for k, v in self._log_sums.items()},
            "log_counts": {k: v.detach().cpu() for k, v in self._log_counts.items()},
            "log_steps": self._log_steps,
        }

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/checkpoint-<step>/` atomically and prune old ones."""
        payloads = self._gather([self._rank_payload()])
        path = self.output_dir / "checkpoints" / f"checkpoint-{self.step}"
        if self.is_main:
            with atomic_dir(path) as tmp:
                for name, m in self.modules.items():
                    save_tensors(tmp / f"{name}.safetensors", trainable_state(m))
                if self.ema is not None:
                    save_tensors(tmp / "ema.safetensors", self.ema.state_dict())
                for name, opt in self.optimizers.items():
                    save_pt(opt.state_dict(), tmp / f"optimizer-{name}.pt")
                    save_pt(self.schedulers[name].state_dict(), tmp / f"scheduler-{name}.pt")
                if self.accelerator.scaler is not None:
                    save_pt(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
                save_pt({"ranks": payloads}, tmp / "rng.pt")
                write_json(tmp / "state.json", self._state_json())
            keep = self.config.keep_checkpoints
            if keep > 0:
                for old in list_checkpoints(self.output_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
            self._write_reports(finished=False)
        self.last_ckpt_step = self.step
        self.accelerator.wait_for_everyone()
        return path

    def export(self, name: str, info: dict | None = None) -> Path:
        """Export through task.export (EMA weights applied) to `<output_dir>/<name>/`, atomically."""
        path = self.output_dir / name
        if self.is_main:
            ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
            with ctx, atomic_dir(path) as tmp:
                self.task.export(tmp)
                write_json(
                    tmp / "export_info.json",
                    {
                        "step": self.step,
                        "epoch": self.epoch,
                        "ema": self.ema is not None,
                        **(info or {}),
                    },
                )
        self.accelerator.wait_for_everyone()
        return path

    # -- one optimizer step --------------------------------------------------------------------

    def backward(self, loss: torch.Tensor, name: str) -> None:
        if name not in self.optimizers:
            raise DiffalignError(
                f"ctx.backward: unknown optimizer '{name}' (the task has {sorted(self.optimizers)})"
            )
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise DiffalignError("ctx.backward needs a scalar loss tensor")
        if name in self._stepped:
            raise DiffalignError(f"ctx.backward called twice for optimizer '{name}' in one step")
        bad = ~torch.isfinite(loss.detach().float())
        self._nonfinite[name] = (
            bad if name not in self._nonfinite else (self._nonfinite[name] | bad)
        )
        # a non-finite loss still goes through backward, so every process runs the same
        # collectives; its gradients are dropped at the boundary
        self.accelerator.backward(loss / self._window)
        if self._boundary:
            self._optimizer_step(name)

    def _optimizer_step(self, name: str) -> None:
        opt, params = self.optimizers[name], self.opt_params[name]
        flag = self._nonfinite.get(name, torch.zeros((), dtype=torch.bool, device=self.device))
        if self.world > 1:
            bad = _all_reduce_grads(params, flag, self.device, self.world)
        else:
            bad = bool(flag)
        stepped = False
        if not bad:
            if self.accelerator.scaler is not None:
                self.accelerator.unscale_gradients(optimizer=opt)
            max_norm = self.config.max_grad_norm or float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            finite = bool(torch.isfinite(norm))
            if finite or self.accelerator.scaler is not None:
                # fp16: an overflow is the grad scaler's business (it skips and lowers the scale)
                opt.step()
                stepped = not getattr(opt, "step_was_skipped", False)
                if finite:
                    self._add_log(f"grad_norm/{name}", norm.detach().float())
            else:
                bad = True
        with warnings.catch_warnings():
            # a skipped step still advances the schedule (so it stays aligned with the step
            # counter); torch warns about that order when no step has happened yet
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.schedulers[name].step()
        opt.optimizer.zero_grad(set_to_none=True)
        self._stepped[name] = stepped
        if bad:
            self._bad_step = True

    # -- logging -------------------------------------------------------------------------------

    def _reset_log_window(self) -> None:
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_counts: dict[str, torch.Tensor] = {}
        self._log_steps = 0

    def _add_log(self, key: str, value: torch.Tensor) -> None:
        value = value.to(self.device)
        ok = torch.isfinite(value)
        v = torch.where(ok, value, torch.zeros_like(value))
        if key in self._log_sums:
            self._log_sums[key] = self._log_sums[key] + v
            self._log_counts[key] = self._log_counts[key] + ok.float()
        else:
            self._log_sums[key] = v
            self._log_counts[key] = ok.float()

    def _gather(self, obj: list) -> list:
        if self.world == 1:
            return obj
        from accelerate.utils import gather_object

        return gather_object(obj)

    def _flush_log(self) -> dict | None:
        """Average the window's values over steps and processes; append to history; track."""
        sums = {k: float(v) for k, v in self._log_sums.items()}
        counts = {k: float(v) for k, v in self._log_counts.items()}
        parts = self._gather([(sums, counts)])
        self._reset_log_window()
        total_s, total_c = _sum_parts(parts)
        entry: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        for k in sorted(total_s):
            if total_c[k] > 0:
                entry[self._log_name(k)] = total_s[k] / total_c[k]
        for name, sched in self.schedulers.items():
            entry["lr" if len(self.schedulers) == 1 else f"lr/{name}"] = sched.get_last_lr()[0]
        entry.update({k: float(v) for k, v in self.task.log_state().items()})
        self.history.append(entry)
        self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=self.step)
        return entry

    def _log_name(self, key: str) -> str:
        if key.startswith("grad_norm/") and len(self.optimizers) == 1:
            return "grad_norm"
        return key

    def _seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self._t0)

    def _write_reports(self, finished: bool) -> dict:
        """train_history.png and train_summary.json (main process)."""
        from diffalign.engine.reports import plot_curves, write_summary

        series: dict[str, tuple[list[float], list[float]]] = {}
        for entry in self.history:
            for k, v in entry.items():
                if k in ("step", "epoch") or k.startswith("lr") or k.startswith("grad_norm"):
                    continue
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    xs, ys = series.setdefault(k, ([], []))
                    xs.append(entry["step"])
                    ys.append(v)
        if series:
            plot_curves(
                self.output_dir / "train_history.png",
                series,
                title=f"{self.config.run_name}: training history",
                ylabel="value",
            )
        train_last = next((e for e in reversed(self.history) if "val" not in e), {})
        val_last = next((e for e in reversed(self.history) if "val" in e), {})
        summary = {
            "finished": finished,
            "steps": self.step,
            "max_steps": self.max_steps,
            "epochs_completed": self.epoch,
            "seconds": round(self._seconds(), 3),
            "num_processes": self.world,
            "mixed_precision": self.config.mixed_precision,
            "skipped_nonfinite": self.skipped_nonfinite,
            "final_train": train_last,
            "final_val": val_last,
            "best": self.best,
            "output_dir": str(self.output_dir),
            "config": dataclasses.asdict(self.config),
        }
        extra = self.task.summary()
        if extra:
            summary["task"] = extra
        # the seed's name, and the name every long diffalign command writes (spec: Interfaces)
        for name in ("train_summary.json", "summary.json"):
            write_summary(self.output_dir / name, summary)
        return summary

    # -- validation ----------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Mean of validation_step metrics over the sharded val loader, EMA weights in."""
        from diffalign.engine.progress import progress

        self.last_val_step = self.step
        rng = _rng_state()  # validation must not shift the training run's random numbers
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        extra: dict = {}
        for m in self.modules.values():
            m.eval()
        ema_ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        try:
            with ema_ctx, torch.no_grad():
                if self.val_dl is not None:
                    bar = progress(
                        self.val_dl,
                        desc="validate",
                        disable=None if self.config.progress else True,
                    )
                    for batch in bar:
                        with self.accelerator.autocast():
                            out = self.task.validation_step(batch)
                        for k, v in (out or {}).items():
                            t = _to_float_tensor(v)
                            if t is not None:
                                sums[k] = sums.get(k, 0.0) + float(t)
                                counts[k] = counts.get(k, 0.0) + 1.0
                if self.is_main:
                    out_dir = self.output_dir / "validation" / f"step-{self.step:07d}"
                    out_dir.mkdir(parents=True, exist_ok=True)
                    with self.accelerator.autocast():
                        extra = self.task.on_validation_end(self.step, out_dir) or {}
        finally:
            for m in self.modules.values():
                m.train()
            _set_rng_state(rng)
        parts = self._gather([(sums, counts)])
        total_s, total_c = _sum_parts(parts)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            extra = broadcast_object_list([extra], from_process=0)[0]
        metrics = {_val_key(k): total_s[k] / total_c[k] for k in sorted(total_s)}
        for k, v in extra.items():
            t = _to_float_tensor(v)
            if t is not None:
                metrics[_val_key(k)] = float(t)
        if not metrics:
            return metrics
        entry = {"step": self.step, "epoch": self.epoch, "val": True, **metrics}
        self.history.append(entry)
        self.accelerator.log(metrics, step=self.step)
        key = self.config.best_metric
        if key is not None and key in metrics and math.isfinite(metrics[key]):
            if self.best is None or metrics[key] < self.best["value"]:
                self.best = {"metric": key, "value": metrics[key], "step": self.step}
                self.export("checkpoint-best", {"metric": key, "value": metrics[key]})
        return metrics

    # -- main loop -----------------------------------------------------------------------------

    def _epoch_iterator(self) -> Iterator:
        """Batches of the current epoch from the seeded sampler, skipping consumed ones."""
        dl = self.train_dl
        dl.set_epoch(self.epoch)
        if self.batch_in_epoch:
            dl = self.accelerator.skip_first_batches(dl, self.batch_in_epoch)
            dl.set_epoch(self.epoch)
        # the DataLoader draws worker base seeds from its generator (or else from the global RNG,
        # which would shift every later random number after a resume): give it a fixed one
        base = getattr(dl, "base_dataloader", dl)
        dataset = getattr(base, "dataset", None)
        if hasattr(dataset, "set_epoch"):  # before iter(): workers copy the dataset then
            dataset.set_epoch(self.epoch)
        gen = torch.Generator()
        gen.manual_seed((self.config.seed * 1_000_003 + self.epoch * 7919 + self.rank) % (2**62))
        base.generator = gen
        return iter(dl)

    def run(self) -> TrainResult:
        """Train while holding the output folder's lock (`engine.io.output_lock`): a second run
        into the same folder is refused; the ranks of one `accelerate launch` share it."""
        with locked_output_dir(self.output_dir, "training run folder"):
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.config
        self._t0 = time.perf_counter()
        self._prepare_output_dir()
        self._setup()
        resume_from = self._resolve_resume()
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        self._start_step = self.step
        if self.is_main:
            write_json(
                self.output_dir / "run_config.json",
                {
                    "train": dataclasses.asdict(cfg),
                    "task": self.task.config_dict(),
                    "identity": self._identity(),
                    "task_class": f"{type(self.task).__module__}.{type(self.task).__qualname__}",
                    "num_processes": self.world,
                    "max_steps": self.max_steps,
                    "warmup_steps": self.warmup_steps,
                    "steps_per_epoch": self.steps_per_epoch,
                    "resumed_from": str(resume_from) if resume_from else None,
                },
            )
        if self.accelerator.log_with:
            self.accelerator.init_trackers(
                cfg.run_name,
                config=_json_config({**dataclasses.asdict(cfg), "task": self.task.config_dict()}),
            )
        try:
            self._loop()
            self._check_something_trained()
            if self.val_dl is not None or type(self.task).on_validation_end is not (
                TrainTask.on_validation_end
            ):
                if self.last_val_step != self.step:
                    self.validate()
            if self.last_ckpt_step != self.step:
                self.save_checkpoint()
            final_dir = self.export("checkpoint-final")
            summary = self._write_reports(finished=True) if self.is_main else {}
        finally:
            # not accelerator.end_training(): it destroys the process group, and a script may
            # call train() again (the EM loop, a resume after a crash)
            for tracker in self.accelerator.trackers:
                tracker.finish()
        best_dir = self.output_dir / "checkpoint-best"
        return TrainResult(
            history=self.history,
            output_dir=self.output_dir,
            final_dir=final_dir,
            best_dir=best_dir if best_dir.is_dir() else None,
            step=self.step,
            summary=summary,
        )

    def _loop(self) -> None:
        from diffalign.engine.progress import progress

        cfg, task = self.config, self.task
        accum = cfg.gradient_accumulation_steps
        ctx = StepContext(self)
        bar = progress(
            total=self.max_steps,
            initial=self.step,
            desc=cfg.run_name,
            disable=None if cfg.progress else True,
        )
        it: Iterator | None = None
        all_params = [p for m in self.modules.values() for p in m.parameters()]
        try:
            while self.step < self.max_steps:
                if it is None:
                    it = self._epoch_iterator()
                self._window = min(accum, self.batches_per_epoch - self.batch_in_epoch)
                self._nonfinite: dict[str, torch.Tensor] = {}
                self._stepped: dict[str, bool] = {}
                self._bad_step = False
                for p in all_params:  # also drops gradients that leaked across optimizers
                    p.grad = None
                ctx.step, ctx.epoch = self.step, self.epoch
                epoch_done = False
                consumed = 0
                for i in range(self._window):
                    try:
                        batch = next(it)
                    except StopIteration:  # loader shorter than its len(): end the epoch here
                        epoch_done = True
                        break
                    consumed += 1
                    self._boundary = ctx.sync_gradients = i == self._window - 1
                    ctx._backward_calls = 0
                    with self.accelerator.autocast():
                        out = task.training_step(batch, self.step, ctx)
                    if not isinstance(out, dict):
                        raise DiffalignError("training_step must return a dict of values to log")
                    if ctx._backward_calls == 0:
                        if len(self.optimizers) != 1:
                            raise DiffalignError(
                                "with several optimizers training_step must call "
                                "ctx.backward(loss, name) for each"
                            )
                        if "loss" not in out:
                            raise DiffalignError(
                                "training_step must return {'loss': tensor, ...} or call ctx.backward"
                            )
                        ctx.backward(out["loss"], next(iter(self.optimizers)))
                    for k, v in out.items():
                        t = _to_float_tensor(v)
                        if t is not None:
                            self._add_log(k, t)
                    self.batch_in_epoch += 1
                if epoch_done and consumed == 0:
                    if self.batch_in_epoch == 0:
                        raise DiffalignError("the training DataLoader yielded no batch")
                    it, self.epoch, self.batch_in_epoch = None, self.epoch + 1, 0
                    continue
                if epoch_done:
                    # the window ended early with pending gradients: finish it with what we have
                    for name in self.optimizers:
                        if name in self._nonfinite and name not in self._stepped:
                            self._optimizer_step(name)
                self._finish_step()
                if self.batch_in_epoch >= self.batches_per_epoch or epoch_done:
                    for _ in it:  # let the loader close its epoch cleanly
                        pass
                    it = None
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if cfg.export_every_epoch:
                        self.export(f"checkpoint-epoch-{self.epoch:03d}")
                bar.update(1)
                if cfg.log_every and self.step % cfg.log_every == 0:
                    entry = self._flush_log()
                    if entry and "loss" in entry:
                        bar.set_postfix(loss=f"{entry['loss']:.4g}")
                if cfg.validate_every and self.step % cfg.validate_every == 0:
                    self.validate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if self._log_steps:
                self._flush_log()
        finally:
            bar.close()

    def _finish_step(self) -> None:
        if any(self._stepped.values()) and self.ema is not None:
            self.ema.update(self.step)
        self.step += 1
        self._log_steps += 1
        if self._bad_step:
            self.skipped_nonfinite += 1
            self.consecutive_nonfinite += 1
            if self.consecutive_nonfinite >= self.config.max_nonfinite_steps:
                ckpts = list_checkpoints(self.output_dir)
                last = f"; last checkpoint: {ckpts[-1]}" if ckpts else ""
                raise DiffalignError(
                    f"loss is NaN/inf at step {self.step} ({self.consecutive_nonfinite} consecutive "
                    f"non-finite steps, {self.skipped_nonfinite} in all){last}"
                )
        else:
            self.consecutive_nonfinite = 0

    def _check_something_trained(self) -> None:
        """A run whose every step (since it started or resumed) had a NaN/inf loss trained
        nothing: an error, whatever `max_nonfinite_steps` allows along the way."""
        ran = self.step - self._start_step
        if ran > 0 and self.consecutive_nonfinite >= ran:
            ckpts = list_checkpoints(self.output_dir)
            last = f"; last checkpoint: {ckpts[-1]}" if ckpts else ""
            raise DiffalignError(
                f"loss is NaN/inf at every step of this run (steps {self._start_step + 1}-"
                f"{self.step}): nothing was trained, no checkpoint-final written{last}"
            )


def _val_key(k: str) -> str:
    return k if k.startswith("val/") else f"val/{k}"


def _all_reduce_grads(
    params: list[nn.Parameter], flag: torch.Tensor, device: torch.device, world: int
) -> bool:
    """Average gradients over processes (a missing gradient counts as zero; a parameter without
    a gradient anywhere keeps none); returns True when any process saw a non-finite loss."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    meta = torch.tensor(
        [float(p.grad is not None) for p in params] + [float(bool(flag))],
        dtype=torch.float32,
        device=device,
    )
    dist.all_reduce(meta)
    meta = meta.tolist()
    bad = meta[-1] > 0
    grads: dict[torch.dtype, list[torch.Tensor]] = {}
    for p, have in zip(params, meta[:-1]):
        if have > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.setdefault(p.grad.dtype, []).append(p.grad)
    bucket_elems = 1 << 25
    for tensors in grads.values():
        start = 0
        while start < len(tensors):
            chunk, n = [], 0
            while start < len(tensors) and (
                not chunk or n + tensors[start].numel() <= bucket_elems
            ):
                chunk.append(tensors[start])
                n += tensors[start].numel()
                start += 1
            flat = _flatten_dense_tensors(chunk)
            if flat.device.type == "cpu" and flat.dtype in (torch.float16, torch.bfloat16):
                flat = flat.float()
            dist.all_reduce(flat)
            flat.div_(world)
            for g, s in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
                g.copy_(s)
    return bad
