"""Tiny U-Net pipelines in the real on-disk layouts: SD 1.5, SD 2.1 (SD-Turbo) and SDXL (Turbo).

Each kind writes the folder `save_pretrained` writes for the real release (`model_index.json`,
`unet/`, `vae/`, `text_encoder*/`, `tokenizer*/`, `scheduler/`) with the real component classes
and scheduler configs, only with a few thousand random weights; the VAE keeps the real 8x
downsampling, so an image of H x W pixels has an H/8 x W/8 latent as with the real models.
Each folder also carries the model card (`README.md` front matter and title) of the release it
stands for, which is how a folder identifies itself (`engine.releases`): `sd15` is SD 1.5 (a
base model, not one-step), `sd21` is SD-Turbo, `sdxl` is SDXL-Turbo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.engine import releases
from diffalign.engine.errors import DiffalignError
from diffalign.engine.tiny import register_kind, tiny_clip_text_config, tiny_clip_tokenizer

_UNET_OVERRIDES = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "text_hidden_size": 32,
}


def _check_sizes(block_out_channels, layers_per_block: int, text_hidden_size: int) -> tuple:
    channels = tuple(int(c) for c in block_out_channels)
    if len(channels) < 2 or any(c < 2 or c % 2 for c in channels):
        raise DiffalignError(
            "make-tiny: block_out_channels needs at least two even widths, e.g. 8,16"
        )
    if int(layers_per_block) < 1 or int(text_hidden_size) < 8 or int(text_hidden_size) % 4:
        raise DiffalignError(
            "make-tiny: layers_per_block must be >= 1 and text_hidden_size a multiple of 4 (>= 8)"
        )
    return channels


def _tiny_vae(seed: int, scaling_factor: float, force_upcast: bool = False):
    """AutoencoderKL with 4 levels (8x downsampling, 4 latent channels) like the SD VAEs."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    ).eval()


def _sd_unet(seed: int, channels: tuple, layers_per_block: int, cross_dim: int, **extra: Any):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_dim,
        norm_num_groups=2,
        **extra,
    ).eval()


def _build_sd_pipeline(
    seed: int, block_out_channels, layers_per_block: int, text_hidden_size: int, *, sd2: bool
):
    """The StableDiffusionPipeline both SD 1.5 and SD 2.1 use; `sd2` switches SD 2.x's wiring."""
    import torch
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    channels = _check_sizes(block_out_channels, layers_per_block, text_hidden_size)
    if sd2:  # linear projections and per-level head widths
        extra = {
            "attention_head_dim": tuple(max(1, c // 4) for c in channels),
            "use_linear_projection": True,
        }
    else:
        extra = {"attention_head_dim": 2}
    unet = _sd_unet(seed, channels, layers_per_block, text_hidden_size, **extra)
    vae = _tiny_vae(seed + 1, scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    config = tiny_clip_text_config(text_hidden_size, heads=4)
    if sd2:
        config.hidden_act = "gelu"  # OpenCLIP-H's activation
    text_encoder = CLIPTextModel(config).eval()
    betas = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
    if sd2:  # SD-Turbo's scheduler
        scheduler = EulerDiscreteScheduler(timestep_spacing="trailing", **betas)
    else:  # SD 1.5's
        scheduler = PNDMScheduler(set_alpha_to_one=False, skip_prk_steps=True, **betas)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd15_pipeline(
    seed: int = 0,
    *,
    block_out_channels=(8, 16),
    layers_per_block: int = 1,
    text_hidden_size: int = 32,
):
    """A tiny random `StableDiffusionPipeline` wired like SD 1.5 (no safety checker)."""
    return _build_sd_pipeline(
        seed, block_out_channels, layers_per_block, text_hidden_size, sd2=False
    )


def build_tiny_sd21_pipeline(
    seed: int = 0,
    *,
    block_out_channels=(8, 16),
    layers_per_block: int = 1,
    text_hidden_size: int = 32,
):
    """A tiny random `StableDiffusionPipeline` wired like SD 2.1 base / SD-Turbo.

    SD 2.x: OpenCLIP-H text encoder (stored as a transformers CLIPTextModel, gelu), linear
    projections in the transformer blocks, per-level head widths; the scheduler is SD-Turbo's
    (Euler, trailing spacing, epsilon prediction).
    """
    return _build_sd_pipeline(
        seed, block_out_channels, layers_per_block, text_hidden_size, sd2=True
    )


def build_tiny_sdxl_pipeline(
    seed: int = 0,
    *,
    block_out_channels=(8, 16),
    layers_per_block: int = 1,
    text_hidden_size: int = 32,
):
    """A tiny random `StableDiffusionXLPipeline` wired like SDXL-Turbo.

    Two text encoders (CLIP-L without and OpenCLIP-G with projection; the U-Net's cross-attention
    width is the sum of their widths), `text_time` added conditioning, first level without
    attention, EulerAncestral with trailing spacing (SDXL-Turbo's scheduler), VAE scale 0.13025.
    """
    import torch
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    channels = _check_sizes(block_out_channels, layers_per_block, text_hidden_size)
    levels = len(channels)
    hidden = int(text_hidden_size)
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        attention_head_dim=tuple(max(1, c // 4) for c in channels),
        transformer_layers_per_block=tuple(1 if i < 2 else 2 for i in range(levels)),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden,
        cross_attention_dim=2 * hidden,
        norm_num_groups=2,
    ).eval()
    vae = _tiny_vae(seed + 1, scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_text_config(hidden, heads=4)).eval()
    config_2 = tiny_clip_text_config(hidden, heads=4, projection_dim=hidden)
    config_2.hidden_act = "gelu"
    text_encoder_2 = CLIPTextModelWithProjection(config_2).eval()
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )


@register_kind(
    "sd15",
    "StableDiffusionPipeline shaped like SD 1.5 (U-Net with a cross-attention mid block, CLIP "
    "text encoder, 8x VAE with scale 0.18215, PNDM scheduler, no safety checker); its model "
    "card is SD 1.5's (a base model, not one-step)",
    _UNET_OVERRIDES,
)
def _build_sd15(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_sd15_pipeline(seed, **overrides).save_pretrained(out)
    _card(out, "sd15", releases.SD15)


@register_kind(
    "sd21",
    "StableDiffusionPipeline shaped like SD 2.1 base / SD-Turbo (linear projections, Euler "
    "trailing scheduler); its model card is SD-Turbo's, so it runs as sd-turbo",
    _UNET_OVERRIDES,
)
def _build_sd21(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_sd21_pipeline(seed, **overrides).save_pretrained(out)
    _card(out, "sd21", releases.SD_TURBO)


@register_kind(
    "sdxl",
    "StableDiffusionXLPipeline shaped like SDXL-Turbo (2 text encoders, text_time conditioning, "
    "EulerAncestral trailing, VAE scale 0.13025); its model card is SDXL-Turbo's",
    _UNET_OVERRIDES,
)
def _build_sdxl(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_sdxl_pipeline(seed, **overrides).save_pretrained(out)
    _card(out, "sdxl", releases.SDXL_TURBO)


def _card(out: Path, kind: str, release: releases.Release) -> None:
    releases.write_model_card(
        out,
        release,
        f"Tiny random stand-in for {release.hub_id}, written by `diffalign make-tiny {kind}`.",
    )
