"""Attach the text-stream residual to an MMDiT transformer (spec T; issue 15).

`TextStreamResidual` holds validated settings; `attach(transformer)` registers torch forward
pre-hooks on the blocks that the family's `StreamAdapter` lists (SD3/SD3.5 joint blocks, FLUX.1
double then single blocks with global indices, Qwen-Image blocks) and returns a handle that is
also a context manager:

    with TextStreamResidual(origin_layer=0, target_layers=[2, 3], weights=[0.5]).attach(tr):
        images = pipe(prompt).images

Why torch's `register_forward_pre_hook(with_kwargs=True)` rather than `diffusers.hooks`:
removing a torch hook handle restores the block exactly (the hook dicts are left empty, no
attribute is added, `forward` is never replaced), torch hooks run before any forward wrappers
that diffusers/accelerate install for offloading or caching, and they see the block's call
whether it is made with keywords (normal forward) or positionally (gradient checkpointing).

The hooks hold no per-step state. The origin block's hook records the incoming text tokens
keyed by the identity of that forward's `temb` tensor (one object shared by every block of a
transformer forward); a target block's hook looks them up by its own `temb`. So a recompute
under gradient checkpointing, which calls a block's hook again with the same inputs, gives the
same result, even when several forwards ran before the backward.

Per-timestep-bucket rotations: a pre-hook on the transformer reads that forward's `timestep`;
the origin hook turns it into each row's bucket (`StreamAdapter.timestep_bucket`, the rule
calibration fits the buckets by) and stores it with the origin tokens.
Weights are read from the residual object when a target hook runs (`residual.weights[i]`), so
a tensor of learned weights (requiring grad) may be swapped in; the mix is differentiable in it.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from diffalign.engine.cliutils import parse_float_list, parse_int_list
from diffalign.engine.errors import DiffalignError
from diffalign.textstream.adapters import StreamAdapter, stream_adapter, transformer_feature_dim
from diffalign.textstream.residual import (
    MODES,
    ROTATION_PRECISIONS,
    compiled_mix_rescale,
    compute_dtype,
    gemm_dtype,
    mix_rescale,
    residual_mix,
    rotate,
    rotate_all,
    stack_rotations,
    standardize,
)
from diffalign.textstream.rotations import (
    RotationSet,
    check_bucket_edges,
    check_rotation,
    load_rotations,
)

__all__ = [
    "AttachedResidual",
    "TextStreamResidual",
    "build_residual",
    "stream_adapter",
    "transformer_feature_dim",
]


class TextStreamResidual:
    """Residual text-stream streaming settings (spec T); `attach` applies them to a transformer.

    origin_layer: 0 = text after the context embedder (= input of block 0); k = text entering
    block k (global block index in execution order, see `adapters`). target_layers: blocks whose
    incoming text gets the residual (origin < t). weights: one per target, or one value for all,
    or None (= 1.0); a 1-D tensor (e.g. learned, requiring grad) is kept as a tensor and read at
    call time. mode: "plain" or "ln". rotations: `{layer: [d, d] orthogonal}` (or `[N, d, d]`,
    one per timestep bucket, with `timestep_bucket_edges`) for every target, or the
    `RotationSet` that `load_rotations` returns ("ln" only). layernorm: a parameter-free
    LayerNorm on the mix ("ln" only). A file calibrated with column centring (--col-center) is
    applied like any other: the centring is part of the calibration only (`residual` doc).
    Speed (issue 18, "ln" only; the defaults are the reference arithmetic): rotation_precision
    "model" runs the rotation GEMM in the model's dtype when it is half precision (fp32 models:
    unchanged); batched_rotation computes every target's rotated origin in one GEMM when the
    origin block runs (one rotation per target: without timestep buckets); compile runs the
    standardise-mix-rescale compiled.
    """

    def __init__(
        self,
        origin_layer: int = 0,
        target_layers: Sequence[int] | str | None = (),
        weights: Sequence[float] | float | str | torch.Tensor | None = None,
        mode: str = "plain",
        rotations: Mapping[int, torch.Tensor] | RotationSet | None = None,
        layernorm: bool = False,
        eps: float = 1e-6,
        timestep_bucket_edges: Sequence[float] | None = None,
        rotation_precision: str = "fp32",
        batched_rotation: bool = False,
        compile: bool = False,
    ):
        if isinstance(rotations, RotationSet):  # straight from load_rotations(path)
            if timestep_bucket_edges is None:
                timestep_bucket_edges = rotations.timestep_bucket_edges
            rotations = rotations.rotations
        if rotations is not None and not isinstance(rotations, Mapping):
            raise DiffalignError(
                "rotations must be {layer: [d, d] tensor} or a RotationSet from load_rotations "
                f"(got {type(rotations).__name__})"
            )
        self.origin_layer = _layer_index(origin_layer, "origin layer")
        if isinstance(target_layers, str):
            target_layers = parse_int_list(target_layers, "target layers")
        targets = [_layer_index(t, "target layer") for t in (target_layers or ())]
        if len(set(targets)) != len(targets):
            raise DiffalignError(f"target layers contain duplicates: {targets}")
        bad = [t for t in targets if t <= self.origin_layer]
        if bad:
            raise DiffalignError(
                f"target layers {bad} are not after the origin layer {self.origin_layer} "
                "(each target must be > origin)"
            )
        self.target_layers = targets
        self.weights = _expand_weights(weights, len(targets))
        if mode not in MODES:
            raise DiffalignError(f"residual mode must be one of {', '.join(MODES)} (got '{mode}')")
        self.mode = mode
        if not (isinstance(eps, int | float) and eps > 0 and math.isfinite(eps)):
            raise DiffalignError(f"eps must be a positive number (got {eps!r})")
        self.eps = float(eps)
        self.layernorm = bool(layernorm)
        if rotation_precision not in ROTATION_PRECISIONS:
            raise DiffalignError(
                f"rotation precision must be one of {', '.join(ROTATION_PRECISIONS)} "
                f"(got '{rotation_precision}')"
            )
        self.rotation_precision = rotation_precision
        self.batched_rotation = bool(batched_rotation)
        self.compile = bool(compile)
        if mode == "plain" and rotations:
            raise DiffalignError(
                "rotations (a Procrustes file) need --residual-mode ln; plain mode adds the "
                "origin tokens unchanged"
            )
        if mode == "plain" and self.layernorm:
            raise DiffalignError("--residual-layernorm needs --residual-mode ln")
        self.timestep_bucket_edges: list[float] | None = None
        if timestep_bucket_edges is not None:
            self.timestep_bucket_edges = check_bucket_edges(timestep_bucket_edges)
        buckets = self.num_buckets
        self.rotations: dict[int, torch.Tensor] | None = None
        if rotations:
            missing = [t for t in targets if t not in rotations]
            if missing:
                raise DiffalignError(
                    f"no rotation for target layers {missing} (rotations exist for "
                    f"{sorted(int(k) for k in rotations)})"
                )
            dims = {int(rotations[t].shape[-1]) for t in targets}
            if len(dims) > 1:
                raise DiffalignError(f"rotations of different sizes: {sorted(dims)}")
            self.rotations = {
                t: _check_bucketed(rotations[t], buckets, None, f"rotation for layer {t}")
                for t in targets
            }
        elif buckets > 1:
            raise DiffalignError("timestep buckets need per-bucket rotations (a rotation file)")
        self.source: dict[str, Any] = {}  # where the rotations came from (for settings())
        # the rotation file's recorded calibration identity (`RotationSet.recorded_identity`)
        self.rotation_identity: dict[str, Any] | None = None

    def device_copy(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`make()` built once per `key` (which names a device and dtype) and kept for every
        attach of these settings: the rotations, fixed at construction, reach an accelerator
        once, not at each attach (each pipeline call, each timed forward of a bench)."""
        copies = self.__dict__.setdefault("_device_copies", {})
        if key not in copies:
            copies[key] = make()
        return copies[key]

    @property
    def num_buckets(self) -> int:
        """Timestep buckets of the rotations (1 without bucket edges)."""
        edges = self.timestep_bucket_edges
        return 1 if edges is None else len(edges) - 1

    @property
    def active_targets(self) -> list[tuple[int, Any]]:
        """(layer, weight) pairs that change the output (zero-weight plain targets are skipped;
        tensor weights are never skipped: they may change)."""
        pairs = list(zip(self.target_layers, self.weights))
        if self.mode == "plain" and not isinstance(self.weights, torch.Tensor):
            pairs = [(t, w) for t, w in pairs if w != 0.0]
        return pairs

    def check_model(self, num_layers: int, feature_dim: int) -> None:
        """Raise a DiffalignError if the settings do not fit a transformer of this shape."""
        too_far = [t for t in self.target_layers if t > num_layers - 1]
        if too_far:
            raise DiffalignError(
                f"target layers {too_far} out of range: the transformer has {num_layers} blocks "
                f"(valid targets {self.origin_layer + 1}..{num_layers - 1})"
            )
        if self.origin_layer > num_layers - 1:
            raise DiffalignError(
                f"origin layer {self.origin_layer} out of range: the transformer has "
                f"{num_layers} blocks (0..{num_layers - 1})"
            )
        if self.rotations:
            for t, r in self.rotations.items():
                _check_bucketed(r, self.num_buckets, feature_dim, f"rotation for layer {t}")

    def rotation(self, layer: int, bucket: int = 0) -> torch.Tensor | None:
        """The `[d, d]` rotation of `layer` in timestep bucket `bucket` (None without)."""
        if not self.rotations:
            return None
        r = self.rotations[layer]
        return r if r.ndim == 2 else r[bucket]

    def mix(
        self,
        layer: int,
        weight: float | torch.Tensor,
        target: torch.Tensor,
        origin: torch.Tensor,
        bucket: int = 0,
    ) -> torch.Tensor:
        """The residual for one target block (spec T), delegating to `residual_mix`."""
        return residual_mix(
            target,
            origin,
            weight,
            self.mode,
            self.rotation(layer, bucket),
            layernorm=self.layernorm,
            eps=self.eps,
        )

    def attach(self, transformer: torch.nn.Module) -> AttachedResidual:
        """Register the hooks on the transformer's blocks (see `adapters`); returns the handle."""
        adapter = stream_adapter(transformer)
        self.check_model(adapter.num_blocks, adapter.feature_dim)
        return AttachedResidual(self, adapter, transformer)

    def settings(self) -> dict[str, Any]:
        """JSON-able resolved settings (recorded in settings.json by generation commands)."""
        return {
            "enabled": bool(self.active_targets),
            "origin_layer": self.origin_layer,
            "target_layers": list(self.target_layers),
            "weights": [float(w) for w in _detached(self.weights)],
            "mode": self.mode,
            "layernorm": self.layernorm,
            "eps": self.eps,
            "rotations": bool(self.rotations),
            **(
                {"timestep_bucket_edges": list(self.timestep_bucket_edges)}
                if self.timestep_bucket_edges is not None
                else {}
            ),
            **({"procrustes": dict(self.source)} if self.source else {}),
            **self.speed_settings(),
        }

    def speed_settings(self) -> dict[str, Any]:
        """The speed options that differ from the reference arithmetic (recorded when set)."""
        out: dict[str, Any] = {}
        if self.rotation_precision != "fp32":
            out["rotation_precision"] = self.rotation_precision
        if self.batched_rotation:
            out["batched_rotation"] = True
        if self.compile:
            out["compile"] = True
        return out

    def __repr__(self) -> str:
        s = self.settings()
        return (
            f"TextStreamResidual(origin_layer={s['origin_layer']}, target_layers="
            f"{s['target_layers']}, weights={s['weights']}, mode={s['mode']!r}, "
            f"rotations={s['rotations']}, layernorm={s['layernorm']})"
        )


class AttachedResidual:
    """Hooks of one `TextStreamResidual` on one transformer; `detach()` (or leaving the `with`
    block, also on an exception) removes them and leaves the model exactly as before."""

    def __init__(
        self, residual: TextStreamResidual, adapter: StreamAdapter, transformer: torch.nn.Module
    ):
        self.residual = residual
        self.adapter = adapter
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._origins: dict[int, tuple[weakref.ref | None, torch.Tensor, Any, Any]] = {}
        self._mix = compiled_mix_rescale() if residual.compile else mix_rescale
        self._timestep: torch.Tensor | None = None
        active = residual.active_targets
        if not active:
            return  # nothing registered: the transformer runs untouched (bit-identical)
        blocks = adapter.blocks
        index = {t: i for i, t in enumerate(residual.target_layers)}
        try:
            if residual.num_buckets > 1:
                self._handles.append(
                    transformer.register_forward_pre_hook(self._capture_timestep, with_kwargs=True)
                )
            self._handles.append(
                blocks[residual.origin_layer].register_forward_pre_hook(
                    self._capture_origin, with_kwargs=True
                )
            )
            for layer, _ in active:
                self._handles.append(
                    blocks[layer].register_forward_pre_hook(
                        self._make_target_hook(layer, index[layer]), with_kwargs=True
                    )
                )
        except BaseException:
            self.detach()
            raise

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove every hook (idempotent) and drop the captured tokens."""
        while self._handles:
            self._handles.pop().remove()
        self._origins.clear()
        self._timestep = None

    def __enter__(self) -> AttachedResidual:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- hooks ---------------------------------------------------------------------------
    def _capture_timestep(self, module, args, kwargs):
        t = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        if not isinstance(t, torch.Tensor | int | float):
            raise DiffalignError("text-stream residual: timestep buckets need the timestep")
        self._timestep = torch.as_tensor(t)
        return None

    def _buckets(self, batch: int) -> torch.Tensor | None:
        """This forward's bucket per batch row (None with one bucket), on the host.

        Read once per transformer forward (in the origin hook; a gradient-checkpointing
        recompute reuses it), so a timestep on an accelerator costs one host sync per forward,
        not one per target. It stays: picking a target's `[d, d]` rotation by a bucket index
        that lives on the device, without reading it, needs a gather (`index_select`), i.e. a
        copy of every target's rotation in every forward, where the host index gives a free view
        of the device copy (`_rotation_on`) with the same result."""
        res = self.residual
        if res.num_buckets == 1:
            return None
        if self._timestep is None:
            raise DiffalignError("text-stream residual: no timestep seen before the origin block")
        buckets = self.adapter.timestep_bucket(self._timestep, res.timestep_bucket_edges)
        if buckets.numel() == 1:
            return buckets.expand(batch)
        if buckets.numel() != batch:
            raise DiffalignError(
                f"text-stream residual: {buckets.numel()} timesteps for a batch of {batch}"
            )
        return buckets

    def _capture_origin(self, module, args, kwargs):
        res = self.residual
        text = self.adapter.get_text(args, kwargs)
        temb = self.adapter.get_temb(args, kwargs)
        key = id(temb)
        ref = None
        if isinstance(temb, torch.Tensor):
            origins = self._origins
            ref = weakref.ref(temb, lambda _r, k=key, d=origins: _drop(d, k, _r))
        old = self._origins.get(key)
        if old is not None and old[0] is not None and old[0]() is temb:
            buckets = old[2]  # a recompute (gradient checkpointing): keep the forward's buckets
        else:
            buckets = self._buckets(text.shape[0])
        # LN mode: the origin is standardised once per forward and shared by every target
        rotated = None
        if res.mode == "ln":
            dtype = text.dtype
            text = standardize(text.to(compute_dtype(text)), res.eps)[0]
            if res.batched_rotation and res.rotations and res.num_buckets == 1:
                gemm = gemm_dtype(dtype, res.rotation_precision)
                layers, stacked = self._stacked_on(text.device, gemm)
                rotated = dict(zip(layers, rotate_all(text, stacked, gemm)))
        self._origins[key] = (ref, text, buckets, rotated)
        return None

    def _stacked_on(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[list[int], torch.Tensor]:
        """The active targets' rotations side by side on `device` in the GEMM's `dtype`
        (built once per device and dtype: `TextStreamResidual.device_copy`)."""
        layers = [t for t, _ in self.residual.active_targets]

        def make() -> torch.Tensor:
            rots = [self.residual.rotations[t] for t in layers]
            rots = [r if r.ndim == 2 else r[0] for r in rots]  # one bucket: [1, d, d]
            return stack_rotations(rots).to(device=device, dtype=dtype)

        key = ("stacked", tuple(layers), device, dtype)
        return layers, self.residual.device_copy(key, make)

    def _lookup_origin(self, args, kwargs) -> tuple[torch.Tensor, Any]:
        """The origin tokens (standardised in LN mode) and buckets captured in this forward."""
        entry = self._lookup_entry(args, kwargs)
        return entry[1], entry[2]

    def _lookup_entry(self, args, kwargs) -> tuple:
        """(ref, origin tokens, buckets, rotated origins per target or None) of this forward."""
        temb = self.adapter.get_temb(args, kwargs)
        entry = self._origins.get(id(temb))
        if entry is not None and (entry[0] is None or entry[0]() is temb):
            return entry
        raise DiffalignError(
            f"text-stream residual: origin block {self.residual.origin_layer} did not run before "
            "a target block in this forward (is it in skip_layers?)"
        )

    def _rotation_on(
        self, layer: int, device: torch.device, buckets, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """`[d, d]`, or `[B, d, d]` when the rows of the batch fall in different buckets; on
        `device` in the GEMM's `dtype` (built once: `TextStreamResidual.device_copy`)."""
        if not self.residual.rotations:
            return None
        r = self.residual.rotations[layer]
        stack = self.residual.device_copy(
            ("rotation", layer, device, dtype),
            lambda: (r if r.ndim == 3 else r[None]).to(device=device, dtype=dtype),
        )
        if buckets is None:
            return stack[0]
        if bool((buckets == buckets[0]).all()):
            return stack[int(buckets[0])]
        return stack[buckets.to(device)]

    def _make_target_hook(self, layer: int, i: int):
        res = self.residual

        def hook(module, args, kwargs):
            text = self.adapter.get_text(args, kwargs)
            _, origin, buckets, rotated = self._lookup_entry(args, kwargs)
            weight = res.weights[i]  # read now: a learned weight tensor may be swapped in
            if res.mode == "ln":
                if rotated is not None:  # batched_rotation: computed with the origin
                    o_rot = rotated[layer]
                else:
                    o_rot = origin
                    gemm = gemm_dtype(text.dtype, res.rotation_precision)
                    rotation = self._rotation_on(layer, text.device, buckets, gemm)
                    if rotation is not None:
                        o_rot = rotate(origin, rotation, gemm)
                mixed = self._mix(text, o_rot, weight, res.layernorm, res.eps)
            else:
                mixed = residual_mix(text, origin, weight, "plain")
            return self.adapter.set_text(args, kwargs, mixed)

        return hook


def build_residual(
    num_layers: int,
    feature_dim: int,
    origin_layer: int | None = None,
    target_layers: Sequence[int] | str | None = None,
    weights: Sequence[float] | float | str | torch.Tensor | None = None,
    mode: str | None = None,
    procrustes_path: str | None = None,
    layernorm: bool = False,
    eps: float = 1e-6,
    family: str | None = None,
    column_center: bool | None = None,
    timestep_buckets: int | None = None,
) -> TextStreamResidual | None:
    """Resolve the CLI's residual options for a transformer of this shape (spec T).

    Returns None when the feature is off (no targets). With `procrustes_path`: mode defaults to
    "ln" ("plain" is an error), origin and targets default to the file's, and the file's
    rotation size (and, with `family`, its model family) must fit the model. `column_center`
    True checks that the file was calibrated with column centring (it does not change the mix:
    `residual` doc); `timestep_buckets` (if given) must equal the file's bucket count.
    """
    if isinstance(target_layers, str):
        target_layers = parse_int_list(target_layers, "--residual-target-layers")
    if isinstance(weights, str):
        weights = parse_float_list(weights, "--residual-weights") or None
    source: dict[str, Any] = {}
    rotations = None
    edges = None
    if column_center and not procrustes_path:
        raise DiffalignError("--col-center needs a rotation file calibrated with --col-center")
    if procrustes_path:
        if mode == "plain":
            raise DiffalignError(
                "--residual-procrustes-path needs --residual-mode ln (rotations are applied to "
                "standardised tokens)"
            )
        mode = mode or "ln"
        rs = load_rotations(procrustes_path, feature_dim=feature_dim, family=family)
        if column_center and not rs.column_center:
            raise DiffalignError(
                f"{procrustes_path}: --col-center given, but the file was calibrated without "
                f"column centring (strategy {rs.strategy})"
            )
        if timestep_buckets is not None and timestep_buckets != rs.num_buckets:
            raise DiffalignError(
                f"{procrustes_path}: {rs.num_buckets} timestep bucket(s) in the file, "
                f"{timestep_buckets} asked for"
            )
        if rs.target_layers and max(rs.target_layers) > num_layers - 1:
            raise DiffalignError(
                f"{procrustes_path}: rotations for blocks up to {max(rs.target_layers)}, but the "
                f"transformer has {num_layers} blocks (calibrated for another model?)"
            )
        if origin_layer is None:
            origin_layer = rs.origin_layer
        if target_layers is None:
            target_layers = list(rs.target_layers)
        if target_layers:
            missing = [t for t in target_layers if t not in rs.rotations]
            if missing:
                raise DiffalignError(
                    f"{procrustes_path}: no rotation for target layers {missing} (the file has "
                    f"layers {rs.target_layers})"
                )
        rotations = {t: rs.rotations[t] for t in (target_layers or [])}
        edges = rs.timestep_bucket_edges
        source = {
            "path": str(procrustes_path),
            "origin_layer": rs.origin_layer,
            "target_layers": list(rs.target_layers),
            "strategy": rs.strategy,
            "token_strategy": rs.token_strategy,
            "num_valid_tokens": rs.num_valid_tokens,
            "column_center": rs.column_center,
            "timestep_buckets": rs.num_buckets,
            **({"model_family": rs.model_family} if rs.model_family else {}),
        }
    if not target_layers:
        return None
    origin = 0 if origin_layer is None else origin_layer
    early = [t for t in target_layers if isinstance(t, int) and t <= origin]
    if early:
        raise DiffalignError(
            f"target layers {early} are not after the origin layer {origin}: the transformer "
            f"has {num_layers} blocks (origin 0..{num_layers - 2}, targets origin+1.."
            f"{num_layers - 1})"
        )
    res = TextStreamResidual(
        origin_layer=0 if origin_layer is None else origin_layer,
        target_layers=target_layers,
        weights=weights,
        mode=mode or "plain",
        rotations=rotations,
        layernorm=layernorm,
        eps=eps,
        timestep_bucket_edges=edges,
    )
    res.check_model(num_layers, feature_dim)
    res.source = source
    if procrustes_path:
        res.rotation_identity = rs.recorded_identity
    return res


# -- helpers -------------------------------------------------------------------------------
def _drop(store: dict, key: int, ref: weakref.ref) -> None:
    entry = store.get(key)
    if entry is not None and entry[0] is ref:
        del store[key]


def _layer_index(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DiffalignError(f"{what} must be an integer (got {value!r})")
    value = int(value)
    if value < 0:
        raise DiffalignError(f"{what} must be >= 0 (got {value})")
    return value


def _check_bucketed(
    rotation: torch.Tensor, buckets: int, feature_dim: int | None, what: str
) -> torch.Tensor:
    """A `[d, d]` rotation (one bucket) or `[N, d, d]` (one per bucket), each checked."""
    if isinstance(rotation, torch.Tensor) and rotation.ndim == 3:
        if rotation.shape[0] != buckets:
            raise DiffalignError(
                f"{what}: {rotation.shape[0]} per-bucket rotations for {buckets} timestep bucket(s)"
            )
        return torch.stack(
            [check_rotation(r, feature_dim, f"{what}, bucket {b}") for b, r in enumerate(rotation)]
        )
    if buckets != 1:
        raise DiffalignError(f"{what}: one rotation for {buckets} timestep buckets")
    return check_rotation(rotation, feature_dim, what)


def _expand_weights(
    weights: Sequence[float] | float | str | torch.Tensor | None, n: int
) -> list[float] | torch.Tensor:
    if isinstance(weights, torch.Tensor) and weights.is_floating_point():
        # learned weights: kept as a tensor (grad flows through the mix), one per target
        w = weights.reshape(-1)
        if w.numel() == 1 and n != 1:
            w = w.expand(n)
        if w.numel() != n:
            raise DiffalignError(f"{w.numel()} residual weights for {n} target layers")
        if not bool(torch.isfinite(w.detach()).all()):
            raise DiffalignError("residual weights must be finite")
        return w
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if isinstance(weights, str):
        weights = parse_float_list(weights, "weights") or None
    if weights is None:
        out = [1.0] * n
    elif isinstance(weights, int | float):
        out = [float(weights)] * n
    else:
        try:
            ws = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise DiffalignError(f"residual weights must be numbers (got {weights!r})") from None
        if n == 0:
            out = []  # feature off: weights are ignored (seed 002: empty target list disables)
        elif len(ws) == 1:
            out = ws * n
        elif len(ws) == n:
            out = ws
        else:
            raise DiffalignError(
                f"{len(ws)} residual weights for {n} target layers (give one weight per target "
                "or a single weight for all)"
            )
    bad = [w for w in out if not math.isfinite(w)]
    if bad:
        raise DiffalignError(f"residual weights must be finite (got {bad})")
    return out


def _detached(weights: Any) -> Any:
    """The weights without autograd (a trained weight tensor reads as plain numbers)."""
    return weights.detach() if torch.is_tensor(weights) else weights
