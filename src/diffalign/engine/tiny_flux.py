"""`diffalign make-tiny flux-fill`: a tiny random FLUX.1-Fill-dev in the real on-disk layout.

The folder is what `FluxFillPipeline.save_pretrained` writes for black-forest-labs/FLUX.1-Fill-dev:
`model_index.json`, `transformer/` (FluxTransformer2DModel, `guidance_embeds=True`), `vae/`
(AutoencoderKL with FLUX's shift/scale factors, no quant convs), `text_encoder/` (CLIPTextModel),
`text_encoder_2/` (T5EncoderModel), `tokenizer/`, `tokenizer_2/` and `scheduler/`
(FlowMatchEulerDiscreteScheduler with Fill-dev's dynamic-shift config).

The channel counts are the REAL ones, only the widths and depths are tiny: the VAE has four
blocks (8x downsampling, so panels must be divisible by 16 exactly as for the real model) and
16 latent channels, so packed latents have 64 channels, the fill condition 320 (64 masked-image +
256 mask channels) and the transformer input 384, as in FLUX.1-Fill-dev (spec F, DIFFUSERS-FACTS
"FLUX Fill").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError
from diffalign.engine.tiny import (
    register_kind,
    require_positive,
    tiny_clip_text_config,
    tiny_clip_tokenizer,
    tiny_latent16_vae,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

# FLUX.1-Fill-dev's scheduler/scheduler_config.json (the same as FLUX.1-dev).
FLUX_FILL_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# FLUX.1 VAE latent normalisation (vae/config.json of FLUX.1-dev / Fill-dev).
FLUX_VAE_SHIFT_FACTOR = 0.1159
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_LATENT_CHANNELS = 16  # real: packed latents 4 * 16 = 64 channels

_FLUX_FILL_OVERRIDES: dict[str, Any] = {
    "num_layers": 1,
    "num_single_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "joint_attention_dim": 32,
    "clip_hidden_size": 32,
}


def flux_rope_axes(attention_head_dim: int) -> list[int]:
    """Three even RoPE axes summing to the head dim, split like FLUX's [16, 56, 56] of 128."""
    if attention_head_dim % 8:
        raise DiffalignError(
            f"make-tiny: attention_head_dim must be a multiple of 8 (RoPE axes), got "
            f"{attention_head_dim}"
        )
    axis0 = max(2, 2 * round(attention_head_dim / 16))
    axis1 = 2 * ((attention_head_dim - axis0) // 4)
    return [axis0, axis1, attention_head_dim - axis0 - axis1]


def tiny_flux_components(
    seed: int,
    *,
    in_channels: int,
    out_channels: int | None,
    guidance_embeds: bool,
    scheduler_config: dict[str, Any],
    num_layers: int,
    num_single_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    joint_attention_dim: int,
    clip_hidden_size: int,
) -> dict[str, Any]:
    """The components every tiny FLUX.1 pipeline is built from (its constructor's keywords).

    The transformer (seed), CLIP (seed + 1, width `clip_hidden_size` = the pooled projection
    width, as CLIP-L's 768 in the real model), T5 (seed + 2, width `joint_attention_dim`), the
    16-channel VAE with FLUX's shift/scale factors (seed + 3) and the scheduler. Bad sizes raise
    `DiffalignError`; `attention_head_dim` must be divisible by 8 (`flux_rope_axes`).
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    require_positive(
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        joint_attention_dim=joint_attention_dim,
        clip_hidden_size=clip_hidden_size,
    )
    axes = flux_rope_axes(attention_head_dim)
    if clip_hidden_size % 2 or joint_attention_dim % 4:
        raise DiffalignError(
            "make-tiny: clip_hidden_size must be even, joint_attention_dim % 4 == 0"
        )

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=clip_hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=axes,
    )

    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(tiny_clip_text_config(clip_hidden_size)).eval()

    torch.manual_seed(seed + 2)
    t5 = tiny_t5_encoder(joint_attention_dim)

    vae = tiny_latent16_vae(
        seed + 3, shift_factor=FLUX_VAE_SHIFT_FACTOR, scaling_factor=FLUX_VAE_SCALING_FACTOR
    )

    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler_config),
        "vae": vae,
        "text_encoder": clip,
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": t5,
        "tokenizer_2": tiny_t5_tokenizer(),
        "transformer": transformer,
    }


def build_tiny_flux_fill_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    joint_attention_dim: int = 32,
    clip_hidden_size: int = 32,
):
    """A tiny random `FluxFillPipeline` in memory, wired like FLUX.1-Fill-dev.

    `joint_attention_dim` is the T5 width, `clip_hidden_size` the CLIP width (= the pooled
    projection width, as CLIP-L's 768 in the real model). `attention_head_dim` must be divisible
    by 8 (the three even RoPE axes split it about 1/8, 7/16, 7/16, like 16/56/56 of 128).
    """
    from diffusers import FluxFillPipeline

    packed = 4 * FLUX_LATENT_CHANNELS  # 2x2 patches
    vae_scale = 8  # four VAE blocks, as the real FLUX VAE
    mask_packed = 4 * vae_scale * vae_scale  # 8x8 pixel-unshuffled mask, packed: 256
    return FluxFillPipeline(
        **tiny_flux_components(
            seed,
            in_channels=packed + packed + mask_packed,  # 64 + 64 + 256 = 384 as Fill-dev
            out_channels=packed,
            guidance_embeds=True,
            scheduler_config=FLUX_FILL_SCHEDULER_CONFIG,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            joint_attention_dim=joint_attention_dim,
            clip_hidden_size=clip_hidden_size,
        )
    )


@register_kind(
    "flux-fill",
    "FluxFillPipeline shaped like FLUX.1-Fill-dev (guidance-distilled MMDiT, 384 = 64 latent + "
    "320 fill-condition input channels, CLIP + T5, 16-channel VAE)",
    _FLUX_FILL_OVERRIDES,
)
def _build_flux_fill(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_flux_fill_pipeline(seed, **overrides).save_pretrained(out)
