"""Tiny random DINOv2 teachers in the real `facebook/dinov2-large` folder layout (seed 003 §3.3).

`make-tiny dinov2` writes `config.json` + `model.safetensors` + `preprocessor_config.json`, as the
Hub repo holds them, for a `Dinov2Model` with the real patch size (14) and image size (518), so
518 px inputs give the real 37 x 37 patch grid; only the width and depth are tiny.
`make-tiny dinov2-reg` writes the register variant (`Dinov2WithRegistersModel`, 4 registers, as
`facebook/dinov2-with-registers-large`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.engine.tiny import register_kind, require_positive

_OVERRIDES = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}

# facebook/dinov2-large's preprocessor_config.json (BitImageProcessor, 224 px crop). Our teacher
# does its own 518 px transform (seed 3.3); the file is kept for tools that read it.
PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


def build_tiny_dinov2(
    seed: int = 0,
    *,
    registers: bool = False,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
):
    """A tiny random `Dinov2Model` (or `Dinov2WithRegistersModel`) shaped like ViT-L/14 at 518."""
    import torch
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    require_positive(
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
    )
    common: dict[str, Any] = dict(
        hidden_size=num_attention_heads * attention_head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_swiglu_ffn=False,
        drop_path_rate=0.0,
    )
    torch.manual_seed(seed)
    if registers:
        return Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(num_register_tokens=4, **common)
        ).eval()
    return Dinov2Model(Dinov2Config(**common)).eval()


def _save(model, out: Path) -> None:
    import json

    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")


@register_kind(
    "dinov2",
    "transformers Dinov2Model shaped like facebook/dinov2-large (patch 14, 518 px, 37x37 grid)",
    _OVERRIDES,
)
def _build_dinov2(out: Path, seed: int, **overrides: Any) -> None:
    _save(build_tiny_dinov2(seed, **overrides), out)


@register_kind(
    "dinov2-reg",
    "Dinov2WithRegistersModel (4 register tokens) like facebook/dinov2-with-registers-large",
    _OVERRIDES,
)
def _build_dinov2_reg(out: Path, seed: int, **overrides: Any) -> None:
    _save(build_tiny_dinov2(seed, registers=True, **overrides), out)
