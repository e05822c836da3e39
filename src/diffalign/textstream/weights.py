"""Learned residual weights (spec T: hand-set or learned weights; the method authors' later
`train_residual_weights.py`, see DIFFUSERS-FACTS "Text stream beyond SD3").

The math as small pure functions (no I/O): one non-negative weight per target layer,
`w = softplus(raw)`; the rectified-flow objective of the frozen transformer on cached pairs,

    s ~ p_time (then shifted),   x_s = (1 - s) x0 + s eps,   loss = || v(x_s, 1000 s) - (eps - x0) ||^2

and an optional smoothness penalty `mean_k (w_{k+1} - w_k)^2` between neighbouring targets.

Time sampling (`time_mode`), `u` in [0, 1] before the shift, with the authors' parameters by
default (`TIME_DEFAULTS`: their `sample_timesteps`, whose modes draw `t / 1000`):
- uniform: `u ~ U(0, 1)`;
- gaussian: `u ~ N(mean, std)` clamped to [0, 1] (default 0.6, 0.1);
- beta: `u ~ Beta(alpha, beta)` (default 5, 2);
- logitnorm: `u = sigmoid(z)`, `z ~ N(mean, std)` (default 0, 1; the authors' `--time_shift` is
  this `mean`).
The shift is SD3's static one, `s = shift u / (1 + (shift - 1) u)` (the FlowMatchEuler
scheduler's sigmas at inference); shift 1 (the authors' training: no shift) leaves `u` unchanged.
The authors draw an integer `t` in 0..999 and use `s = t / 1000`; `u` here is continuous.

The weights file `residual_weights.safetensors` (written by `train-weights`, read by every
generation verb's `--residual-weights-file`): tensors `weights` float32 `[n]` and
`target_layers` int64 `[n]`; metadata `origin_layer`, `target_layers` (JSON), `mode`,
`layernorm`, `rotation_sha256` (of the rotation file used, "" without one), `format`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import file_sha256

TIME_MODES = ("uniform", "gaussian", "beta", "logitnorm")
# each mode's parameters unless given (the authors' `sample_timesteps` defaults)
TIME_DEFAULTS = {
    "uniform": {},
    "gaussian": {"mean": 0.6, "std": 0.1},
    "beta": {"alpha": 5.0, "beta": 2.0},
    "logitnorm": {"mean": 0.0, "std": 1.0},
}
WEIGHTS_FORMAT = "diffalign-textstream-residual-weights-v1"
WEIGHTS_FILE = "residual_weights.safetensors"


# ---------------------------------------------------------------------------------------------
# the parametrisation


def softplus_inverse(w: torch.Tensor) -> torch.Tensor:
    """`raw` with `softplus(raw) == w` for `w > 0` (`log(expm1(w))`, stable for large w)."""
    w = w.to(torch.float64)
    if not bool((w > 0).all()):
        raise DiffalignError("learned residual weights start from values > 0 (softplus)")
    return torch.where(w > 20, w, torch.log(torch.expm1(w))).to(torch.float32)


class ResidualWeights(torch.nn.Module):
    """One non-negative weight per target layer, `softplus(raw)`; `forward()` returns them."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.raw = torch.nn.Parameter(softplus_inverse(init.detach().flatten()))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.raw)


def smoothness_penalty(weights: torch.Tensor) -> torch.Tensor:
    """`mean_k (w_{k+1} - w_k)^2` over neighbouring targets (0 for one target)."""
    if weights.numel() < 2:
        return weights.sum() * 0.0
    return (weights[1:] - weights[:-1]).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# the objective


@dataclass(frozen=True)
class TimeSampling:
    """How the flow time `s` of each sample is drawn (see the module docstring)."""

    mode: str = "logitnorm"
    mean: float = 0.0  # gaussian: mean of u; logitnorm: mean of z
    std: float = 1.0  # gaussian / logitnorm
    alpha: float = 5.0  # beta
    beta: float = 2.0  # beta
    shift: float = 1.0

    @classmethod
    def of(cls, mode: str, shift: float = 1.0, **given: float | None) -> TimeSampling:
        """`mode` with the given parameters, the others `TIME_DEFAULTS[mode]` (then the fields')."""
        if mode not in TIME_MODES:
            raise DiffalignError(
                f"--time-mode must be one of {', '.join(TIME_MODES)} (got '{mode}')"
            )
        params = {**TIME_DEFAULTS[mode], **{k: v for k, v in given.items() if v is not None}}
        return cls(mode=mode, shift=shift, **params)

    def validate(self) -> None:
        if self.mode not in TIME_MODES:
            raise DiffalignError(
                f"--time-mode must be one of {', '.join(TIME_MODES)} (got '{self.mode}')"
            )
        for name in ("mean", "std", "alpha", "beta", "shift"):
            value = getattr(self, name)
            if not math.isfinite(float(value)):
                raise DiffalignError(f"--time-{name} must be a finite number (got {value})")
        for name in ("std", "alpha", "beta", "shift"):
            if getattr(self, name) <= 0:
                raise DiffalignError(f"--time-{name} must be > 0 (got {getattr(self, name)})")


def sample_unit_times(
    n: int, ts: TimeSampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`u` in [0, 1], float32 `[n]` on the CPU, drawn by `ts.mode` (before the shift)."""
    if ts.mode == "uniform":
        return torch.rand(n, generator=generator)
    if ts.mode == "gaussian":
        return (ts.mean + ts.std * torch.randn(n, generator=generator)).clamp(0.0, 1.0)
    if ts.mode == "logitnorm":
        return torch.sigmoid(ts.mean + ts.std * torch.randn(n, generator=generator))
    if ts.mode == "beta":
        # Beta(a, b) = X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b): torch's Beta takes no generator
        x = torch._standard_gamma(torch.full((n,), float(ts.alpha)), generator=generator)
        y = torch._standard_gamma(torch.full((n,), float(ts.beta)), generator=generator)
        return x / (x + y)
    raise DiffalignError(f"unknown time mode '{ts.mode}'")


def shift_times(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static time shift `shift u / (1 + (shift - 1) u)` (identity for shift 1)."""
    if shift == 1.0:
        return u
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_times(
    n: int, ts: TimeSampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shifted flow times `s` in [0, 1] of `n` samples."""
    return shift_times(sample_unit_times(n, ts, generator), ts.shift)


def noisy_latents(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`x_s = (1 - s) x0 + s eps`, one `s` per sample."""
    s = s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * eps


def velocity_loss(pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted velocity and the target `eps - x0` (float32)."""
    return (pred.float() - (eps.float() - x0.float())).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# the weights file


@dataclass
class LearnedWeights:
    """What `residual_weights.safetensors` holds. Read from the authors' own output (JSON or
    `.pth` with `residual_weights`, `origin_layer`, `target_layers`), `mode`, `layernorm` and
    `rotation_sha256` are None: not recorded there, so not checked."""

    weights: list[float]
    origin_layer: int
    target_layers: list[int]
    mode: str | None
    layernorm: bool | None = False
    rotation_sha256: str | None = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def save_learned_weights(path: str | os.PathLike, lw: LearnedWeights) -> None:
    """Write `lw` as safetensors (atomic)."""
    from diffalign.engine.io import dumps_json, save_tensors

    if len(lw.weights) != len(lw.target_layers):
        raise DiffalignError("save_learned_weights: one weight per target layer")
    meta = {k: (v if isinstance(v, str) else dumps_json(v)) for k, v in lw.metadata.items()}
    meta.update(
        origin_layer=str(int(lw.origin_layer)),
        target_layers=json.dumps([int(t) for t in lw.target_layers]),
        mode=lw.mode,
        layernorm=json.dumps(bool(lw.layernorm)),
        rotation_sha256=lw.rotation_sha256,
        format=WEIGHTS_FORMAT,
    )
    save_tensors(
        path,
        {
            "weights": torch.tensor(lw.weights, dtype=torch.float32),
            "target_layers": torch.tensor(lw.target_layers, dtype=torch.int64),
        },
        metadata=meta,
    )


def load_learned_weights(path: str | os.PathLike) -> LearnedWeights:
    """Read a weights file; anything malformed is one DiffalignError line."""
    from diffalign.engine.io import load_tensors

    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"residual weights file not found: {path}")
    if path.suffix.lower() == ".json":
        from diffalign.engine.io import read_json

        return _authors_weights(path, read_json(path))
    try:
        tensors, meta = load_tensors(path)
    except DiffalignError:
        raise
    except Exception as e:  # not a safetensors file
        raise DiffalignError(f"{path}: not a residual weights file ({type(e).__name__})") from None
    if "residual_weights" in tensors and "format" not in meta:  # the authors' .pth
        try:
            raw = {k: json.loads(v) for k, v in meta.items()}
        except ValueError:
            raw = {}
        return _authors_weights(path, {**raw, "residual_weights": tensors["residual_weights"]})
    if meta.get("format") != WEIGHTS_FORMAT or "weights" not in tensors:
        raise DiffalignError(
            f"{path}: not a residual weights file (written by `diffalign textstream train-weights`)"
        )
    try:
        targets = [int(t) for t in json.loads(meta["target_layers"])]
        origin = int(meta["origin_layer"])
        layernorm = bool(json.loads(meta.get("layernorm", "false")))
    except (KeyError, ValueError, TypeError):
        raise DiffalignError(f"{path}: unreadable residual weights metadata") from None
    weights = tensors["weights"].flatten().tolist()
    if len(weights) != len(targets) or not all(math.isfinite(w) for w in weights):
        raise DiffalignError(f"{path}: needs one finite weight per target layer")
    known = {"origin_layer", "target_layers", "mode", "layernorm", "rotation_sha256", "format"}
    return LearnedWeights(
        weights=weights,
        origin_layer=origin,
        target_layers=targets,
        mode=meta.get("mode", "plain"),
        layernorm=layernorm,
        rotation_sha256=meta.get("rotation_sha256", ""),
        metadata={k: v for k, v in meta.items() if k not in known},
    )


def _authors_weights(path: Path, data: Any) -> LearnedWeights:
    """`{"residual_weights": [...], "origin_layer": k, "target_layers": [...]}` (the authors'
    `residual_weights_step*.json` / `.pth`; their FLUX.1 trainer names the last two
    `residual_origin_layer` / `residual_target_layers`)."""
    try:
        weights = data["residual_weights"]
        weights = weights.flatten().tolist() if isinstance(weights, torch.Tensor) else weights
        weights = [float(w) for w in weights]
        targets = data.get("target_layers", data.get("residual_target_layers"))
        origin = data.get("origin_layer", data.get("residual_origin_layer"))
        targets = [int(t) for t in targets]
        origin = int(origin)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise DiffalignError(
            f"{path}: not a residual weights file (needs residual_weights, origin_layer, "
            "target_layers)"
        ) from None
    if len(weights) != len(targets) or not all(math.isfinite(w) for w in weights):
        raise DiffalignError(f"{path}: needs one finite weight per target layer")
    return LearnedWeights(weights, origin, targets, None, None, None, {"source": "authors"})


def resolve_weights_file(
    path: str | os.PathLike,
    *,
    origin_layer: int | None,
    target_layers: list[int] | None,
    weights: list[float] | None,
    mode: str | None,
    procrustes_path: str | None,
    layernorm: bool,
    family: str | None = None,
) -> dict[str, Any]:
    """The residual options a weights file implies, checked against those also given.

    Returns `{origin_layer, target_layers, weights, mode, layernorm}`. A given origin, target
    list or mode that differs from the file's, other `--residual-weights`, a rotation file
    whose sha256 is not the one the weights were trained with, or a model `family` other than
    the one the file records (files from `train-weights`), is one DiffalignError line.
    """
    lw = load_learned_weights(path)
    where = f"--residual-weights-file {path}"
    trained_on = lw.metadata.get("family")
    if family is not None and trained_on and trained_on != family:
        raise DiffalignError(
            f"{where} was trained on a {trained_on} model (its cache's), this is a {family} model"
        )
    if weights is not None and [float(w) for w in weights] != lw.weights:
        raise DiffalignError(f"{where} sets the weights; drop --residual-weights")
    if origin_layer is not None and origin_layer != lw.origin_layer:
        raise DiffalignError(
            f"{where} was trained with origin layer {lw.origin_layer}, not "
            f"--residual-origin-layer {origin_layer}"
        )
    if target_layers is not None and list(target_layers) != lw.target_layers:
        raise DiffalignError(
            f"{where} was trained for target layers {lw.target_layers}, not "
            f"--residual-target-layers {list(target_layers)}"
        )
    if lw.mode is not None and mode is not None and mode != lw.mode:
        raise DiffalignError(f"{where} was trained in mode '{lw.mode}', not --residual-mode {mode}")
    if lw.layernorm is not None and layernorm and not lw.layernorm:
        raise DiffalignError(f"{where} was trained without --residual-layernorm")
    # rotation_sha256 None: not recorded (the authors' files), the rotation is the user's choice
    if lw.rotation_sha256 and procrustes_path is None:
        raise DiffalignError(
            f"{where} was trained with a rotation file (sha256 {lw.rotation_sha256[:12]}...): "
            "give it with --residual-procrustes-path"
        )
    if procrustes_path is not None and lw.rotation_sha256 is not None:
        digest = file_sha256(procrustes_path) if Path(procrustes_path).is_file() else None
        if digest != lw.rotation_sha256:
            trained = lw.rotation_sha256[:12] + "..." if lw.rotation_sha256 else "none"
            raise DiffalignError(
                f"{where} was trained with another rotation file (sha256 {trained}) than "
                f"--residual-procrustes-path {procrustes_path}"
            )
    return {
        "origin_layer": lw.origin_layer,
        "target_layers": lw.target_layers,
        "weights": lw.weights,
        "mode": lw.mode if lw.mode is not None else mode,
        "layernorm": lw.layernorm if lw.layernorm is not None else layernorm,
    }


def apply_weights_file(rc: Any, family: str | None = None) -> Any:
    """A residual config (`generate.ResidualConfig`) with origin, targets, weights, mode and
    layernorm taken from its `weights_file` (unchanged without one); options that disagree
    with the file, or a model `family` it was not trained on, are one DiffalignError line
    (`resolve_weights_file`)."""
    if getattr(rc, "weights_file", None) is None:
        return rc
    from dataclasses import replace

    resolved = resolve_weights_file(
        rc.weights_file,
        origin_layer=rc.origin_layer,
        target_layers=rc.target_layers,
        weights=rc.weights,
        mode=rc.mode,
        procrustes_path=rc.procrustes_path,
        layernorm=rc.layernorm,
        family=family,
    )
    return replace(rc, **resolved)
