"""A trained semantic module on a plain diffusers `FluxFillPipeline` (spec F: Infer).

For people who load the LoRA with `pipe.load_lora_weights(...)` and call the pipeline themselves:

    from diffusers import FluxFillPipeline
    from diffalign.fill import attach_semantic

    pipe = FluxFillPipeline.from_pretrained("black-forest-labs/FLUX.1-Fill-dev")
    pipe.load_lora_weights("runs/fill_semantic/checkpoint-final")
    semantic = attach_semantic(pipe, "runs/fill_semantic/checkpoint-final", "cat_semantic.png")
    image = pipe(prompt=..., image=diptych, mask_image=mask, ...).images[0]
    semantic.set_semantic("dog_semantic.png")   # another semantic panel for the next call
    semantic.remove()                            # the plain pipeline again

A forward pre-hook on `pipe.transformer` splits each call's `hidden_states` `[B, L, 64 + 320]`
into the noisy latent tokens and the fill condition, runs the module on the latent tokens (Q)
against the semantic panel's tokens (K/V) and concatenates them again: the seed's
`[semantic(x_t) | cond]`, the same operations as `SemanticFillTransformer` in `fill infer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.engine.errors import DiffalignError


def semantic_pixels(image: Any) -> torch.Tensor:
    """A semantic panel as `[B, 3, P, P]` float in [0, 1]: a path, a PIL image, or a tensor
    `[3, P, P]` / `[B, 3, P, P]` in [0, 1] (`fill infer`'s reading of an image file)."""
    if isinstance(image, str | os.PathLike):
        from diffalign.fill.infer import load_image

        return load_image(Path(image), "semantic image")[None]
    if isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise DiffalignError(
                f"semantic image tensor must be [3, P, P] or [B, 3, P, P], got {tuple(image.shape)}"
            )
        return x.float()
    if hasattr(image, "convert"):  # PIL
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None]
    raise DiffalignError(
        f"semantic image must be a path, a PIL image or a tensor, got {type(image).__name__}"
    )


class SemanticAttachment:
    """The semantic module hooked into `pipe.transformer` (made by `attach_semantic`).

    `module` (the `SemanticCrossAttention`), `layout`, `semantic_tokens` (the K/V tokens of the
    current semantic panel); `set_semantic(image)` encodes another panel, `remove()` detaches.
    """

    def __init__(self, pipe: Any, module: torch.nn.Module, layout: str):
        from diffalign.fill.pipeline import latent_width

        self.pipe, self.module, self.layout = pipe, module, layout
        self.latent_dim = latent_width(pipe)
        self.semantic_tokens: torch.Tensor | None = None
        self._handle = pipe.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    @torch.no_grad()
    def set_semantic(self, image: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE-encode the semantic panel (`FillEncoder.encode_semantic` in `self.layout`, the
        latent sample drawn with `generator`) as the K/V tokens of the next calls."""
        from diffalign.fill.encode import FillEncoder

        encoder = FillEncoder(self.pipe)
        pixels = semantic_pixels(image).to(encoder.device)
        self.semantic_tokens = encoder.encode_semantic(pixels, self.layout, generator=generator)
        return self.semantic_tokens

    def _hook(self, _transformer, args: tuple, kwargs: dict):
        from diffalign.fill.model import check_semantic_tokens

        if self.semantic_tokens is None:
            raise DiffalignError(
                "attach_semantic: no semantic image yet (pass it to attach_semantic or call "
                ".set_semantic(image))"
            )
        positional = "hidden_states" not in kwargs
        hidden = args[0] if positional else kwargs["hidden_states"]
        latents, cond = hidden[..., : self.latent_dim], hidden[..., self.latent_dim :]
        sem = self.semantic_tokens.to(device=latents.device, dtype=latents.dtype)
        if sem.shape[0] == 1 and latents.shape[0] > 1:
            sem = sem.expand(latents.shape[0], -1, -1)
        check_semantic_tokens(latents, sem)
        if next(self.module.parameters()).device != latents.device:
            self.module.to(latents.device)
        hidden = torch.cat([self.module(latents, sem), cond], dim=-1)
        if positional:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def remove(self) -> None:
        """Detach the hook: the pipeline is plain again."""
        self._handle.remove()


def attach_semantic(
    pipe: Any,
    path: str | os.PathLike,
    semantic: Any = None,
    *,
    layout: str | None = None,
    generator: torch.Generator | None = None,
) -> SemanticAttachment:
    """Hook the semantic module saved at `path` (`semantic_module.safetensors`,
    `fill_semantic.safetensors` or a checkpoint folder) into `pipe.transformer` of a plain
    `FluxFillPipeline`; `semantic` (path, PIL image or [0, 1] tensor of the visible panel's size)
    is encoded now with `generator`, or later with `.set_semantic`. `layout` defaults to the one
    recorded with the module (a contradicting one is an error). Returns the attachment."""
    from diffalign.fill.infer import resolve_semantic_layout
    from diffalign.fill.pipeline import latent_width
    from diffalign.fill.weights import load_semantic

    layout = resolve_semantic_layout(layout, str(path), log=lambda _msg: None)
    module = load_semantic(path, latent_width(pipe))
    module = module.to(device=pipe.transformer.device, dtype=pipe.transformer.dtype)
    module.requires_grad_(False)
    attachment = SemanticAttachment(pipe, module, layout)
    if semantic is not None:
        attachment.set_semantic(semantic, generator)
    return attachment
