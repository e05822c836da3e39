"""Encoding for FLUX.1-Fill training and inference (spec F "Encoding", seed 004 sections 2-3).

`FillEncoder` turns prompts and image panels into exactly what diffusers' `FluxFillPipeline`
feeds its transformer:

- prompts -> T5 token embeddings, CLIP pooled embedding and text ids (`encode_prompts`);
- the diptych `[visible | target]` with the target half masked -> packed clean latents `x0`
  `[B, L, 4C]` (64 for FLUX), the fill condition `[B, L, 4C + 4 f^2]` (64 masked-image + 256 mask
  channels) and image ids `[L, 3]` (`encode_diptych`);
- the semantic panel -> VAE latents packed onto the same token grid (`encode_semantic`), with no
  gradient (the VAE is frozen; the semantic cross-attention learns from them).

`tests/test_fill_encode.py` checks every tensor against the pipeline's own `prepare_latents`,
`prepare_mask_latents`, `_pack_latents`, `_prepare_latent_image_ids`, image/mask processors and
`encode_prompt`. `TextCache` stores prompt embeddings on disk for a fixed dataset (`--cache-text`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError

# where the semantic latents go as K/V (spec F "same token grid"; `panel`: the seed's literal
# K/V = the semantic panel's own tokens, half as many as the diptych's)
SEMANTIC_LAYOUTS = ("target-half", "both-halves", "panel")
SAMPLE_MODES = ("sample", "argmax")
_COMPONENTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX packing `(B, C, H, W) -> (B, H/2 * W/2, 4C)` (2x2 patches, row-major tokens)."""
    from diffusers import FluxFillPipeline

    b, c, h, w = latents.shape
    return FluxFillPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: `(B, L, 4C) -> (B, C, H, W)` at the given latent size."""
    b, n, c4 = tokens.shape
    h, w = latent_height // 2, latent_width // 2
    if n != h * w or c4 % 4:
        raise DiffalignError(
            f"cannot unpack {n} tokens of {c4} channels to a {latent_height}x{latent_width} latent"
        )
    x = tokens.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, latent_height, latent_width)


def image_ids(latent_height: int, latent_width: int, device=None, dtype=torch.float32):
    """FLUX image ids `(H/2 * W/2, 3)` = (0, row, col) of each packed token."""
    from diffusers import FluxFillPipeline

    return FluxFillPipeline._prepare_latent_image_ids(
        1, latent_height // 2, latent_width // 2, device, dtype
    )


def _components(pipe: Any) -> dict[str, Any]:
    if isinstance(pipe, dict):
        found = dict(pipe)
    else:
        found = {name: getattr(pipe, name, None) for name in (*_COMPONENTS, "transformer")}
    missing = [n for n in ("vae",) if found.get(n) is None]
    if missing:
        raise DiffalignError(
            f"FillEncoder needs a FLUX Fill pipeline with a vae (missing {missing})"
        )
    return found


class FillEncoder:
    """Prompt, diptych and semantic encoding with a FLUX.1-Fill pipeline's frozen components.

    `pipe` is a loaded `FluxFillPipeline` or a dict of its components (`vae`, `text_encoder`,
    `tokenizer`, `text_encoder_2`, `tokenizer_2`; the text parts only for `encode_prompts`).
    Latents come out in `dtype` (float32 unless given) on the VAE's device.
    """

    def __init__(self, pipe: Any, dtype: torch.dtype | None = None, sample_mode: str = "sample"):
        parts = _components(pipe)
        self.vae = parts["vae"]
        self.text_encoder = parts.get("text_encoder")
        self.tokenizer = parts.get("tokenizer")
        self.text_encoder_2 = parts.get("text_encoder_2")
        self.tokenizer_2 = parts.get("tokenizer_2")
        if sample_mode not in SAMPLE_MODES:
            raise DiffalignError(f"sample_mode must be one of {SAMPLE_MODES}, got {sample_mode!r}")
        self.sample_mode = sample_mode
        self.dtype = dtype or torch.float32
        cfg = self.vae.config
        self.vae_scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.shift_factor = float(cfg.shift_factor or 0.0)
        self.scaling_factor = float(cfg.scaling_factor)

    # -- channel bookkeeping (real FLUX.1-Fill: 64, 320, 384) -------------------------------
    @property
    def latent_dim(self) -> int:
        """Channels of a packed latent token (`4 * latent_channels`; 64 for FLUX)."""
        return 4 * self.latent_channels

    @property
    def cond_dim(self) -> int:
        """Channels of the fill condition: masked-image latents + packed 8x8 mask (320)."""
        return self.latent_dim + 4 * self.vae_scale_factor**2

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x 2x2 packing: 16 for FLUX)."""
        return 2 * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # -- prompts ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: list[str] | str,
        max_sequence_length: int = 512,
        cache: TextCache | None = None,
    ) -> dict[str, torch.Tensor]:
        """`prompt_embeds [B, T, D]` (T5), `pooled_prompt_embeds [B, D']` (CLIP), `text_ids [T, 3]`.

        Same tokenisation and outputs as `FluxFillPipeline.encode_prompt`. With `cache`, prompts
        already stored are read from disk and new ones written.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise DiffalignError("encode_prompts: no prompts")
        if None in (self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2):
            raise DiffalignError("encode_prompts needs the pipeline's two text encoders/tokenizers")
        found: dict[int, dict[str, torch.Tensor]] = {}
        if cache is not None:
            want = self._text_shapes(max_sequence_length)
            for i, p in enumerate(prompts):
                hit = cache.get(p, max_sequence_length)
                if hit is not None:
                    got = {k: tuple(v.shape) for k, v in hit.items()}
                    if got != want:
                        raise DiffalignError(
                            f"{cache.path(p, max_sequence_length)}: text cache entry of shapes "
                            f"{got}, this model's text encoders give {want}; it was made with "
                            f"another model: delete {cache.root} (or choose another "
                            "--text-cache-dir)"
                        )
                    found[i] = hit
        todo = [i for i in range(len(prompts)) if i not in found]
        if todo:
            batch = [prompts[i] for i in todo]
            pooled = self._clip_pooled(batch)
            embeds = self._t5_embeds(batch, max_sequence_length)
            for j, i in enumerate(todo):
                found[i] = {"prompt_embeds": embeds[j], "pooled_prompt_embeds": pooled[j]}
                if cache is not None:
                    cache.put(prompts[i], max_sequence_length, found[i])
        prompt_embeds = torch.stack([found[i]["prompt_embeds"] for i in range(len(prompts))])
        pooled = torch.stack([found[i]["pooled_prompt_embeds"] for i in range(len(prompts))])
        dtype = self.text_encoder.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=prompt_embeds.device, dtype=dtype)
        return {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "text_ids": text_ids,
        }

    def _text_shapes(self, max_sequence_length: int) -> dict[str, tuple[int, ...]]:
        """Per-prompt shapes of `prompt_embeds` (T5) and `pooled_prompt_embeds` (CLIP)."""
        return {
            "prompt_embeds": (max_sequence_length, int(self.text_encoder_2.config.d_model)),
            "pooled_prompt_embeds": (int(self.text_encoder.config.hidden_size),),
        }

    def _clip_pooled(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.text_encoder.parameters()).device
        out = self.text_encoder(ids.to(device), output_hidden_states=False).pooler_output
        return out.to(dtype=self.text_encoder.dtype)

    def _t5_embeds(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        ids = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.text_encoder_2.parameters()).device
        out = self.text_encoder_2(ids.to(device), output_hidden_states=False)[0]
        return out.to(dtype=self.text_encoder_2.dtype)

    # -- images ----------------------------------------------------------------------------
    def check_panels(self, **panels: torch.Tensor) -> tuple[int, int, int]:
        """(B, H, W) of equally sized `[B, 3, P, P]` panels; else one DiffalignError naming them."""
        shape = None
        for name, x in panels.items():
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise DiffalignError(f"{name} must be a float [B, 3, P, P] image batch, got {got}")
            if shape is None:
                shape = tuple(x.shape)
                first = name
            elif tuple(x.shape) != shape:
                raise DiffalignError(
                    f"{name} panel is {x.shape[-1]}x{x.shape[-2]} (batch {x.shape[0]}), {first} "
                    f"is {shape[-1]}x{shape[-2]} (batch {shape[0]}): panels must have the same "
                    "size"
                )
        b, _, h, w = shape
        if h % self.multiple or w % self.multiple:
            raise DiffalignError(
                f"panel size {h}x{w} is not divisible by {self.multiple} (VAE factor "
                f"{self.vae_scale_factor} x 2x2 packing)"
            )
        return b, h, w

    def _vae_latents(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """`(vae.encode(pixels) - shift) * scale` as the pipeline's `_encode_vae_image`."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        z = dist.sample(generator) if self.sample_mode == "sample" else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).to(self.dtype)

    @staticmethod
    def to_pixels(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the VAE's [-1, 1] input (the pipeline's image processor)."""
        return images.float() * 2.0 - 1.0

    def target_mask(self, batch: int, height: int, width: int) -> torch.Tensor:
        """The diptych mask `[B, 1, H, 2W]`: 0 on the visible half, 1 on the target half."""
        mask = torch.zeros(batch, 1, height, 2 * width)
        mask[..., width:] = 1.0
        return mask

    def pack_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """`[B, 1, H, W]` pixel mask -> 8x8 pixel-unshuffle -> packed `[B, L, 4 f^2]` (256)."""
        b, _, h, w = mask.shape
        f = self.vae_scale_factor
        m = mask[:, 0].reshape(b, h // f, f, w // f, f).permute(0, 2, 4, 1, 3)
        return pack_latents(m.reshape(b, f * f, h // f, w // f))

    @torch.no_grad()
    def encode_diptych(
        self, visible: torch.Tensor, target: torch.Tensor, generator=None
    ) -> dict[str, Any]:
        """The diptych `[visible | target]`, target half masked -> `x0`, `cond`, `img_ids`.

        `visible`, `target`: float `[B, 3, P, P]` in [0, 1]. Returns `x0 [B, L, 64]` (packed
        clean latents of the whole diptych), `cond [B, L, 320]` (packed latents of the diptych
        with the target half blanked, then the packed mask), `img_ids [L, 3]`, `height`, `width`
        (pixel size of the diptych). `generator` draws the VAE sample of `x0`, then that of the
        masked diptych.
        """
        self.check_panels(visible=visible, target=target)
        pixels = self.to_pixels(torch.cat([visible, target], dim=-1))
        x0 = pack_latents(self._vae_latents(pixels, generator))
        return {"x0": x0, **self._condition(pixels, generator)}

    @torch.no_grad()
    def encode_condition(self, visible: torch.Tensor, generator=None) -> dict[str, Any]:
        """The inference side of `encode_diptych`: `cond`, `img_ids`, `height`, `width` of the
        diptych `[visible | blank]` (the pipeline's `prepare_mask_latents`: one VAE sample, of
        the masked diptych)."""
        self.check_panels(visible=visible)
        pixels = self.to_pixels(torch.cat([visible, torch.zeros_like(visible)], dim=-1))
        return self._condition(pixels, generator)

    def _condition(self, pixels: torch.Tensor, generator) -> dict[str, Any]:
        b, _, h, w2 = pixels.shape
        mask = self.target_mask(b, h, w2 // 2).to(pixels.device)
        masked = pack_latents(self._vae_latents(pixels * (1.0 - mask), generator))
        packed_mask = self.pack_mask(mask).to(device=masked.device, dtype=self.dtype)
        lh, lw = h // self.vae_scale_factor, w2 // self.vae_scale_factor
        return {
            "cond": torch.cat([masked, packed_mask], dim=-1),
            "img_ids": image_ids(lh, lw, device=masked.device, dtype=self.dtype),
            "height": h,
            "width": w2,
        }

    def skip_vae_sample(self, generator, batch: int, height: int, width: int) -> None:
        """Advance `generator` exactly as a VAE sample of `batch` images `height x width` would
        (diffusers' posterior draws `randn_tensor` of the latent shape, in the VAE's dtype)."""
        if self.sample_mode != "sample":
            return
        from diffusers.utils.torch_utils import randn_tensor

        f = self.vae_scale_factor
        shape = (batch, self.latent_channels, height // f, width // f)
        randn_tensor(shape, generator=generator, device=self.device, dtype=self.vae.dtype)

    @torch.no_grad()
    def encode_semantic(
        self,
        semantic: torch.Tensor,
        layout: str = "target-half",
        generator=None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Semantic panel `[B, 3, P, P]` in [0, 1] -> its packed VAE tokens (the K/V source).

        `target-half` (default): on the diptych grid `[B, L, 64]`, the semantic latents on the
        target half, zeros on the visible half; `both-halves`: they fill both halves; `panel`
        (the seed's literal layout): the panel's own tokens only, `[B, L/2, 64]`. No gradient
        flows (seed 004 section 3). With `visible`, a semantic panel of another size is an error.
        """
        if layout not in SEMANTIC_LAYOUTS:
            raise DiffalignError(
                f"semantic layout must be one of {', '.join(SEMANTIC_LAYOUTS)}, got {layout!r}"
            )
        if visible is not None:
            self.check_panels(visible=visible, semantic=semantic)
        self.check_panels(semantic=semantic)
        z = self._vae_latents(self.to_pixels(semantic), generator)
        if layout == "panel":
            return pack_latents(z)
        left = torch.zeros_like(z) if layout == "target-half" else z
        return pack_latents(torch.cat([left, z], dim=-1))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents of a `height x width` image -> images `[B, 3, H, W]` in [0, 1]."""
        f = self.vae_scale_factor
        z = unpack_latents(tokens, height // f, width // f)
        z = z / self.scaling_factor + self.shift_factor
        image = self.vae.decode(z.to(device=self.device, dtype=self.vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------


class TextCache:
    """Prompt embeddings on disk, one safetensors file per (prompt, max_sequence_length).

    Files are named by a hash of the prompt (and of `namespace`, e.g. the model id, so two models
    never share entries) and written atomically; the prompt is stored in the metadata and checked
    on read.
    """

    def __init__(self, root: str | os.PathLike, namespace: str = ""):
        self.root = Path(root)
        self.namespace = namespace
        self.hits = 0
        self.misses = 0

    def path(self, prompt: str, max_sequence_length: int) -> Path:
        key = f"{self.namespace}\x00{max_sequence_length}\x00{prompt}".encode()
        return self.root / f"{hashlib.sha256(key).hexdigest()[:40]}.safetensors"

    def get(self, prompt: str, max_sequence_length: int = 512) -> dict[str, torch.Tensor] | None:
        from diffalign.engine.io import load_tensors

        path = self.path(prompt, max_sequence_length)
        if not path.is_file():
            self.misses += 1
            return None
        tensors, meta = load_tensors(path)
        if meta.get("prompt") != prompt or set(tensors) != {
            "prompt_embeds",
            "pooled_prompt_embeds",
        }:
            raise DiffalignError(f"{path}: text cache entry does not belong to this prompt")
        self.hits += 1
        return tensors

    def put(self, prompt: str, max_sequence_length: int, tensors: dict[str, torch.Tensor]) -> Path:
        from diffalign.engine.io import save_tensors

        path = self.path(prompt, max_sequence_length)
        meta = {"prompt": prompt, "max_sequence_length": str(max_sequence_length)}
        save_tensors(path, {k: tensors[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}, meta)
        return path
