"""Tiny few-step transformer generators in their releases' on-disk layouts (spec E; issue 17).

- `sd35-turbo`: `StableDiffusion3Pipeline` shaped like stabilityai/stable-diffusion-3.5-large-turbo
  (SD3.5-Large: RMS qk-norm, no dual-attention layers; FlowMatchEuler with shift 3);
- `sana-sprint`: `SanaSprintPipeline` shaped like Efficient-Large-Model/Sana_Sprint_1.6B_1024px
  (linear-attention DiT with guidance embedding, a DC-AE with 32x downsampling and 32 latent
  channels, a tiny Gemma2 text encoder with an offline Gemma tokenizer, SCM scheduler);
- `pixart-dmd`: `PixArtAlphaPipeline` with the PixArt-alpha DMD transformer layout
  (PixArtTransformer2DModel with learned sigma, T5 encoder, 8x SD VAE, DDPM scheduler).

Each folder is what the pipeline's `save_pretrained` writes, loaded by the pipeline's own
`from_pretrained`, plus a model card (README.md) naming the release it stands for, as the real
Hub repos carry one (`write_model_card`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.engine.tiny import (
    register_kind,
    require_positive,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

SD35_TURBO_RELEASE = "stabilityai/stable-diffusion-3.5-large-turbo"
SANA_SPRINT_RELEASE = "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers"
PIXART_DMD_RELEASE = "PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512"
MODEL_CARD = "README.md"


def write_model_card(out: str | Path, release: str, title: str, pipeline_class: str) -> None:
    """The release's model card (title and `from_pretrained("<repo id>")`, the format of
    `tiny_flux1.release_model_card`), marked as tiny random weights."""
    from diffalign.engine.tiny_flux1 import release_model_card

    card = release_model_card(title, release, pipeline_class, "few-step generator")
    (Path(out) / MODEL_CARD).write_text(card, encoding="utf-8")


# ------------------------------------------------------------------------------ SD3.5 Large Turbo


@register_kind(
    "sd35-turbo",
    "StableDiffusion3Pipeline shaped like SD3.5-Large-Turbo (MMDiT with RMS qk-norm, 2x CLIP + "
    "T5, 16-channel VAE, FlowMatchEuler shift 3); model card names the release",
    {"num_layers": 2, "num_attention_heads": 4, "attention_head_dim": 8, "sample_size": 16},
)
def _build_sd35_turbo(out: Path, seed: int, **overrides: Any) -> None:
    from diffalign.engine.tiny import build_tiny_sd3_pipeline, tiny_latent16_vae

    pipe = build_tiny_sd3_pipeline(seed, qk_norm="rms_norm", **overrides)
    vae = tiny_latent16_vae(seed + 3, shift_factor=0.0609, scaling_factor=1.5035)
    pipe.register_modules(vae=vae)
    pipe.save_pretrained(out)
    write_model_card(
        out, SD35_TURBO_RELEASE, "Stable Diffusion 3.5 Large Turbo", "StableDiffusion3Pipeline"
    )


# ------------------------------------------------------------------------------ SANA-Sprint


def tiny_gemma_tokenizer(model_max_length: int = 512):
    """A Gemma tokenizer (BPE with byte fallback, the real class and files) over the printable
    ASCII characters and the `▁` space marker, built without the Hub."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in [chr(i) for i in range(33, 127)] + ["\u2581"]:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_tiny_sana_sprint_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    text_hidden_size: int = 16,
):
    """A tiny random `SanaSprintPipeline` wired like SANA-Sprint 1.6B (see module doc)."""
    import torch
    from diffusers import AutoencoderDC, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler
    from transformers import Gemma2Config, Gemma2Model

    require_positive(
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        text_hidden_size=text_hidden_size,
    )
    width = num_attention_heads * attention_head_dim
    latent = 32  # DC-AE f32c32, as the real model
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=latent,
        out_channels=latent,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        num_cross_attention_heads=num_attention_heads,
        cross_attention_head_dim=attention_head_dim,
        cross_attention_dim=width,
        caption_channels=text_hidden_size,
        sample_size=32,
        patch_size=1,
        qk_norm="rms_norm_across_heads",
        guidance_embeds=True,
        guidance_embeds_scale=0.1,
        timestep_scale=1.0,
    )
    torch.manual_seed(seed + 1)
    levels = 6  # 32x downsampling, as the real DC-AE
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=latent,
        attention_head_dim=4,
        encoder_block_types=("ResBlock",) * (levels - 1) + ("EfficientViTBlock",),
        decoder_block_types=("ResBlock",) * (levels - 1) + ("EfficientViTBlock",),
        encoder_block_out_channels=(4, 4, 8, 8, 16, 32),
        decoder_block_out_channels=(4, 4, 8, 8, 16, 32),
        encoder_layers_per_block=(1,) * levels,
        decoder_layers_per_block=(1,) * levels,
        encoder_qkv_multiscales=((),) * (levels - 1) + ((5,),),
        decoder_qkv_multiscales=((),) * (levels - 1) + ((5,),),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    torch.manual_seed(seed + 2)
    tokenizer = tiny_gemma_tokenizer()
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden_size,
            intermediate_size=2 * text_hidden_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            attn_implementation="eager",
        )
    ).eval()
    scheduler = SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    return SanaSprintPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


@register_kind(
    "sana-sprint",
    "SanaSprintPipeline shaped like SANA-Sprint 1.6B (guidance-embedded linear DiT, DC-AE 32x / "
    "32 channels, tiny Gemma2 + offline Gemma tokenizer, SCM scheduler); model card names it",
    {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "text_hidden_size": 16},
)
def _build_sana_sprint(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_sana_sprint_pipeline(seed, **overrides).save_pretrained(out)
    write_model_card(out, SANA_SPRINT_RELEASE, "SANA-Sprint 1.6B 1024px", "SanaSprintPipeline")


# ------------------------------------------------------------------------------ PixArt-alpha DMD


def build_tiny_pixart_dmd_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    text_hidden_size: int = 32,
):
    """A tiny random `PixArtAlphaPipeline` with the DMD transformer's layout: PixArt-XL-2
    structure (adaLN-single, cross-attention to T5, learned sigma: 8 output channels for 4
    latent ones, patch 2, sample size 64 = 512 px), the SD VAE (8x) and a DDPM scheduler."""
    import torch
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from diffalign.engine.tiny_sd import _tiny_vae

    require_positive(
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        text_hidden_size=text_hidden_size,
    )
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=64,
        patch_size=2,
        cross_attention_dim=num_attention_heads * attention_head_dim,
        caption_channels=text_hidden_size,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = _tiny_vae(seed + 1, scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    t5 = tiny_t5_encoder(text_hidden_size)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )
    return PixArtAlphaPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=t5,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


@register_kind(
    "pixart-dmd",
    "PixArtAlphaPipeline with the PixArt-alpha DMD 512px transformer layout (learned sigma, T5, "
    "8x VAE, DDPM scheduler for one step at t = 400); model card names the release",
    {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "text_hidden_size": 32},
)
def _build_pixart_dmd(out: Path, seed: int, **overrides: Any) -> None:
    build_tiny_pixart_dmd_pipeline(seed, **overrides).save_pretrained(out)
    write_model_card(
        out, PIXART_DMD_RELEASE, "PixArt-Alpha-DMD-XL-2-512x512", "PixArtAlphaPipeline"
    )
