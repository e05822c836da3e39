"""Checkpoint IO of the shared training loop (`engine.train`, spec E).

Resumable checkpoints `<output_dir>/checkpoints/checkpoint-<step>/` are written atomically and
hold `<module>.safetensors` (trainable parameters and buffers), `ema.safetensors`,
`optimizer-<name>.pt` / `scheduler-<name>.pt` / `scaler.pt` (state dicts, read back with
`weights_only=True`), `rng.pt` (python/numpy/torch RNG of every process) and `state.json` (step,
epoch, position in the epoch, best metric, config, loss history). Exports (`checkpoint-final/`,
`checkpoint-best/`, `checkpoint-epoch-NNN/`) go through `task.export` with the EMA weights
applied. Here: what a checkpoint stores of a module (`trainable_state`, its loading and shapes),
the RNG state of a process, resume discovery (`list_checkpoints`) and `TrainerCheckpoints`, the
trainer's output-folder preparation, resume, checkpoint and export methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffalign.engine.config_values import check_resume_config
from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import check_identity
from diffalign.engine.io import (
    atomic_dir,
    clean_stale_temporaries,
    load_pt,
    load_tensors,
    read_json,
    save_pt,
    save_tensors,
    write_json,
)
from diffalign.engine.train_config import LOOP_IDENTITY

logger = logging.getLogger("diffalign.train")

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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


def _keep_adamw_kernel(optimizer: torch.optim.Optimizer, kernel: list[tuple]) -> None:
    """After loading a checkpoint: AdamW keeps this run's kernel (fused on CUDA, for-each on the
    CPU), not the one the checkpoint was written with, and its step counters where that kernel
    keeps them (fused: float32 on the parameter's device; otherwise a CPU scalar)."""
    for g, (fused, foreach) in zip(optimizer.param_groups, kernel):
        g["fused"], g["foreach"] = fused, foreach
        for p in g["params"]:
            st = optimizer.state.get(p)
            if st and isinstance(st.get("step"), torch.Tensor):
                where = p.device if fused else torch.device("cpu")
                st["step"] = st["step"].to(dtype=torch.float32, device=where)


def holds_a_run(output_dir: str | Path) -> bool:
    """True when `output_dir` holds a training run's checkpoints or its final export."""
    output_dir = Path(output_dir)
    return bool(list_checkpoints(output_dir)) or (output_dir / "checkpoint-final").is_dir()


def refuse_used_folder(output_dir: str | Path, resume: str | None, overwrite: bool) -> None:
    """A new run (no resume, no overwrite) into a folder that holds a run is one error line."""
    if resume is None and holds_a_run(output_dir) and not overwrite:
        raise DiffalignError(
            f"{output_dir} already holds a training run: pass --resume latest to "
            "continue it, --overwrite to start over, or another output folder"
        )


def find_resume_checkpoint(
    output_dir: str | Path, resume: str | None, overwrite: bool
) -> Path | None:
    """The checkpoint folder `resume` names ("latest": the newest under `output_dir`); None when
    there is nothing to resume (no resume, or "latest" in a folder without a run)."""
    output_dir = Path(output_dir)
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        if ckpts:
            return ckpts[-1]
        if (output_dir / "checkpoint-final").is_dir() and not overwrite:
            raise DiffalignError(
                f"{output_dir} holds a finished run without a resumable checkpoint "
                "(checkpoints/): nothing to resume; pass --overwrite to start over"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise DiffalignError(f"resume checkpoint not found: {path}")
    if not (path / "state.json").is_file():
        raise DiffalignError(f"{path} is not a diffalign checkpoint folder (no state.json)")
    return path


def loop_identity(config: Any, warmup_steps: int | None, max_steps: int | None) -> dict:
    """The loop's part of a run's identity: the `TrainConfig` options that change the weights,
    the resolved warmup, and max_steps under a schedule that depends on it."""
    loop = {k: getattr(config, k) for k in LOOP_IDENTITY}
    loop["warmup_steps"] = warmup_steps
    if config.lr_scheduler != "constant":
        loop["max_steps"] = max_steps
    return loop


RESUME_HINT = (
    "resume with the settings it was made with, or start over (no --resume, --overwrite) or in "
    "another --output-dir"
)


def check_run_identity(
    saved: dict | None,
    identity: dict,
    path: Path,
    free: Iterable[str] = (),
    hint: str = RESUME_HINT,
) -> None:
    """A checkpoint made with other settings (`engine.identity`) cannot be resumed; ``hint``:
    what the command's options offer instead."""
    check_identity(
        saved, identity, f"cannot resume from {path}: it holds a run", free=free, hint=hint
    )


def check_task_config(
    saved: dict | None,
    current: dict,
    path: Path,
    free: Iterable[str] | Callable[[dict, dict], Iterable[str]],
    unknown: Iterable[str] = (),
    missing: str | None = None,
) -> None:
    """A task's `check_resume`: the task configuration checkpoint `path` recorded (`saved`)
    against the current one; the first key outside `free` (the keys that may change on resume,
    or `free(saved, current)`) and `unknown` (keys not known yet, e.g. before the models load)
    whose value differs is one DiffalignError (`engine.config_values.check_resume_config`). A
    checkpoint that records none (None) resumes, or is refused with `missing` (why) when given."""
    if saved is None:
        if missing is not None:
            raise DiffalignError(f"cannot resume from {path}: {missing}")
        return
    keys = free(saved, current) if callable(free) else free
    check_resume_config(saved, current, set(keys) | set(unknown), path)


def check_before_setup(
    config: Any,
    task_identity: Callable[[], dict],
    unknown: Iterable[str] = (),
    check_task: Callable[[dict | None, Path], None] | None = None,
    hint: str = RESUME_HINT,
) -> None:
    """The output-folder and resume refusals of `engine.train` for a `TrainConfig`, made before a
    task loads any model or fills a cache: a used folder without resume or overwrite, a missing
    or finished resume checkpoint, and, on the checkpoint a resume would load, the task's
    `check_task(saved task config, path)` and the run identity with `task_identity()` (called
    only then: it may hash model files). `unknown`: the task identity's keys known only once
    its models are loaded, left out here (the trainer compares everything again on resume).
    ``hint``: the refusal's advice, for a command whose options differ (the EM loops)."""
    refuse_used_folder(config.output_dir, config.resume, config.overwrite)
    path = find_resume_checkpoint(config.output_dir, config.resume, config.overwrite)
    if path is None:
        return
    state = read_json(path / "state.json")
    if not isinstance(state, dict):  # damaged: the trainer's own message, when it resumes
        return
    if check_task is not None:
        check_task(state.get("task"), path)
    identity = {"loop": loop_identity(config, None, None), "task": task_identity()}
    free = ["loop.warmup_steps", "loop.max_steps", *(f"task.{k}" for k in unknown)]
    check_run_identity(state.get("identity"), identity, path, free, hint)


class TrainerCheckpoints:
    """The `engine.train` trainer's output folder, resume, checkpoints and exports (a mixin of
    the trainer: it uses the trainer's config, task, modules, optimizers and counters)."""

    # -- output folder and resume --------------------------------------------------------------

    def _prepare_output_dir(self) -> None:
        cfg = self.config
        if self.is_main:  # a kill during a checkpoint or an export leaves `.<name>.*.tmp`
            for folder in (self.output_dir, self.output_dir / "checkpoints"):
                for p in clean_stale_temporaries(folder):
                    logger.info("removed the stale temporary %s of an interrupted run", p)
        refuse_used_folder(self.output_dir, cfg.resume, cfg.overwrite)
        self.accelerator.wait_for_everyone()

    def _clear_previous_run(self) -> None:
        """overwrite=True: remove the previous run's outputs, only once the models and data are
        set up (a run refused while setting up loses nothing)."""
        cfg = self.config
        if cfg.resume is None and cfg.overwrite and self.is_main and holds_a_run(self.output_dir):
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

    def _resolve_resume(self) -> Path | None:
        path = find_resume_checkpoint(self.output_dir, self.config.resume, self.config.overwrite)
        # documented (README): a first run with --resume latest starts fresh, and says so
        if path is None and self.config.resume == "latest" and self.is_main:
            print(
                f"diffalign: --resume latest: no checkpoint under {self.output_dir}; "
                "starting a new run",
                flush=True,
            )
        return path

    def _identity(self) -> dict:
        """The run's identity (`engine.identity`): the loop options that change the weights
        (max_steps only under a schedule that depends on it) and the task's; computed once (a
        task's identity may hash model files)."""
        if getattr(self, "_identity_cache", None) is not None:
            return self._identity_cache
        loop = loop_identity(self.config, self.warmup_steps, self.max_steps)
        self._identity_cache = {"loop": loop, "task": self.task.identity()}
        return self._identity_cache

    def _module_shapes(self) -> dict[str, dict[str, list[int]]]:
        return {name: trainable_state_shapes(m) for name, m in self.modules.items()}

    def _load_checkpoint(self, path: Path) -> None:
        state = read_json(path / "state.json")
        where = f"cannot resume from {path}"
        if not isinstance(state, dict):
            raise DiffalignError(f"{where}: its state.json is not a JSON object (damaged?)")
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
        check_run_identity(state.get("identity"), self._identity(), path)
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
                kernel = [(g.get("fused"), g.get("foreach")) for g in opt.optimizer.param_groups]
                opt.load_state_dict(load_pt(path / f"optimizer-{name}.pt"))
                _keep_adamw_kernel(opt.optimizer, kernel)
                self.schedulers[name].load_state_dict(load_pt(path / f"scheduler-{name}.pt"))
        except (ValueError, KeyError, TypeError) as e:
            raise DiffalignError(f"{where}: optimizer state does not fit ({e})") from None
        scaler = self.accelerator.scaler
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(load_pt(path / "scaler.pt"))

        try:
            self._load_rng(load_pt(path / "rng.pt"), path)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise DiffalignError(
                f"{where}: its rng.pt is damaged ({type(e).__name__}: {e})"
            ) from None
        try:
            self._read_state_fields(state)
        except (KeyError, TypeError, ValueError) as e:
            raise DiffalignError(
                f"{where}: its state.json is damaged ({type(e).__name__}: {e})"
            ) from None
        self.task.load_state_dict(state.get("task_state") or {})
        logger.info("resumed from %s at step %d", path, self.step)

    def _load_rng(self, saved: Any, path: Path) -> None:
        rng = saved["ranks"]
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

    def _read_state_fields(self, state: dict) -> None:
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
