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
`summary.json`) and `run_config.json`. Resumable checkpoints
`<output_dir>/checkpoints/checkpoint-<step>/` are written atomically (their files:
`engine.checkpoints`). Resuming replays the seeded sampler of the current epoch and skips the
batches already consumed, so k steps + resume to N gives the same weights as N steps straight
(bit-identical on CPU, given a dataset whose items do not draw from the global RNG; on CUDA it
needs `deterministic=True`: deterministic kernels for the run). Exports (`checkpoint-final/`,
`checkpoint-best/`, `checkpoint-epoch-NNN/`) go through `task.export` with the EMA weights applied. A non-finite loss
skips the optimizer step; `max_nonfinite_steps` consecutive ones stop the run with a
`DiffalignError`, and so does a run that ends without one finite step since it started or
resumed (nothing was trained: no checkpoint-final is written). Several optimizers (a GAN):
`training_step` calls `ctx.backward(loss, name)` for each; all gradients are cleared at the start
of every accumulation window. Data parallel only (no DeepSpeed/FSDP). On a CPU-only machine two
processes need `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 script.py`
(`--cpu` alone starts a single process). Speed (issue 18): `compile=True` compiles every
trainable module in place (`engine.compile.compile_module`: regional for diffusers models with
repeated blocks, same state-dict keys, so checkpoints and exact resume are unchanged; dropout
inside the graphs draws the eager run's masks), `channels_last=True` puts the weights of modules
with convolutions in NHWC layout, and AdamW runs its fused kernel when every parameter is on CUDA
(not under fp16; a resume keeps this run's kernel).

Modules: the options in `engine.train_config`, checkpoint IO and resume in `engine.checkpoints`,
logging and reports in `engine.train_reports`; every public name is importable from here.

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
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from diffalign.engine.checkpoints import (
    TrainerCheckpoints,
    _rng_state,
    _set_rng_state,
    list_checkpoints,
    load_trainable_state,
    trainable_state,
    trainable_state_shapes,
)
from diffalign.engine.compile import speed_up_modules, uses_fused_adamw
from diffalign.engine.ema import EMA
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import output_lock, save_tensors, write_json
from diffalign.engine.train_config import (
    CUBLAS_WORKSPACE_CONFIG,
    LOOP_IDENTITY,
    MIXED_PRECISION,
    SCHEDULES,
    TRACKERS,
    OptimizerSpec,
    TrainConfig,
    check_adam_settings,
    deterministic_algorithms,
    lr_multiplier,
    set_cublas_workspace_config,
)
from diffalign.engine.train_reports import (
    TrainerReports,
    _json_config,
    _sum_parts,
    _to_float_tensor,
    _val_key,
)

__all__ = [
    "CUBLAS_WORKSPACE_CONFIG",
    "LOOP_IDENTITY",
    "MIXED_PRECISION",
    "SCHEDULES",
    "TRACKERS",
    "OptimizerSpec",
    "StepContext",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "check_adam_settings",
    "deterministic_algorithms",
    "list_checkpoints",
    "load_trainable_state",
    "lr_multiplier",
    "set_cublas_workspace_config",
    "train",
    "trainable_state",
    "trainable_state_shapes",
]

logger = logging.getLogger("diffalign.train")


# ----------------------------------------------------------------------------------------------
# the task interface


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
# the loop


def train(task: TrainTask, config: TrainConfig) -> TrainResult:
    """Run (or resume) training of `task` under `config`; see the module docstring."""
    config.validate()
    with deterministic_algorithms(config.deterministic):
        return _Trainer(task, config).run()


class _Trainer(TrainerCheckpoints, TrainerReports):
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

        from diffalign.engine.distributed import notice_single_process

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
            accelerator = Accelerator(
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
        notice_single_process(accelerator.num_processes)
        return accelerator

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
        self._speed_up_modules()

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
                groups,
                lr=spec.lr,
                weight_decay=spec.weight_decay,
                betas=spec.betas,
                eps=spec.eps,
                **self._adamw_kernel(params),
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
        # every validation sample once, in the 1-process batches: accelerate's even batches
        # would repeat the first samples on the processes with fewer batches, and weigh them
        # twice in the validation mean (the loop has no collective: uneven counts are safe)
        shard = getattr(self.val_dl, "batch_sampler", None)
        if hasattr(shard, "even_batches"):
            shard.even_batches = False

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

    def _speed_up_modules(self) -> None:
        """channels_last and compilation of the trainable modules (in place: the same module
        objects, parameters and state-dict keys, so checkpoints are unchanged)."""
        cfg = self.config
        compiled = speed_up_modules(
            self.modules, self.device, compile=cfg.compile, channels_last=cfg.channels_last
        )
        for name, how in compiled.items():
            logger.info("compiled trainable module '%s' (%s)", name, how)

    def _adamw_kernel(self, params: list[nn.Parameter]) -> dict:
        """AdamW's fused kernel when every parameter is on CUDA, else torch's default. Not under
        fp16: the grad scaler skips an overflowing step inside a fused kernel, where accelerate
        cannot see that it skipped (and the EMA would update)."""
        fused = uses_fused_adamw(params) and self.config.mixed_precision != "fp16"
        return {"fused": True} if fused else {}

    def _broadcast_trainable(self) -> None:
        """Start every process from rank 0's weights (as DDP does)."""
        import torch.distributed as dist

        for m in self.modules.values():
            tensors = [p for p in m.parameters() if p.requires_grad] + list(m.buffers())
            for t in tensors:
                dist.broadcast(t.data, src=0)

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
        with output_lock(self.output_dir, "training run folder"):
            return self._run()

    def _run(self) -> TrainResult:
        cfg = self.config
        self._t0 = time.perf_counter()
        self._prepare_output_dir()
        self._setup()
        self._clear_previous_run()  # after the setup: a run refused there loses nothing
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
