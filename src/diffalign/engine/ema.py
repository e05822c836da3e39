"""Exponential moving average of trainable parameters (spec E: Training loop; seed 003: EMA 0.9995).

`shadow <- d * shadow + (1 - d) * param` after every optimizer step, with shadow copies kept in
fp32 whatever the parameter dtype. The decay `d` is constant by default (the U-REPA seed's
0.9995). With `warmup=True` it follows diffusers' `EMAModel` ramp `min(decay, (1 + s) / (10 + s))`
where `s` is the 0-based index of the optimizer step just taken, so early, still-random weights
are forgotten quickly. Only parameters with `requires_grad=True` are averaged; buffers are not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError


def ema_decay_at(step: int, decay: float, warmup: bool = False) -> float:
    """Decay used for the update after optimizer step `step` (0-based)."""
    if not warmup:
        return float(decay)
    return float(min(decay, (1.0 + step) / (10.0 + step)))


def ema_update_(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place: `shadow = decay * shadow + (1 - decay) * param` (shadow fp32)."""
    with torch.no_grad():
        for s, p in zip(shadow, params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - decay)


class EMA:
    """fp32 shadow copies of the trainable parameters of named modules.

    `update(step)` after each optimizer step; `applied()` is a context manager that swaps the
    averaged weights into the modules and restores the live ones on exit (also on error).
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise DiffalignError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._params: dict[str, nn.Parameter] = {}
        for mod_name, module in modules.items():
            for name, p in module.named_parameters():
                if p.requires_grad:
                    self._params[f"{mod_name}.{name}"] = p
        self.shadow: dict[str, torch.Tensor] = {
            k: p.detach().to(torch.float32).clone() for k, p in self._params.items()
        }
        self._backup: dict[str, torch.Tensor] | None = None

    def decay_at(self, step: int) -> float:
        """Decay for the update after optimizer step `step` (0-based)."""
        return ema_decay_at(step, self.decay, self.warmup)

    def update(self, step: int) -> float:
        """Fold the current parameters into the shadow; returns the decay used."""
        if self._backup is not None:
            raise RuntimeError("EMA.update called while EMA weights are swapped in")
        d = self.decay_at(step)
        keys = list(self._params)
        ema_update_([self.shadow[k] for k in keys], [self._params[k] for k in keys], d)
        self.num_updates += 1
        return d

    def swap_in(self) -> None:
        """Copy the averaged weights into the modules (the live weights are kept aside)."""
        if self._backup is not None:
            return
        with torch.no_grad():
            self._backup = {k: p.detach().clone() for k, p in self._params.items()}
            for k, p in self._params.items():
                p.copy_(self.shadow[k].to(p.dtype))

    def swap_out(self) -> None:
        """Restore the live weights saved by `swap_in`."""
        if self._backup is None:
            return
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(self._backup[k])
        self._backup = None

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """`with ema.applied(): ...` runs the block with the averaged weights in the modules."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow tensors keyed `<module>.<param>` plus `__num_updates__` (safetensors-ready)."""
        out = {k: v.detach().cpu().clone() for k, v in self.shadow.items()}
        out["__num_updates__"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load shadows saved by `state_dict`; names and shapes must match exactly."""
        state = dict(state)
        num = state.pop("__num_updates__", None)
        missing = sorted(set(self.shadow) - set(state))
        extra = sorted(set(state) - set(self.shadow))
        if missing or extra:
            what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
            raise DiffalignError(f"EMA state does not match the trainable parameters ({what})")
        for k, v in state.items():
            if tuple(v.shape) != tuple(self.shadow[k].shape):
                raise DiffalignError(
                    f"EMA state for '{k}' has shape {list(v.shape)}, "
                    f"expected {list(self.shadow[k].shape)}"
                )
            self.shadow[k].copy_(v.to(torch.float32))
        if num is not None:
            self.num_updates = int(num)
