"""`make-tiny hyper-sd`: the ByteDance/Hyper-SD 1-step files for the tiny SD 1.5 / SDXL models.

Writes the release's file names into one folder (as `diffalign download --only hyper-sd`
does for the real ones):

- `Hyper-SD15-1step-lora.safetensors`: a LoRA for the U-Net of `make-tiny sd15` (same seed and
  sizes) in the kohya layout the SD 1.5 Hyper-SD LoRAs use: `lora_unet_<module path with _>.
  {lora_down.weight, lora_up.weight, alpha}` on the attention projections and feed-forward
  layers; diffusers' `load_lora_weights` converts it to peft names on load.
- `Hyper-SDXL-1step-Unet.safetensors`: a full diffusers `UNet2DConditionModel` state dict for
  the U-Net config of `make-tiny sdxl` (loaded with `unet.load_state_dict`, as the release card
  shows), with its own random weights.

The folder carries the release's model card (`README.md`: ByteDance/Hyper-SD).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from diffalign.engine import releases
from diffalign.engine.tiny import register_kind

HYPER_SD15_LORA = "Hyper-SD15-1step-lora.safetensors"
HYPER_SDXL_UNET = "Hyper-SDXL-1step-Unet.safetensors"
_LORA_TARGETS = re.compile(r".*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)$")


def kohya_lora_state_dict(unet, rank: int = 4, scale: float = 0.2, seed: int = 0) -> dict:
    """Random LoRA factors for every targeted Linear of `unet`, in kohya key layout."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or not _LORA_TARGETS.match(name):
            continue
        r = min(rank, module.in_features, module.out_features)
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = torch.randn(r, module.in_features, generator=g) * scale
        out[f"{key}.lora_up.weight"] = torch.randn(module.out_features, r, generator=g) * scale
        out[f"{key}.alpha"] = torch.tensor(float(r))
    return out


@register_kind(
    "hyper-sd",
    "the Hyper-SD 1-step release files for the tiny sd15 / sdxl models: "
    f"{HYPER_SD15_LORA} (kohya-layout LoRA) and {HYPER_SDXL_UNET} (full U-Net state dict)",
    {"block_out_channels": (8, 16), "layers_per_block": 1, "text_hidden_size": 32},
)
def _build_hyper_sd(out: Path, seed: int, **overrides: Any) -> None:
    import torch

    from diffalign.engine.io import save_tensors
    from diffalign.engine.tiny_sd import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline

    sd15 = build_tiny_sd15_pipeline(seed, **overrides)
    save_tensors(
        Path(out) / HYPER_SD15_LORA,
        kohya_lora_state_dict(sd15.unet, seed=seed + 11),
        metadata={"format": "pt"},
    )
    # the Hyper-SDXL U-Net: the tiny sdxl U-Net's config with weights of its own
    unet = build_tiny_sdxl_pipeline(seed, **overrides).unet
    torch.manual_seed(seed + 23)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_tensors(Path(out) / HYPER_SDXL_UNET, dict(unet.state_dict()), metadata={"format": "pt"})
    releases.write_model_card(
        out,
        releases.HYPER_SD,
        f"Tiny random stand-in for {releases.HYPER_SD.hub_id}, written by "
        "`diffalign make-tiny hyper-sd`.",
    )
