"""F: FLUX.1-Fill in-context inpainting with a semantic cross-attention branch (seed 004).

Public API (spec F):

    from diffalign.fill import SemanticCrossAttention
    m = SemanticCrossAttention(dim=64, heads=8, layers=1)
    enhanced = m(x_t_tokens, semantic_tokens)            # [B, L, 64] each

    from diffalign.fill import attach_semantic           # a trained module on a plain
    attach_semantic(pipe, "checkpoint-final", "semantic.png")   # diffusers FluxFillPipeline

    from diffalign.fill.encode import FillEncoder, TextCache
    from diffalign.fill.data import TriptychDataset, split_triptych

Imports are lazy so that `diffalign --help` does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "SemanticCrossAttention",
    "SemanticCrossAttentionLayer",
    "seed_reference_forward",
    "explicit_attention",
    "save_semantic_module",
    "load_semantic_module",
    "FillEncoder",
    "TextCache",
    "TriptychDataset",
    "split_triptych",
    "attach_semantic",
    "SemanticAttachment",
]

_WHERE = {
    "SemanticCrossAttention": "attention",
    "SemanticCrossAttentionLayer": "attention",
    "seed_reference_forward": "attention",
    "explicit_attention": "attention",
    "save_semantic_module": "attention",
    "load_semantic_module": "attention",
    "FillEncoder": "encode",
    "TextCache": "encode",
    "TriptychDataset": "data",
    "split_triptych": "data",
    "attach_semantic": "attach",
    "SemanticAttachment": "attach",
}

if TYPE_CHECKING:
    from diffalign.fill.attach import SemanticAttachment, attach_semantic
    from diffalign.fill.attention import (
        SemanticCrossAttention,
        SemanticCrossAttentionLayer,
        explicit_attention,
        load_semantic_module,
        save_semantic_module,
        seed_reference_forward,
    )
    from diffalign.fill.data import TriptychDataset, split_triptych
    from diffalign.fill.encode import FillEncoder, TextCache


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"diffalign.fill.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'diffalign.fill' has no attribute {name!r}")
