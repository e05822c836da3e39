"""Logging and reports of the shared training loop (`engine.train`, spec E): the log window
(values averaged over the steps and processes of a window, appended to the history and sent to
the TensorBoard / W&B trackers), `train_history.png`, `train_summary.json` (also as
`summary.json`), and the small helpers they use. `TrainerReports` is a mixin of the trainer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch


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


def _val_key(k: str) -> str:
    return k if k.startswith("val/") else f"val/{k}"


class TrainerReports:
    """The `engine.train` trainer's log window, history, reports and run clock (a mixin of the
    trainer: it uses the trainer's config, task, optimizers, schedulers and counters)."""

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
