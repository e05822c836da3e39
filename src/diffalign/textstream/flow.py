"""What `textstream cache` and `train-weights` need from a model family (spec T: learned weights):
how its pipeline loads (with or without text encoders), what is cached (VAE latents, text
embeddings) and how its transformer predicts a velocity from cached tensors and samples images.

One class per family, registered in `FAMILIES` by the name a cache records in `job.json`
(SD3 / SD3.5 now; FLUX.1 and Qwen-Image add theirs beside their block adapters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError

_TEXT_PARTS = (
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)


class SD3Flow:
    """SD3 / SD3.5 (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`).

    Latents: `(VAE posterior mean - shift_factor) * scaling_factor`, `[16, R/8, R/8]`. Text: the
    pipeline's joint embeddings (CLIP-L + CLIP-G zero-padded to the T5 width, 77 tokens, then
    the T5 tokens) and the pooled CLIP embeddings.
    """

    name = "sd3"

    @staticmethod
    def load(
        model: str,
        *,
        dtype: Any = "float32",
        device: str = "cpu",
        text: bool = True,
        single_file_config: str | None = None,
    ):
        """The pipeline; `text=False` leaves out the text encoders and tokenizers."""
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        from diffalign.engine.loading import load_pipeline

        pipe = load_pipeline(
            model,
            StableDiffusion3Pipeline,
            "sd3",
            dtype=dtype,
            device=device,
            single_file_config=single_file_config,
            expect={"transformer": SD3Transformer2DModel},
            **({} if text else dict.fromkeys(_TEXT_PARTS)),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
        factor = int(pipe.vae_scale_factor)
        multiple = factor * int(pipe.transformer.config.patch_size)
        if resolution % multiple:
            raise DiffalignError(
                f"--resolution {resolution} must be a multiple of {multiple} for this model"
            )
        side = resolution // factor
        return (int(pipe.vae.config.latent_channels), side, side)

    @staticmethod
    @torch.no_grad()
    def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, R, R]` in [-1, 1] -> scaled latents (posterior mean), float32 on the CPU."""
        vae = pipe.vae
        p = next(vae.parameters())
        mean = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.mean.float()
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        return ((mean - shift) * float(vae.config.scaling_factor)).cpu()

    @staticmethod
    @torch.no_grad()
    def encode_text(
        pipe, captions: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds `[B, L, D]`, pooled `[B, P]`), float32 on the CPU."""
        device = next(pipe.transformer.parameters()).device
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=list(captions),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            max_sequence_length=int(max_sequence_length),
        )
        return pe.float().cpu(), pooled.float().cpu()

    @staticmethod
    def check_shapes(transformer, shapes: dict[str, list[int]]) -> list[tuple[str, int, int]]:
        """(what, cached, needed) for every cached width the transformer does not take."""
        cfg = transformer.config
        pairs = {
            "latent channels": (shapes["latents"][0], int(cfg.in_channels)),
            "text width": (shapes["prompt_embeds"][-1], int(cfg.joint_attention_dim)),
            "pooled width": (shapes["pooled"][-1], int(cfg.pooled_projection_dim)),
        }
        return [(k, a, b) for k, (a, b) in pairs.items() if a != b]

    @staticmethod
    def velocity(
        transformer,
        xs: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        """The transformer's velocity at `xs` (timestep in the scheduler's 0..1000 units)."""
        dtype = next(transformer.parameters()).dtype
        return transformer(
            hidden_states=xs.to(dtype),
            timestep=timestep,
            encoder_hidden_states=prompt_embeds.to(xs.device, dtype),
            pooled_projections=pooled.to(xs.device, dtype),
            return_dict=False,
        )[0]

    @staticmethod
    @torch.no_grad()
    def sample(
        pipe,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        negative_embeds: torch.Tensor,
        negative_pooled: torch.Tensor,
        *,
        steps: int,
        cfg: float,
        resolution: int,
        seed: int,
    ) -> list:
        """PIL images from cached embeddings (`[1, ...]` each), the pipeline's own sampler."""
        return pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=negative_embeds,
            negative_pooled_prompt_embeds=negative_pooled,
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=resolution,
            width=resolution,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        ).images


FAMILIES = {"sd3": SD3Flow}


def family(name: str):
    """The family class a cache's `job.json` names."""
    if name not in FAMILIES:
        raise DiffalignError(
            f"model family '{name}' has no cache/training support (known: {', '.join(FAMILIES)})"
        )
    return FAMILIES[name]
