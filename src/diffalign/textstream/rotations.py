"""Rotation files of the LN + Procrustes residual (spec T: Rotation file; seed 000).

On disk (safetensors, written atomically):
- tensors `rotation_matrices` float32 `[L, d, d]` (or `[N, L, d, d]`: one set per timestep
  bucket) and `target_layers` int64 `[L]`; matrix k belongs to `target_layers[k]`;
- metadata strings `origin_layer`, `target_layers` (JSON list), `feature_dim`,
  `num_valid_tokens`, `strategy` (`row_ln` or `row_ln_then_col_center`), `column_center`,
  `timestep_buckets`, `timestep_bucket_edges` (JSON, `N + 1` increasing values in scheduler
  timestep units 0..1000), `model_family` (`sd3`, `flux`, `qwen-image`), `token_strategy`
  (`all` / `valid`), plus whatever the writer adds (model, num_samples, seed, ...).

The seed's and the method authors' `.pt` layout (a dict with the same keys; `model_family` and
the bucket keys optional) is read with `weights_only=True`. Older files whose `strategy` is the
token strategy (`all` / `valid`) read as `row_ln` with that token strategy. Bucket edges given
as fractions (last edge <= 1, sigma units) are scaled to 0..1000.
The format is recognised from the file's content, not its suffix, so a safetensors file saved
under the seed's `procrustes_rotations.pt` name still loads.
"""

from __future__ import annotations

import json
import math
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


STRATEGIES = ("row_ln", "row_ln_then_col_center")
TOKEN_STRATEGIES = ("all", "valid")


@dataclass
class RotationSet:
    """Per-target-layer orthogonal rotations and how they were calibrated.

    `rotations[layer]` is `[d, d]`, or `[N, d, d]` with `timestep_bucket_edges` of N + 1 values.
    `strategy` is the token normalisation (`row_ln`, or `row_ln_then_col_center` with
    `column_center`); a token strategy given there (`all` / `valid`, the older meaning) moves to
    `token_strategy`.
    """

    origin_layer: int
    target_layers: list[int]
    rotations: dict[int, torch.Tensor]
    feature_dim: int
    num_valid_tokens: int = 0
    strategy: str = "row_ln"
    metadata: dict[str, Any] = field(default_factory=dict)
    timestep_bucket_edges: list[float] | None = None
    column_center: bool = False
    model_family: str | None = None
    token_strategy: str = "all"
    # read only (`load_rotations`): the `calibration_identity` a safetensors file's metadata
    # records under "identity" (None: none, or a `.pt` file); writers put it in `metadata`
    recorded_identity: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.strategy in TOKEN_STRATEGIES:
            self.token_strategy, self.strategy = self.strategy, "row_ln"
        if self.strategy == "row_ln_then_col_center":
            self.column_center = True
        elif self.column_center:
            self.strategy = "row_ln_then_col_center"

    @property
    def num_buckets(self) -> int:
        edges = self.timestep_bucket_edges
        return 1 if edges is None else len(edges) - 1


def check_bucket_edges(edges: Any) -> list[float]:
    """N + 1 strictly increasing finite timestep edges (N >= 1), in 0..1000 units."""
    try:
        values = [float(e) for e in (edges.tolist() if isinstance(edges, torch.Tensor) else edges)]
    except (TypeError, ValueError):
        raise DiffalignError(f"timestep bucket edges must be numbers (got {edges!r})") from None
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        raise DiffalignError(f"timestep bucket edges need >= 2 finite values (got {values})")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise DiffalignError(f"timestep bucket edges must increase (got {values})")
    if values[-1] <= 1.0:  # sigma fractions: scheduler timesteps are sigma * 1000
        values = [v * 1000.0 for v in values]
    return values


def equal_bucket_edges(num_buckets: int, num_train_timesteps: int = 1000) -> list[float]:
    """`--timestep-buckets N`: the integer timesteps `0..num_train_timesteps - 1` in N buckets of
    equal count, the first `num_train_timesteps % N` buckets one timestep larger; integer edges
    (N = 3: 0, 334, 667, 1000), as the method's authors bucket (`_build_bucket_edges` in
    Yaoyuxuanyyds/Training-free-Residual-SD3 e9d7900 `Flux-Residual/` and `Qwen-Image-Residual/`
    `compute_*_text_procrustes.py`)."""
    n, total = int(num_buckets), int(num_train_timesteps)
    if n < 1:
        raise DiffalignError(f"--timestep-buckets must be at least 1 (got {num_buckets})")
    if n > total:
        raise DiffalignError(
            f"--timestep-buckets {n}: at most one bucket per timestep ({total} timesteps)"
        )
    base, extra = divmod(total, n)
    edges = [0]
    for b in range(n):
        edges.append(edges[-1] + base + (1 if b < extra else 0))
    return [float(e) for e in edges]


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
    n, d = rs.num_buckets, rs.feature_dim

    def checked(t: int) -> torch.Tensor:
        r = rs.rotations[t]
        mats = r[None] if r.ndim == 2 else r
        if mats.shape[0] != n:
            raise DiffalignError(f"save_rotations: layer {t} has {mats.shape[0]} buckets, not {n}")
        return torch.stack(
            [check_rotation(m, d, f"target layer {t}, bucket {b}") for b, m in enumerate(mats)]
        )

    if rs.target_layers:
        mats = torch.stack([checked(t) for t in rs.target_layers], dim=1)  # [N, L, d, d]
    else:
        mats = torch.zeros(n, 0, d, d)
    if rs.timestep_bucket_edges is None:
        mats = mats[0]
    meta = {k: (v if isinstance(v, str) else dumps_json(v)) for k, v in rs.metadata.items()}
    meta.update(
        origin_layer=str(int(rs.origin_layer)),
        target_layers=json.dumps([int(t) for t in rs.target_layers]),
        feature_dim=str(int(rs.feature_dim)),
        num_valid_tokens=str(int(rs.num_valid_tokens)),
        strategy=str(rs.strategy),
        token_strategy=str(rs.token_strategy),
        column_center=json.dumps(bool(rs.column_center)),
        timestep_buckets=str(n),
        format="diffalign-textstream-rotations-v2",
    )
    if rs.timestep_bucket_edges is not None:
        meta["timestep_bucket_edges"] = json.dumps(list(rs.timestep_bucket_edges))
    if rs.model_family:
        meta["model_family"] = str(rs.model_family)
    save_tensors(
        path,
        {
            "rotation_matrices": mats.contiguous(),
            "target_layers": torch.tensor(rs.target_layers, dtype=torch.int64),
        },
        metadata=meta,
    )


def load_rotations(
    path: str | os.PathLike, feature_dim: int | None = None, family: str | None = None
) -> RotationSet:
    """Read a rotation file (safetensors, or the seed's / authors' `.pt` with weights_only=True).

    With `feature_dim`, a rotation of another size is a DiffalignError (wrong model); with
    `family`, so is a file that records another model family.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"rotation file not found: {path}")
    raw, header = _read_raw(path)
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
    file_family = raw.get("model_family")
    file_family = None if file_family in (None, "") else str(file_family)
    if family is not None and file_family is not None and file_family != family:
        raise DiffalignError(
            f"{path}: rotations calibrated on a {file_family} model, this is a {family} model"
        )
    mats = raw["rotation_matrices"]
    if (
        not isinstance(mats, torch.Tensor)
        or mats.ndim not in (3, 4)
        or mats.shape[-1] != mats.shape[-2]
    ):
        shape = tuple(mats.shape) if isinstance(mats, torch.Tensor) else type(mats).__name__
        raise DiffalignError(
            f"{path}: rotation_matrices must be [L, d, d] or [N, L, d, d] (got {shape})"
        )
    if mats.shape[-1] != file_dim:
        raise DiffalignError(
            f"{path}: rotation_matrices are {mats.shape[-2]}x{mats.shape[-1]} but feature_dim "
            f"says {file_dim}"
        )
    if feature_dim is not None and file_dim != feature_dim:
        raise DiffalignError(
            f"{path}: rotations are for feature size {file_dim}, the transformer has "
            f"{feature_dim} (calibrated for another model?)"
        )
    edges = _read_edges(path, raw, mats)
    if len(set(targets)) != len(targets):
        raise DiffalignError(f"{path}: target_layers has duplicates: {targets}")
    per_bucket = mats if mats.ndim == 4 else mats[None]  # [N, L, d, d]
    count = per_bucket.shape[1]
    if count == len(targets):
        index = {t: k for k, t in enumerate(targets)}
    elif targets and count > max(targets):
        # One matrix per transformer block (indexed by layer): tolerated for seed files.
        index = {t: t for t in targets}
    else:
        raise DiffalignError(f"{path}: {count} rotation matrices for {len(targets)} target layers")
    rotations = {}
    for t, k in index.items():
        checked = [
            check_rotation(
                per_bucket[b, k], file_dim, f"{path} layer {t}" + (f" bucket {b}" if edges else "")
            )
            for b in range(per_bucket.shape[0])
        ]
        rotations[t] = torch.stack(checked) if mats.ndim == 4 else checked[0]
    column_center = _as_bool(raw.get("column_center", strategy == "row_ln_then_col_center"))
    token_strategy = str(raw.get("token_strategy", "all"))
    known = (
        *REQUIRED_KEYS,
        "column_center",
        "timestep_buckets",
        "timestep_bucket_edges",
        "model_family",
        "token_strategy",
        "format",
    )
    metadata = {k: v for k, v in raw.items() if k not in known}
    rs = RotationSet(
        origin_layer=origin,
        target_layers=targets,
        rotations=rotations,
        feature_dim=file_dim,
        num_valid_tokens=num_valid,
        strategy=strategy,
        metadata=metadata,
        timestep_bucket_edges=edges if mats.ndim == 4 or edges is not None else None,
        column_center=column_center,
        model_family=file_family,
        recorded_identity=parse_identity(header.get("identity")),
    )
    if strategy not in TOKEN_STRATEGIES:
        rs.token_strategy = token_strategy
    if rs.timestep_bucket_edges is not None and mats.ndim == 3:
        rs.rotations = {t: r[None] for t, r in rs.rotations.items()}
    return rs


def _read_edges(path: Path, raw: dict, mats: torch.Tensor) -> list[float] | None:
    """The bucket edges of a file, checked against the matrices' bucket axis."""
    n = mats.shape[0] if mats.ndim == 4 else 1
    edges = raw.get("timestep_bucket_edges")
    declared = raw.get("timestep_buckets")
    if declared is not None and declared != "":
        try:
            declared = _as_int(declared)
        except (TypeError, ValueError):
            raise DiffalignError(f"{path}: timestep_buckets is not an integer") from None
        if declared != n:
            raise DiffalignError(
                f"{path}: timestep_buckets says {declared}, rotation_matrices hold {n} bucket(s)"
            )
    if edges is None or (isinstance(edges, str) and not edges):
        if n > 1:
            raise DiffalignError(f"{path}: {n} timestep buckets but no timestep_bucket_edges")
        return None
    try:
        values = check_bucket_edges(edges)
    except DiffalignError as e:
        raise DiffalignError(f"{path}: {e}") from None
    if len(values) != n + 1:
        raise DiffalignError(
            f"{path}: {len(values)} timestep bucket edges for {n} bucket(s) of rotations "
            f"(need {n + 1})"
        )
    return values


def _as_bool(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, str):
        v = v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def parse_identity(text: str | None) -> dict[str, Any] | None:
    """The identity dict a rotation file's "identity" metadata string holds (None: none, or
    not a JSON object)."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _read_raw(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(keys -> tensors or python values, the safetensors metadata strings; {} for `.pt`), for
    both formats (format sniffed from the bytes)."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte header length, then the JSON header; its length's first byte
    # may be 0x80, so it is recognised before the pickle magic
    is_safetensors = head[8:9] == b"{"
    if not is_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):  # torch zip / pickle
        obj = load_pt(path)
        if not isinstance(obj, dict):
            raise DiffalignError(f"{path}: expected a dict, found {type(obj).__name__}")
        return dict(obj), {}
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
    return raw, meta


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
