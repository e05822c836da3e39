"""LoRA export shared by the capabilities: a peft-wrapped U-Net's adapter written in diffusers'
layout (`pytorch_lora_weights.safetensors`, read back by `pipe.load_lora_weights(folder)`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name


def save_unet_lora(
    pipeline_cls: Any,
    out_dir: str | os.PathLike,
    unet: Any,
    adapter_name: str | None = None,
    dtype: Any = None,
) -> Path:
    """Write the U-Net adapter `adapter_name` (peft's default when None) with
    `pipeline_cls.save_lora_weights` (diffusers' key names); `dtype` casts the weights (None:
    as trained). Returns the written file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kw = {} if adapter_name is None else {"adapter_name": adapter_name}
    lora = get_peft_model_state_dict(unet, **kw)
    lora = {
        k: (v.detach().to(dtype) if dtype is not None else v.detach()).cpu().contiguous()
        for k, v in lora.items()
    }
    pipeline_cls.save_lora_weights(
        str(out_dir),
        unet_lora_layers=convert_state_dict_to_diffusers(lora),
        safe_serialization=True,
    )
    return Path(out_dir) / LORA_WEIGHTS_FILE


def save_transformer_lora(pipeline_cls: Any, out_dir: str | os.PathLike, transformer: Any) -> Path:
    """Write a peft-wrapped transformer's adapter in diffusers' LoRA layout: through
    `pipeline_cls.save_lora_weights(transformer_lora_layers=...)` (read back by
    `pipe.load_lora_weights(folder)`)."""
    from peft.utils import get_peft_model_state_dict

    lora = {
        k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()
    }
    pipeline_cls.save_lora_weights(
        str(out_dir), transformer_lora_layers=lora, safe_serialization=True
    )
    return Path(out_dir) / LORA_WEIGHTS_FILE
