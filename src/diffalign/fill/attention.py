"""Semantic cross-attention (spec F, seed 004 "Cross-Attention内部").

The noisy latent tokens `x_t` (queries) attend to the VAE tokens of the semantic panel (keys and
values) laid out on the same token grid; the result goes through an output projection and is added
back scaled by a learnable scalar initialised to 0, so at initialisation the module is the identity
and training starts from the unmodified FLUX.1-Fill transformer. Layers stack: each refines the
running tokens against the same semantic tokens.

The seed computes `softmax(Q K^T / sqrt(d)) V` explicitly, which materialises a `[B, heads, L, L]`
matrix (2048 x 2048 per head at 512 px panels). We call the fused
`torch.nn.functional.scaled_dot_product_attention` instead (same maths, memory O(L));
`seed_reference_forward` keeps the seed's explicit form as the reference for tests and benchmarks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.engine.errors import DiffalignError


class SemanticCrossAttentionLayer(nn.Module):
    """One layer: `x + scale * out(attn(q(LN(x)), k(LN(s)), v(LN(s))))`, `scale` starts at 0."""

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise DiffalignError(
                f"semantic cross-attention: dim ({dim}) must be a positive multiple of heads "
                f"({heads})"
            )
        self.dim, self.heads = dim, heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_s = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.zeros(()))

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, heads, L, D/heads]
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim // self.heads).transpose(1, 2)

    def project(self, x: torch.Tensor, s: torch.Tensor):
        """Q from the normalised noisy tokens, K and V from the normalised semantic tokens."""
        xs, ss = self.norm_x(x), self.norm_s(s)
        return self._split(self.to_q(xs)), self._split(self.to_k(ss)), self._split(self.to_v(ss))

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Merge the heads, project, and add the scaled residual."""
        b, _, n, _ = attended.shape
        out = self.to_out(attended.transpose(1, 2).reshape(b, n, self.dim))
        return x + self.scale.to(out.dtype) * out

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, s)
        # Fused attention: never materialises the [B, heads, L, L] score matrix.
        return self.finish(x, F.scaled_dot_product_attention(q, k, v))


class SemanticCrossAttention(nn.Module):
    """`layers` stacked semantic cross-attention layers of width `dim` with `heads` heads.

    `m(x_t_tokens, semantic_tokens)` -> enhanced tokens; all `[B, L, dim]` (FLUX packed latents:
    dim 64). At initialisation every `scale` is 0 and the output equals the input exactly.
    """

    def __init__(self, dim: int = 64, heads: int = 8, layers: int = 1):
        super().__init__()
        if layers < 1:
            raise DiffalignError(f"semantic cross-attention: layers must be >= 1, got {layers}")
        self.dim, self.heads_count, self.num_layers = int(dim), int(heads), int(layers)
        self.layers = nn.ModuleList(
            SemanticCrossAttentionLayer(self.dim, self.heads_count) for _ in range(self.num_layers)
        )

    def forward(self, x_t_tokens: torch.Tensor, semantic_tokens: torch.Tensor) -> torch.Tensor:
        _check_tokens(x_t_tokens, semantic_tokens, self.dim)
        x = x_t_tokens
        for layer in self.layers:
            x = layer(x, semantic_tokens)
        return x

    def scales(self) -> list[float]:
        """The residual scale of each layer (the seed logs it: 0 at start, 0.1-0.5 trained)."""
        return [float(layer.scale.detach()) for layer in self.layers]

    def num_parameters(self) -> int:
        """Number of parameters (the seed prints it at start)."""
        return sum(p.numel() for p in self.parameters())

    def config(self) -> dict[str, int]:
        """The shape that a checkpoint of this module records."""
        return {"dim": self.dim, "heads": self.heads_count, "layers": self.num_layers}


def _check_tokens(x: torch.Tensor, s: torch.Tensor, dim: int) -> None:
    if x.dim() != 3 or s.dim() != 3:
        raise DiffalignError(
            f"semantic cross-attention expects [B, L, dim] tokens, got {tuple(x.shape)} and "
            f"{tuple(s.shape)}"
        )
    if x.shape[-1] != dim or s.shape[-1] != dim:
        raise DiffalignError(
            f"semantic cross-attention of width {dim} got tokens of width {x.shape[-1]} and "
            f"{s.shape[-1]}"
        )
    if x.shape[0] != s.shape[0]:
        raise DiffalignError(
            f"semantic cross-attention: batch {x.shape[0]} of latents vs {s.shape[0]} semantic"
        )


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The seed's attention: `softmax(Q K^T / sqrt(d)) V` with the full `[.., L, L]` matrix."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(scores, dim=-1) @ v


def seed_reference_forward(
    module: SemanticCrossAttention, x_t_tokens: torch.Tensor, semantic_tokens: torch.Tensor
) -> torch.Tensor:
    """The seed's forward with `module`'s weights: explicit `softmax(Q K^T) V` per layer.

    Obviously correct and O(L^2) in memory; the reference for tests and `bench/fill.py`.
    """
    _check_tokens(x_t_tokens, semantic_tokens, module.dim)
    x = x_t_tokens
    for layer in module.layers:
        q, k, v = layer.project(x, semantic_tokens)
        x = layer.finish(x, explicit_attention(q, k, v))
    return x


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors with the module shape in the metadata.


def save_semantic_module(
    path: str | os.PathLike, module: SemanticCrossAttention, layout: str | None = None
) -> None:
    """Write `module` as safetensors (atomically), recording dim/heads/layers in the metadata
    and, when given, the semantic token `layout` it was trained with."""
    from diffalign.engine.io import save_tensors

    meta = {"format": "diffalign.fill.SemanticCrossAttention"}
    meta.update({k: str(v) for k, v in module.config().items()})
    if layout is not None:
        meta["layout"] = str(layout)
    save_tensors(path, module.state_dict(), metadata=meta)


def semantic_tensor_shapes(dim: int, layers: int) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of a `SemanticCrossAttention(dim, heads, layers)` (heads
    change no shape), computed without building one."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        for norm in ("norm_x", "norm_s"):
            shapes[f"layers.{i}.{norm}.weight"] = (dim,)
            shapes[f"layers.{i}.{norm}.bias"] = (dim,)
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            shapes[f"layers.{i}.{proj}.weight"] = (dim, dim)
            shapes[f"layers.{i}.{proj}.bias"] = (dim,)
        shapes[f"layers.{i}.scale"] = ()
    return shapes


def semantic_module_from_tensors(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    source: str,
    expect: dict[str, int] | None = None,
) -> SemanticCrossAttention:
    """A module from its tensors and `meta` (`dim`, `heads`, `layers` as strings).

    `expect` (e.g. `{"dim": 64}`) must match the recorded shape; another shape, missing, extra
    or misshapen tensors are one DiffalignError naming `source`, checked before anything is
    allocated.
    """
    try:
        cfg = {k: int(meta[k]) for k in ("dim", "heads", "layers")}
    except (KeyError, ValueError):
        raise DiffalignError(
            f"{source}: not a semantic cross-attention checkpoint (no dim/heads/layers metadata)"
        ) from None
    for key, want in (expect or {}).items():
        if cfg.get(key) != want:
            raise DiffalignError(
                f"{source}: semantic module has {key}={cfg.get(key)}, this model needs {want}"
            )
    if min(cfg.values()) < 1 or cfg["dim"] % cfg["heads"]:
        raise DiffalignError(f"{source}: impossible semantic module shape {cfg}")
    per_layer = len(semantic_tensor_shapes(1, 1))
    if len(tensors) != per_layer * cfg["layers"]:  # before listing the keys of a huge claim
        raise DiffalignError(
            f"{source}: tensors do not match a SemanticCrossAttention{tuple(cfg.values())} "
            f"({len(tensors)} tensors, it has {per_layer * cfg['layers']})"
        )
    want_shapes = semantic_tensor_shapes(cfg["dim"], cfg["layers"])
    bad = sorted(set(want_shapes) ^ set(tensors)) + sorted(
        k for k in set(want_shapes) & set(tensors) if tuple(tensors[k].shape) != want_shapes[k]
    )
    if bad:
        raise DiffalignError(
            f"{source}: tensors do not match a SemanticCrossAttention{tuple(cfg.values())} "
            f"(first mismatch: {bad[0]})"
        )
    module = SemanticCrossAttention(**cfg)
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return module


def load_semantic_module(
    path: str | os.PathLike, expect: dict[str, int] | None = None
) -> SemanticCrossAttention:
    """Read a module written by `save_semantic_module` (`semantic_module_from_tensors` checks)."""
    from diffalign.engine.io import load_tensors

    tensors, meta = load_tensors(path)
    return semantic_module_from_tensors(tensors, meta, str(Path(path)), expect)
