"""Rotation files of the LN + Procrustes residual (spec T: Rotation file; seed 000).

On disk (safetensors, written atomically):
- tensors `rotation_matrices` float32 `[n, d, d]` and `target_layers` int64 `[n]`; matrix k
  belongs to `target_layers[k]`;
- metadata strings `origin_layer`, `target_layers` (JSON list), `feature_dim`,
  `num_valid_tokens`, `strategy`, plus whatever the writer adds (model, num_samples, seed, ...).

The seed's `.pt` layout (a dict with the same six keys) is read with `weights_only=True`.
The format is recognised from the file's content, not its suffix, so a safetensors file saved
under the seed's `procrustes_rotations.pt` name still loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import dumps_json, load_pt, save_tensors
from diffalign.textstream.procrustes import ORTHOGONALITY_TOL, orthogonality_error

REQUIRED_KEYS = (
    "origin_layer",
    "target_layers",
    "rotation_matrices",
    "feature_dim",
    "num_valid_tokens",
    "strategy",
)


@dataclass
class RotationSet:
    """Per-target-layer orthogonal rotations and how they were calibrated."""

    origin_layer: int
    target_layers: list[int]
    rotations: dict[int, torch.Tensor]
    feature_dim: int
    num_valid_tokens: int = 0
    strategy: str = "all"
    metadata: dict[str, Any] = field(default_factory=dict)


def check_rotation(rotation: torch.Tensor, feature_dim: int | None, what: str) -> torch.Tensor:
    """Validate one rotation (square, finite, orthogonal, right size) and return it as float32."""
    if not isinstance(rotation, torch.Tensor) or rotation.ndim != 2:
        raise DiffalignError(f"{what}: a rotation must be a [d, d] matrix")
    d0, d1 = rotation.shape
    if d0 != d1:
        raise DiffalignError(f"{what}: rotation of shape [{d0}, {d1}] is not square")
    if feature_dim is not None and d0 != feature_dim:
        raise DiffalignError(
            f"{what}: rotation size {d0} does not match the transformer's feature size "
            f"{feature_dim} (calibrated for another model?)"
        )
    if not torch.isfinite(rotation).all():
        raise DiffalignError(f"{what}: rotation contains NaN or inf")
    err = orthogonality_error(rotation)
    if err > ORTHOGONALITY_TOL:
        raise DiffalignError(
            f"{what}: rotation is not orthogonal (max |R^T R - I| = {err:.3g} > {ORTHOGONALITY_TOL})"
        )
    return rotation.detach().to(torch.float32).cpu().contiguous()


def save_rotations(path: str | os.PathLike, rs: RotationSet) -> None:
    """Write `rs` as safetensors (atomic), with the seed's keys as tensors + metadata."""
    missing = [t for t in rs.target_layers if t not in rs.rotations]
    if missing:
        raise DiffalignError(f"save_rotations: no rotation for target layers {missing}")
    mats = (
        torch.stack(
            [
                check_rotation(rs.rotations[t], rs.feature_dim, f"target layer {t}")
                for t in rs.target_layers
            ]
        )
        if rs.target_layers
        else torch.zeros(0, rs.feature_dim, rs.feature_dim)
    )
    meta = {k: (v if isinstance(v, str) else dumps_json(v)) for k, v in rs.metadata.items()}
    meta.update(
        origin_layer=str(int(rs.origin_layer)),
        target_layers=json.dumps([int(t) for t in rs.target_layers]),
        feature_dim=str(int(rs.feature_dim)),
        num_valid_tokens=str(int(rs.num_valid_tokens)),
        strategy=str(rs.strategy),
        format="diffalign-textstream-rotations-v1",
    )
    save_tensors(
        path,
        {
            "rotation_matrices": mats,
            "target_layers": torch.tensor(rs.target_layers, dtype=torch.int64),
        },
        metadata=meta,
    )


def load_rotations(path: str | os.PathLike, feature_dim: int | None = None) -> RotationSet:
    """Read a rotation file (safetensors, or the seed's `.pt` with weights_only=True).

    With `feature_dim`, a rotation of another size is a DiffalignError (wrong model).
    """
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"rotation file not found: {path}")
    raw = _read_raw(path)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise DiffalignError(
            f"{path}: not a text-stream rotation file (missing {', '.join(missing)})"
        )
    try:
        origin = _as_int(raw["origin_layer"])
        targets = _as_int_list(raw["target_layers"])
        file_dim = _as_int(raw["feature_dim"])
        num_valid = _as_int(raw["num_valid_tokens"])
    except (TypeError, ValueError) as e:
        raise DiffalignError(f"{path}: malformed rotation file ({e})") from None
    strategy = str(raw["strategy"])
    mats = raw["rotation_matrices"]
    if not isinstance(mats, torch.Tensor) or mats.ndim != 3 or mats.shape[1] != mats.shape[2]:
        shape = tuple(mats.shape) if isinstance(mats, torch.Tensor) else type(mats).__name__
        raise DiffalignError(f"{path}: rotation_matrices must be [n, d, d] (got {shape})")
    if mats.shape[1] != file_dim:
        raise DiffalignError(
            f"{path}: rotation_matrices are {mats.shape[1]}x{mats.shape[2]} but feature_dim "
            f"says {file_dim}"
        )
    if feature_dim is not None and file_dim != feature_dim:
        raise DiffalignError(
            f"{path}: rotations are for feature size {file_dim}, the transformer has "
            f"{feature_dim} (calibrated for another model?)"
        )
    if len(set(targets)) != len(targets):
        raise DiffalignError(f"{path}: target_layers has duplicates: {targets}")
    if mats.shape[0] == len(targets):
        index = {t: k for k, t in enumerate(targets)}
    elif targets and mats.shape[0] > max(targets):
        # One matrix per transformer block (indexed by layer): tolerated for seed files.
        index = {t: t for t in targets}
    else:
        raise DiffalignError(
            f"{path}: {mats.shape[0]} rotation matrices for {len(targets)} target layers"
        )
    rotations = {
        t: check_rotation(mats[k], file_dim, f"{path} layer {t}") for t, k in index.items()
    }
    metadata = {k: v for k, v in raw.items() if k not in REQUIRED_KEYS}
    return RotationSet(
        origin_layer=origin,
        target_layers=targets,
        rotations=rotations,
        feature_dim=file_dim,
        num_valid_tokens=num_valid,
        strategy=strategy,
        metadata=metadata,
    )


def _read_raw(path: Path) -> dict[str, Any]:
    """Keys -> tensors or python values, for both formats (format sniffed from the bytes)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip / legacy pickle
        obj = load_pt(path)
        if not isinstance(obj, dict):
            raise DiffalignError(f"{path}: expected a dict, found {type(obj).__name__}")
        return dict(obj)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise DiffalignError(
            f"{path}: cannot read rotation file ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    for k, v in meta.items():
        try:
            value = json.loads(v)
        except json.JSONDecodeError:
            value = v
        if k not in raw:
            raw[k] = value
        elif k == "target_layers" and _safe_int_list(value) != _safe_int_list(raw[k]):
            raise DiffalignError(f"{path}: target_layers tensor and metadata disagree")
    return raw


def _safe_int_list(v: Any) -> list[int] | None:
    try:
        return _as_int_list(v)
    except (TypeError, ValueError):
        return None


def _as_int(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"expected one integer, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"expected an integer, got {v!r}")
    return int(v)


def _as_int_list(v: Any) -> list[int]:
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist()
    if isinstance(v, str):
        v = json.loads(v)
    if isinstance(v, int):
        v = [v]
    if not isinstance(v, list | tuple):
        raise ValueError(f"target_layers must be a list of integers, got {type(v).__name__}")
    return [_as_int(x) for x in v]
