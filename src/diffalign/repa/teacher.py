"""The DINOv2 teacher: 518 px transform, patch tokens, 16 x 16 grid, L2 norm (seed 003 §3.3).

One function makes the teacher tokens both for the cached store (`repa preprocess dino`) and for
the online teacher inside a training step, so the two agree exactly.

Token layout. At 518 px DINOv2 ViT-L/14 has a 37 x 37 patch grid (1369 tokens after the CLS and
register tokens). The seed slices the first 1296 tokens and views them as 36 x 36, so its row i
holds patches (36 i + j) of the 37-wide grid: every row starts one patch further left than the
one above it, and rows no longer line up with the image. `layout="grid"` (our default) reshapes
the tokens to their real 37 x 37 grid before pooling; `layout="seed"` reproduces the seed's caches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffalign.engine.errors import DiffalignError, ModelNotFoundError

if TYPE_CHECKING:
    from torch import nn

DEFAULT_DINO = "dinov2-large"  # the `diffalign download` asset name
DINO_HUB_ID = "facebook/dinov2-large"
DINO_SIZE = 518  # 37 x 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKEN_LAYOUTS = ("grid", "seed")


def _resolve_dino(model: str) -> tuple[str, bool]:
    """(folder or Hub id, is_local) for a `--dino-model` value."""
    from diffalign.engine.loading import _HUB_ID, LEGACY_MODELS_DIR, models_dir

    text = str(model).strip()
    if not text:
        raise DiffalignError("--dino-model is empty")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                text, DEFAULT_DINO, "not a transformers DINOv2 folder: no config.json"
            )
        return str(path), True
    if path.exists():
        raise DiffalignError(f"--dino-model {text}: expected a transformers model folder")
    if text.lower() in {DEFAULT_DINO, DINO_HUB_ID}:
        for base in (models_dir(), Path(LEGACY_MODELS_DIR)):
            if (base / DEFAULT_DINO / "config.json").is_file():
                return str((base / DEFAULT_DINO).absolute()), True
        return DINO_HUB_ID, False
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return text, False
    raise ModelNotFoundError(text, DEFAULT_DINO, "no such folder, and not a Hub id (org/name)")


def load_dino(
    model_path_or_id: str = DEFAULT_DINO,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "float32",
) -> nn.Module:
    """A frozen, eval-mode `Dinov2Model` or `Dinov2WithRegistersModel` (seed §3.3: ViT-L/14).

    `model_path_or_id`: a local transformers folder, a Hub id, or `dinov2-large` (default: the
    `diffalign download --only dinov2-large` folder, else `facebook/dinov2-large` from the Hub).
    """
    from transformers import AutoModel, Dinov2Model, Dinov2WithRegistersModel

    from diffalign.engine.loading import (
        _hub_errors,
        _tf_dtype_kw,
        damaged_weights,
        hub_offline,
        parse_dtype,
        require_component,
    )

    source, local = _resolve_dino(model_path_or_id)
    if local:
        default = str(model_path_or_id).strip().lower() in {DEFAULT_DINO, DINO_HUB_ID}
        fetch = DEFAULT_DINO if default else None
        require_component(source, None, "transformers", "Dinov2Model", fetch)
    try:
        model = AutoModel.from_pretrained(
            source,
            local_files_only=local or hub_offline(),
            **_tf_dtype_kw(parse_dtype(dtype)),
        )
    except (*_hub_errors(), KeyError) as e:
        damaged = damaged_weights(str(model_path_or_id), source, DEFAULT_DINO) if local else None
        if damaged is not None:
            raise damaged from None
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not local and hub_offline():
            detail = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1"
        raise ModelNotFoundError(str(model_path_or_id), DEFAULT_DINO, detail[:240]) from None
    if not isinstance(model, Dinov2Model | Dinov2WithRegistersModel):
        raise DiffalignError(
            f"--dino-model {model_path_or_id} is a {type(model).__name__}, not a DINOv2 model "
            "(Dinov2Model / Dinov2WithRegistersModel)"
        )
    model.requires_grad_(False)
    return model.eval().to(device)


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens in `last_hidden_state`: CLS plus the register tokens."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def check_grid(model: nn.Module, grid: int, layout: str = "grid") -> None:
    """Refuse a token grid finer than the teacher's patch grid at DINO_SIZE (37 for patch 14;
    36 in the seed layout): pooling would repeat tokens, not average them."""
    side = DINO_SIZE // int(model.config.patch_size) - (1 if layout == "seed" else 0)
    if grid > side:
        raise DiffalignError(
            f"--grid {grid} is finer than the teacher's {side}x{side} patch grid: tokens would be "
            f"repeated, not pooled (use a grid of at most {side})"
        )


def dino_preprocess(images: torch.Tensor, size: int = DINO_SIZE) -> torch.Tensor:
    """Seed §3.3 transform on tensors: resize the shorter side to `size` (bicubic, antialiased),
    centre crop `size`, ImageNet mean/std. `images`: float [B, 3, H, W] in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise DiffalignError(f"DINOv2 input must be [B, 3, H, W], got {list(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        # antialiased bicubic is PIL's filter (a = -0.5); clamping and rounding to 1/255 steps
        # mirror the seed's resize of a uint8 PIL image (mean difference 0.14 / 255 from PIL)
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
        )
        x = x.clamp(0.0, 1.0).mul(255.0).round().div(255.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def pool_patch_tokens(tokens: torch.Tensor, layout: str = "grid", grid: int = 16) -> torch.Tensor:
    """Patch tokens `[B, side*side, D]` -> `[B, grid*grid, D]` by adaptive average pooling.

    `layout="grid"`: the tokens' real `side x side` grid (row-major, as ViT emits them).
    `layout="seed"`: the seed's §3.3 code: the first `(side-1)^2` tokens viewed as
    `(side-1) x (side-1)` (1296 of 1369 as 36 x 36 at 518 px), which shifts every row.
    Not normalised (see `dino_tokens`).
    """
    if layout not in TOKEN_LAYOUTS:
        raise DiffalignError(f"unknown token layout '{layout}'; choose one of {TOKEN_LAYOUTS}")
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise DiffalignError(f"{n} patch tokens do not form a square grid")
    if layout == "seed":
        side -= 1
        tokens = tokens[:, : side * side, :]
    x = tokens.reshape(b, side, side, d).permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, (grid, grid))
    return x.permute(0, 2, 3, 1).reshape(b, grid * grid, d)


@torch.no_grad()
def dino_tokens(
    model: nn.Module,
    images: torch.Tensor,
    *,
    grid: int = 16,
    layout: str = "grid",
    preprocess: bool = True,
) -> torch.Tensor:
    """Teacher tokens `[B, grid*grid, D]`, L2-normalised, float32 (seed §3.3).

    `images`: float [B, 3, H, W] in [0, 1] (transformed here by `dino_preprocess`), or with
    `preprocess=False` the pixel values `dino_preprocess` made. Patch tokens are the post-norm
    `last_hidden_state` without CLS and register tokens.
    """
    param = next(model.parameters())
    pixels = dino_preprocess(images) if preprocess else images
    hidden = model(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state
    patches = hidden[:, num_prefix_tokens(model) :, :].float()
    return F.normalize(pool_patch_tokens(patches, layout, grid), dim=-1)
