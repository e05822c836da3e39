"""What `textstream cache` and `train-weights` need from a model family (spec T: learned weights):
how its pipeline loads (with or without text encoders), what is cached (VAE latents, text
embeddings) and how its transformer predicts a velocity from cached tensors and samples images.

One class per family, registered in `FAMILIES` by the name a cache records in `job.json`
(`families.family_of_variant`: "sd3" for SD3 / SD3.5, "flux" for FLUX.1-dev / -schnell,
"qwen-image"). Every family caches latents unpacked, `[C, h, w]`, so the generic training
code noises them as they are (`x_s = (1 - s) x0 + s eps`, target `eps - x0`, timestep `1000 s`);
FLUX.1 and Qwen-Image pack them 2x2 into tokens inside `velocity` (a permutation: packed
Gaussian noise is Gaussian noise) and unpack the prediction.

The second text store ("pooled") holds each family's second text tensor: SD3 and FLUX.1 the
pooled CLIP embeddings, Qwen-Image (which has no pooled embedding) its text mask `[L]`
(1 = token, 0 = padding up to the cached length).
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


class _FlowFamily:
    """What every family shares: loading the pipeline (`_classes`, `_text_parts`), the prompt
    encoding call, the cached-shape checks and the sampling call around each family's own inputs
    (`_second_store_shape`, `_sample_inputs`)."""

    name = ""
    _text_parts: tuple[str, ...] = ()
    _packing = 1  # transformer input channels per latent channel (4 where 2x2 patches are tokens)

    @classmethod
    def _classes(cls) -> tuple[type, type]:
        """(pipeline class, transformer class)."""
        raise NotImplementedError

    @classmethod
    def load(
        cls,
        model: str,
        *,
        dtype: Any = "float32",
        device: str = "cpu",
        text: bool = True,
        single_file_config: str | None = None,
    ):
        """The pipeline; `text=False` leaves out the text encoders and tokenizers."""
        from diffalign.engine.loading import load_pipeline

        pipeline_cls, transformer_cls = cls._classes()
        pipe = load_pipeline(
            model,
            pipeline_cls,
            cls.name,
            dtype=dtype,
            device=device,
            single_file_config=single_file_config,
            expect={"transformer": transformer_cls},
            **({} if text else dict.fromkeys(cls._text_parts)),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def settings(transformer) -> dict[str, Any]:
        """Family-specific fixed inputs of the velocity (recorded in the run's config)."""
        return {}

    @staticmethod
    def transformer_timestep(timestep: torch.Tensor, batch: int, dtype) -> torch.Tensor:
        """The `timestep` argument the family's pipeline gives its transformer for schedule
        timesteps `timestep` (0..1000) in a model of `dtype`: SD3's, the timesteps as they are
        (float32, whatever the model dtype)."""
        return timestep.expand(batch)

    @staticmethod
    def _encode_prompt(pipe, captions: Sequence[str], max_sequence_length: int, **extra: Any):
        """The pipeline's own `encode_prompt` of `captions` on the transformer's device."""
        return pipe.encode_prompt(
            prompt=list(captions),
            device=next(pipe.transformer.parameters()).device,
            num_images_per_prompt=1,
            max_sequence_length=int(max_sequence_length),
            **extra,
        )

    @staticmethod
    def _second_store_shape(cfg, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        """{what: (cached, needed)} for the second text store (pooled CLIP unless overridden)."""
        return {"pooled width": (shapes["pooled"][-1], int(cfg.pooled_projection_dim))}

    @classmethod
    def check_shapes(cls, transformer, shapes: dict[str, list[int]]) -> list[tuple[str, int, int]]:
        """(what, cached, needed) for every cached width the transformer does not take."""
        cfg = transformer.config
        pairs = {
            "latent channels": (shapes["latents"][0] * cls._packing, int(cfg.in_channels)),
            "text width": (shapes["prompt_embeds"][-1], int(cfg.joint_attention_dim)),
            **cls._second_store_shape(cfg, shapes),
        }
        return [(k, a, b) for k, (a, b) in pairs.items() if a != b]

    @classmethod
    def _sample_inputs(
        cls,
        pipe,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        negative_embeds: torch.Tensor,
        negative_pooled: torch.Tensor,
        cfg: float,
    ) -> dict[str, Any]:
        """The family's own pipeline inputs besides the prompt embeddings (guidance, negatives)."""
        raise NotImplementedError

    @classmethod
    @torch.no_grad()
    def sample(
        cls,
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
        """PIL images from cached embeddings (`[1, ...]` each), the pipeline's own sampler;
        guidance as the family's `_sample_inputs` says."""
        return pipe(
            prompt_embeds=prompt_embeds,
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            **cls._sample_inputs(
                pipe, prompt_embeds, pooled, negative_embeds, negative_pooled, cfg
            ),
        ).images


class SD3Flow(_FlowFamily):
    """SD3 / SD3.5 (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`).

    Latents: `(VAE posterior mean - shift_factor) * scaling_factor`, `[16, R/8, R/8]`. Text: the
    pipeline's joint embeddings (CLIP-L + CLIP-G zero-padded to the T5 width, 77 tokens, then
    the T5 tokens) and the pooled CLIP embeddings.
    """

    name = "sd3"
    _text_parts = _TEXT_PARTS

    @classmethod
    def _classes(cls):
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline, SD3Transformer2DModel

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

    @classmethod
    @torch.no_grad()
    def encode_text(
        cls, pipe, captions: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds `[B, L, D]`, pooled `[B, P]`), float32 on the CPU."""
        pe, _, pooled, _ = cls._encode_prompt(
            pipe,
            captions,
            max_sequence_length,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
        )
        return pe.float().cpu(), pooled.float().cpu()

    @classmethod
    def _sample_inputs(
        cls,
        pipe,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        negative_embeds: torch.Tensor,
        negative_pooled: torch.Tensor,
        cfg: float,
    ) -> dict[str, Any]:
        """Classifier-free guidance `cfg` against the cached negatives."""
        return {
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled,
            "guidance_scale": cfg,
        }

    @staticmethod
    def image_seq_len(transformer, latent_shape: Sequence[int]) -> int:
        """Image tokens of a latent `[C, h, w]` (what dynamic time shifting is keyed on)."""
        p = int(transformer.config.patch_size)
        return (int(latent_shape[-2]) // p) * (int(latent_shape[-1]) // p)

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


# ---------------------------------------------------------------------------------------------
# FLUX.1 and Qwen-Image: 16-channel latents packed 2x2 into tokens


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, (h/2)(w/2), 4C]`: each 2x2 patch a token (channel-major inside)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for latents of size `h x w`."""
    b, _, d = x.shape
    x = x.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(h2: int, w2: int) -> torch.Tensor:
    """FLUX's image position ids `[h2 * w2, 3]`: (0, row, column) of each packed token."""
    rows = torch.arange(h2, dtype=torch.float32)[:, None].expand(h2, w2)
    cols = torch.arange(w2, dtype=torch.float32)[None, :].expand(h2, w2)
    return torch.stack([torch.zeros(h2, w2), rows, cols], dim=-1).reshape(h2 * w2, 3)


class _PackedFlow(_FlowFamily):
    """What FLUX.1 and Qwen-Image share besides: 2x2 packing, latent sizes, the timestep in 0..1
    and the velocity call around each family's own inputs (`_transformer_inputs`)."""

    _packing = 4

    @staticmethod
    def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
        factor = int(pipe.vae_scale_factor)
        if resolution % (2 * factor):
            raise DiffalignError(
                f"--resolution {resolution} must be a multiple of {2 * factor} for this model"
            )
        side = resolution // factor
        channels = int(pipe.transformer.config.in_channels) // 4
        return (channels, side, side)

    @staticmethod
    def image_seq_len(transformer, latent_shape: Sequence[int]) -> int:
        return (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)

    @staticmethod
    def transformer_timestep(timestep: torch.Tensor, batch: int, dtype) -> torch.Tensor:
        """The pipelines' `timestep.to(dtype) / 1000` (the transformers scale it back by 1000):
        rounded to the model dtype twice, so in bf16 schedule timestep 499 arrives as 0.5."""
        return (timestep.to(dtype) / 1000).expand(batch)

    @classmethod
    def _transformer_inputs(
        cls, transformer, xs: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, dtype
    ) -> dict[str, Any]:
        """The family's own transformer inputs besides latents, timestep and text embeddings."""
        raise NotImplementedError

    @classmethod
    def velocity(
        cls,
        transformer,
        xs: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        """The velocity at `xs` `[B, C, h, w]` (timestep in 0..1000), unpacked to `xs`' shape."""
        dtype = next(transformer.parameters()).dtype
        b, _, h, w = xs.shape
        out = transformer(
            hidden_states=pack_latents(xs).to(dtype),
            timestep=cls.transformer_timestep(timestep, b, dtype),
            encoder_hidden_states=prompt_embeds.to(xs.device, dtype),
            return_dict=False,
            **cls._transformer_inputs(transformer, xs, prompt_embeds, pooled, dtype),
        )[0]
        return unpack_latents(out, h, w)


class FluxFlow(_PackedFlow):
    """FLUX.1-dev / -schnell (`FluxPipeline`, `FluxTransformer2DModel`).

    Latents: `(VAE posterior mean - shift_factor) * scaling_factor`, `[16, R/8, R/8]`, packed 2x2
    in `velocity` with the pipeline's latent image ids and zero text ids. Text: the T5 embeddings
    (`[L, 4096]`, L = `--max-sequence-length`) and the pooled CLIP-L embedding `[768]`. FLUX.1-dev
    (a guidance embedder) gets the model card's distilled guidance 3.5 in every velocity.
    """

    name = "flux"
    _text_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    @classmethod
    def _classes(cls):
        from diffusers import FluxPipeline, FluxTransformer2DModel

        return FluxPipeline, FluxTransformer2DModel

    @staticmethod
    def guidance(transformer) -> float | None:
        from diffalign.textstream.families import DEFAULTS

        if not transformer.config.guidance_embeds:
            return None
        return float(DEFAULTS["flux-dev"].guidance)

    @classmethod
    def settings(cls, transformer) -> dict[str, Any]:
        return {"guidance": cls.guidance(transformer)}

    @staticmethod
    @torch.no_grad()
    def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
        return SD3Flow.encode_images(pipe, pixels)

    @classmethod
    @torch.no_grad()
    def encode_text(
        cls, pipe, captions: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 embeddings `[B, L, D]`, pooled CLIP `[B, P]`), float32 on the CPU."""
        pe, pooled, _ = cls._encode_prompt(pipe, captions, max_sequence_length)
        return pe.float().cpu(), pooled.float().cpu()

    @classmethod
    def _transformer_inputs(
        cls, transformer, xs: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, dtype
    ) -> dict[str, Any]:
        """Distilled guidance (dev), pooled CLIP, zero text ids and the latent image ids."""
        b, _, h, w = xs.shape
        g = cls.guidance(transformer)
        return {
            "guidance": None if g is None else torch.full((b,), g, device=xs.device),
            "pooled_projections": pooled.to(xs.device, dtype),
            "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=xs.device, dtype=dtype),
            "img_ids": latent_image_ids(h // 2, w // 2).to(xs.device, dtype),
        }

    @classmethod
    def _sample_inputs(
        cls,
        pipe,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        negative_embeds: torch.Tensor,
        negative_pooled: torch.Tensor,
        cfg: float,
    ) -> dict[str, Any]:
        """FLUX.1 is guidance-distilled: the distilled guidance (dev) replaces classifier-free
        guidance, so `cfg` and the negatives are unused."""
        g = cls.guidance(pipe.transformer)
        return {"pooled_prompt_embeds": pooled, "guidance_scale": 0.0 if g is None else g}


class QwenImageFlow(_PackedFlow):
    """Qwen-Image (`QwenImagePipeline`, `QwenImageTransformer2DModel`).

    Latents: `(VAE posterior mean - latents_mean) / latents_std` (per channel, the VAE config's),
    `[16, R/8, R/8]` (the video VAE's single frame dropped), packed 2x2 in `velocity`. Text: the
    pipeline's prompt embeddings (Qwen2.5-VL last hidden state, template tokens dropped) padded
    with zeros to L = `--max-sequence-length`, `[L, D]`, and the mask `[L]` in the second store.
    """

    name = "qwen-image"
    _text_parts = ("text_encoder", "tokenizer")

    @classmethod
    def _classes(cls):
        from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

        return QwenImagePipeline, QwenImageTransformer2DModel

    @staticmethod
    @torch.no_grad()
    def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, R, R]` in [-1, 1] -> normalised latents (posterior mean), float32 on the CPU."""
        vae = pipe.vae
        p = next(vae.parameters())
        mean = vae.encode(pixels.to(p.device, p.dtype)[:, :, None]).latent_dist.mean.float()
        z = int(vae.config.z_dim)
        mu = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
        return ((mean.cpu() - mu) / std)[:, :, 0]

    @classmethod
    @torch.no_grad()
    def encode_text(
        cls, pipe, captions: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings `[B, L, D]` zero-padded to L, mask `[B, L]`), float32 on the CPU."""
        pe, mask = cls._encode_prompt(pipe, captions, max_sequence_length)
        b, n, d = pe.shape
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(b, n)
        length = int(max_sequence_length)
        out_pe, out_mask = torch.zeros(b, length, d), torch.zeros(b, length)
        out_pe[:, :n] = pe.float().cpu()
        out_mask[:, :n] = mask.float().cpu()
        return out_pe, out_mask

    @staticmethod
    def _second_store_shape(cfg, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        return {"text mask length": (shapes["pooled"][-1], shapes["prompt_embeds"][0])}

    @staticmethod
    def _mask(mask: torch.Tensor, device) -> torch.Tensor:
        return (mask.to(device).float() > 0.5).long()

    @classmethod
    def _transformer_inputs(
        cls, transformer, xs: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor, dtype
    ) -> dict[str, Any]:
        """No guidance; `pooled` is the text mask; the packed image shape per sample."""
        b, _, h, w = xs.shape
        return {
            "guidance": None,
            "encoder_hidden_states_mask": cls._mask(pooled, xs.device),
            "img_shapes": [[(1, h // 2, w // 2)]] * b,
        }

    @classmethod
    def _sample_inputs(
        cls,
        pipe,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        negative_embeds: torch.Tensor,
        negative_pooled: torch.Tensor,
        cfg: float,
    ) -> dict[str, Any]:
        """True CFG (`cfg`) against the cached empty prompt; the masks from the second store."""
        device = prompt_embeds.device
        return {
            "prompt_embeds_mask": cls._mask(pooled, device),
            "negative_prompt_embeds": negative_embeds,
            "negative_prompt_embeds_mask": cls._mask(negative_pooled, device),
            "true_cfg_scale": cfg,
        }


FAMILIES = {"sd3": SD3Flow, "flux": FluxFlow, "qwen-image": QwenImageFlow}


def family(name: str):
    """The family class a cache's `job.json` names."""
    if name not in FAMILIES:
        raise DiffalignError(
            f"model family '{name}' has no cache/training support (known: {', '.join(FAMILIES)})"
        )
    return FAMILIES[name]
