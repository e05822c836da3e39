"""Attach the text-stream residual to an SD3 / SD3.5 `SD3Transformer2DModel` (spec T).

`TextStreamResidual` holds validated settings; `attach(transformer)` registers torch forward
pre-hooks on the joint blocks and returns a handle that is also a context manager:

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
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffalign.engine.cliutils import parse_float_list, parse_int_list
from diffalign.engine.errors import DiffalignError
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
from diffalign.textstream.rotations import RotationSet, check_rotation, load_rotations


class TextStreamResidual:
    """Residual text-stream streaming settings (spec T); `attach` applies them to a transformer.

    origin_layer: 0 = text after the context embedder (= input of block 0); k = text entering
    block k. target_layers: blocks whose incoming text gets the residual (origin < t).
    weights: one per target, or one value for all, or None (= 1.0). mode: "plain" or "ln".
    rotations: `{layer: [d, d] orthogonal}` for every target, or the `RotationSet` that
    `load_rotations` returns ("ln" only). layernorm: apply a parameter-free LayerNorm to the
    mix ("ln" only). Speed (issue 18, "ln" only; the defaults are the reference arithmetic):
    rotation_precision "model" runs the rotation GEMM in the model's dtype when it is half
    precision (fp32 models: unchanged); batched_rotation computes every target's rotated origin
    in one GEMM when the origin block runs; compile runs the standardise-mix-rescale compiled.
    """

    def __init__(
        self,
        origin_layer: int = 0,
        target_layers: Sequence[int] | str | None = (),
        weights: Sequence[float] | float | str | None = None,
        mode: str = "plain",
        rotations: Mapping[int, torch.Tensor] | RotationSet | None = None,
        layernorm: bool = False,
        eps: float = 1e-6,
        rotation_precision: str = "fp32",
        batched_rotation: bool = False,
        compile: bool = False,
    ):
        if isinstance(rotations, RotationSet):  # straight from load_rotations(path)
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
                t: check_rotation(rotations[t], None, f"rotation for layer {t}") for t in targets
            }
        self.source: dict[str, Any] = {}  # where the rotations came from (for settings())

    @property
    def active_targets(self) -> list[tuple[int, float]]:
        """(layer, weight) pairs that change the output (zero-weight plain targets are skipped)."""
        pairs = list(zip(self.target_layers, self.weights))
        if self.mode == "plain":
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
                f"origin layer {self.origin_layer} out of range (0..{num_layers - 1})"
            )
        if self.rotations:
            for t, r in self.rotations.items():
                check_rotation(r, feature_dim, f"rotation for layer {t}")

    def mix(
        self, layer: int, weight: float, target: torch.Tensor, origin: torch.Tensor
    ) -> torch.Tensor:
        """The residual for one target block (spec T), delegating to `residual_mix`."""
        rotation = self.rotations[layer] if self.rotations else None
        return residual_mix(
            target, origin, weight, self.mode, rotation, layernorm=self.layernorm, eps=self.eps
        )

    def attach(self, transformer: torch.nn.Module) -> AttachedResidual:
        """Register the hooks on `transformer.transformer_blocks`; returns the detach handle."""
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None:
            raise DiffalignError(
                f"{type(transformer).__name__} has no transformer_blocks; the text-stream "
                "residual needs an SD3/SD3.5 SD3Transformer2DModel"
            )
        self.check_model(len(blocks), transformer_feature_dim(transformer))
        return AttachedResidual(self, blocks, _module_device(transformer))

    def settings(self) -> dict[str, Any]:
        """JSON-able resolved settings (recorded in settings.json by generation commands)."""
        return {
            "enabled": bool(self.active_targets),
            "origin_layer": self.origin_layer,
            "target_layers": list(self.target_layers),
            "weights": list(self.weights),
            "mode": self.mode,
            "layernorm": self.layernorm,
            "eps": self.eps,
            "rotations": bool(self.rotations),
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

    def __init__(self, residual: TextStreamResidual, blocks: Sequence[torch.nn.Module], device):
        self.residual = residual
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._origins: dict[int, tuple[weakref.ref | None, torch.Tensor, dict | None]] = {}
        self._rotations: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._stacked: dict[torch.device, tuple[list[int], torch.Tensor]] = {}
        self._mix = compiled_mix_rescale() if residual.compile else mix_rescale
        if residual.rotations and device is not None:
            for t, r in residual.rotations.items():
                self._rotations[(t, torch.device(device))] = r.to(device)
        active = residual.active_targets
        if not active:
            return  # nothing registered: the transformer runs untouched (bit-identical)
        try:
            self._handles.append(
                blocks[residual.origin_layer].register_forward_pre_hook(
                    self._capture_origin, with_kwargs=True
                )
            )
            for layer, weight in active:
                self._handles.append(
                    blocks[layer].register_forward_pre_hook(
                        self._make_target_hook(layer, weight), with_kwargs=True
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

    def __enter__(self) -> AttachedResidual:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- hooks ---------------------------------------------------------------------------
    def _capture_origin(self, module, args, kwargs):
        text = _get_text(args, kwargs)
        temb = _get_temb(args, kwargs)
        key = id(temb)
        ref = None
        if isinstance(temb, torch.Tensor):
            origins = self._origins
            ref = weakref.ref(temb, lambda _r, k=key, d=origins: _drop(d, k, _r))
        # LN mode: the origin is standardised once per forward and shared by every target
        rotated = None
        if self.residual.mode == "ln":
            dtype = text.dtype
            text = standardize(text.to(compute_dtype(text)), self.residual.eps)[0]
            if self.residual.batched_rotation and self.residual.rotations:
                layers, stacked = self._stacked_on(text.device)
                gemm = gemm_dtype(dtype, self.residual.rotation_precision)
                rotated = dict(zip(layers, rotate_all(text, stacked, gemm)))
        self._origins[key] = (ref, text, rotated)
        return None

    def _stacked_on(self, device: torch.device) -> tuple[list[int], torch.Tensor]:
        """The active targets' rotations side by side on `device` (built once per device)."""
        if device not in self._stacked:
            layers = [t for t, _ in self.residual.active_targets]
            rots = [self.residual.rotations[t] for t in layers]
            self._stacked[device] = (layers, stack_rotations(rots).to(device))
        return self._stacked[device]

    def _lookup_origin(self, args, kwargs) -> torch.Tensor:
        """The origin tokens (standardised in LN mode) captured in this forward."""
        return self._lookup_entry(args, kwargs)[1]

    def _lookup_entry(self, args, kwargs) -> tuple:
        """(ref, origin tokens, rotated origins per target or None) of this forward."""
        temb = _get_temb(args, kwargs)
        entry = self._origins.get(id(temb))
        if entry is not None and (entry[0] is None or entry[0]() is temb):
            return entry
        raise DiffalignError(
            f"text-stream residual: origin block {self.residual.origin_layer} did not run before "
            "a target block in this forward (is it in skip_layers?)"
        )

    def _rotation_on(self, layer: int, device: torch.device) -> torch.Tensor | None:
        if not self.residual.rotations:
            return None
        key = (layer, device)
        if key not in self._rotations:
            self._rotations[key] = self.residual.rotations[layer].to(device)
        return self._rotations[key]

    def _make_target_hook(self, layer: int, weight: float):
        res = self.residual

        def hook(module, args, kwargs):
            text = _get_text(args, kwargs)
            _, origin, rotated = self._lookup_entry(args, kwargs)
            if res.mode == "ln":
                if rotated is not None:
                    o_rot = rotated[layer]
                else:
                    rotation = self._rotation_on(layer, text.device)
                    o_rot = origin
                    if rotation is not None:
                        gemm = gemm_dtype(text.dtype, res.rotation_precision)
                        o_rot = rotate(origin, rotation, gemm)
                mixed = self._mix(text, o_rot, weight, res.layernorm, res.eps)
            else:
                mixed = residual_mix(text, origin, weight, "plain")
            return _set_text(args, kwargs, mixed)

        return hook


def build_residual(
    num_layers: int,
    feature_dim: int,
    origin_layer: int | None = None,
    target_layers: Sequence[int] | str | None = None,
    weights: Sequence[float] | float | str | None = None,
    mode: str | None = None,
    procrustes_path: str | None = None,
    layernorm: bool = False,
    eps: float = 1e-6,
) -> TextStreamResidual | None:
    """Resolve the CLI's residual options for a transformer of this shape (spec T).

    Returns None when the feature is off (no targets). With `procrustes_path`: mode defaults to
    "ln" ("plain" is an error), origin and targets default to the file's, and the file's
    rotation size must equal `feature_dim`.
    """
    if isinstance(target_layers, str):
        target_layers = parse_int_list(target_layers, "--residual-target-layers")
    if isinstance(weights, str):
        weights = parse_float_list(weights, "--residual-weights") or None
    source: dict[str, Any] = {}
    rotations = None
    if procrustes_path:
        if mode == "plain":
            raise DiffalignError(
                "--residual-procrustes-path needs --residual-mode ln (rotations are applied to "
                "standardised tokens)"
            )
        mode = mode or "ln"
        rs = load_rotations(procrustes_path, feature_dim=feature_dim)
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
        source = {
            "path": str(procrustes_path),
            "origin_layer": rs.origin_layer,
            "target_layers": list(rs.target_layers),
            "strategy": rs.strategy,
            "num_valid_tokens": rs.num_valid_tokens,
        }
    if not target_layers:
        return None
    res = TextStreamResidual(
        origin_layer=0 if origin_layer is None else origin_layer,
        target_layers=target_layers,
        weights=weights,
        mode=mode or "plain",
        rotations=rotations,
        layernorm=layernorm,
        eps=eps,
    )
    res.check_model(num_layers, feature_dim)
    res.source = source
    return res


def transformer_feature_dim(transformer: torch.nn.Module) -> int:
    """Width of the text stream: `num_attention_heads * attention_head_dim`."""
    cfg = getattr(transformer, "config", None)
    try:
        return int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    except AttributeError:
        return int(transformer.inner_dim)


# -- helpers -------------------------------------------------------------------------------
def _drop(store: dict, key: int, ref: weakref.ref) -> None:
    entry = store.get(key)
    if entry is not None and entry[0] is ref:
        del store[key]


def _get_text(args: tuple, kwargs: dict) -> torch.Tensor:
    if "encoder_hidden_states" in kwargs:
        return kwargs["encoder_hidden_states"]
    if len(args) > 1:
        return args[1]
    raise DiffalignError("text-stream residual: block called without encoder_hidden_states")


def _get_temb(args: tuple, kwargs: dict) -> Any:
    if "temb" in kwargs:
        return kwargs["temb"]
    return args[2] if len(args) > 2 else None


def _set_text(args: tuple, kwargs: dict, text: torch.Tensor) -> tuple[tuple, dict]:
    if "encoder_hidden_states" in kwargs:
        return args, {**kwargs, "encoder_hidden_states": text}
    return (args[0], text, *args[2:]), kwargs


def _module_device(module: torch.nn.Module):
    for p in module.parameters():
        return p.device
    return None


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


def _expand_weights(weights: Sequence[float] | float | str | None, n: int) -> list[float]:
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
