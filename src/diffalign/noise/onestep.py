"""The one-step generator interface every noise method works on (spec N; STYLE: method once).

A one-step generator maps an initial noise ``z [B, C, h, w]`` and encoded prompts to images in
``[0, 1]``, differentiably from ``z``. Test-time optimisation (:mod:`diffalign.noise.optimize`)
only talks to this interface; the real diffusion generators (SDXL-Turbo, SD-Turbo, Hyper-SD, in
:mod:`diffalign.noise.generators`; FLUX.1-schnell, SD3.5-Large-Turbo, SANA-Sprint, PixArt DMD,
in :mod:`diffalign.noise.flow_generators`) and the toy GAN (:mod:`diffalign.noise.toy.onestep`)
implement it.

Encoded prompts are a dict of batch-first tensors, so a batch can be sliced and repeated with
:func:`select_embeds` / :func:`repeat_embeds` whatever the model puts in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError

PromptEmbeds = dict[str, torch.Tensor]


class OneStepGenerator(nn.Module):
    """``generate(noise, encode_prompts(prompts)) -> images [B, C, H, W] in [0, 1]``.

    Subclasses set ``name`` and implement the three methods below. ``generate`` must be
    differentiable with respect to ``noise``; parameters of the model itself are frozen.
    """

    name: str = "generator"

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode a batch of prompts once (no gradient needed): dict of ``[B, ...]`` tensors."""
        raise NotImplementedError

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        """``(C, h, w)`` of the initial noise for an image of ``height x width`` pixels."""
        raise NotImplementedError

    def generate(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """Images in ``[0, 1]`` from ``noise [B, C, h, w]`` and ``B`` encoded prompts."""
        raise NotImplementedError

    def forward(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.generate(noise, embeds)

    # -- the split assignment and SFT work on (spec N: assigned-noise inversion, matched SFT):
    # generate = decode(denoise(noise)); targets enter through encode_images. A generator
    # without a latent space keeps the defaults (its "latent" is the image itself).

    def denoise(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """The generator's output before decoding (diffusion: the one-step ``x0`` latent)."""
        return self.generate(noise, embeds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in ``[0, 1]`` from what :meth:`denoise` returns."""
        return latents

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Target images ``[B, 3, H, W]`` in ``[0, 1]`` -> the space of :meth:`denoise`
        (diffusion: the VAE posterior mode, scaled as the U-Net's latents); no gradient needed."""
        return images

    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images this generator makes (targets must have this size)."""
        raise NotImplementedError

    def preserve_embeds(self, embeds: PromptEmbeds) -> PromptEmbeds:
        """Conditions of the preserve loss's random-noise samples (default: the batch's own)."""
        return embeds

    # -- fine-tuning (spec N: latent-matched SFT): which module trains and how it is exported

    trainable_name: str = "model"

    def trainable_module(self) -> nn.Module:
        """The module SFT fine-tunes (diffusion: the U-Net; toy: the GAN generator)."""
        raise NotImplementedError

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The modules it runs but SFT does not train (VAE, text encoders): the training loop
        moves them to its device beside :meth:`trainable_module` (default: none)."""
        return {}

    def frozen_copy(self) -> OneStepGenerator:
        """A generator that shares everything but a frozen copy of :meth:`trainable_module`
        (the preserve loss's base)."""
        raise NotImplementedError

    def export_finetuned(self, out_dir, info: dict | None = None) -> None:
        """Write the fine-tuned generator so that it loads again as a generator/model."""
        raise NotImplementedError

    def compiled_modules(self) -> dict[str, nn.Module]:
        """The modules of the forward that `--compile` compiles (default: the generator's
        direct sub-modules; diffusion: the U-Net and the VAE decoder)."""
        return dict(self.named_children())

    def load_lora(self, path, adapter_name: str = "default") -> None:
        """Load a LoRA export of :meth:`export_finetuned` onto :meth:`trainable_module`."""
        raise DiffalignError(f"{self.name} takes no LoRA")

    def fuse_lora(self) -> None:
        """Merge the loaded LoRA into the weights."""
        raise DiffalignError(f"{self.name} takes no LoRA")

    def max_steps(self) -> int:
        """The most sampling steps :meth:`render` takes (1: no multi-step sampling)."""
        return 1

    def render(self, noise: torch.Tensor, embeds: PromptEmbeds, num_steps: int) -> torch.Tensor:
        """Images from ``num_steps`` sampling steps of the same model (`--final-steps`)."""
        if num_steps != 1:
            raise DiffalignError(
                f"--final-steps {num_steps}: {self.name} has no multi-step sampling"
            )
        with torch.no_grad():
            return self.generate(noise, embeds)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def init_noise_sigma(self) -> float:
        """``sigma`` of the model's first latents ``sigma * z`` for standard-normal ``z``: the
        scheduler's ``init_noise_sigma`` (14.6 on SDXL-Turbo / SD-Turbo's trailing Euler, 1 for
        flow matching, TCD, LCM, PixArt DMD's DDPM, SANA-Sprint's SCM (its ``sigma_data``
        scaling stays inside its sampler) and the toy GAN; default 1). The seed's noises (its
        drift term, its ``.pt`` noise files) are ``sigma * z``; ours are ``z``."""
        return 1.0

    def sample_noise(
        self,
        n: int,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` standard-normal float32 latents on the CPU (seeded through ``generator``)."""
        return torch.randn((n, *self.latent_shape(height, width)), generator=generator)

    def check_noise(self, noise: torch.Tensor, embeds: PromptEmbeds) -> None:
        """One-line errors for a noise batch that does not fit the prompts or the model."""
        if noise.ndim != 4:
            raise DiffalignError(f"noise must be [B, C, h, w], got {tuple(noise.shape)}")
        n = embeds_batch_size(embeds)
        if noise.shape[0] != n:
            raise DiffalignError(f"got {noise.shape[0]} noises for {n} encoded prompts")


def cached_schedule(owner, scheduler, key: tuple, set_schedule: Callable[[], None]) -> None:
    """Put `scheduler` in the state `set_schedule()` leaves it in, running that once per `key`
    (what the schedule depends on: device, steps, image size) and, at later calls, restoring
    the attributes it left (the same tensors: no scheduler step changes them in place).

    ``set_timesteps`` copies the schedule to the accelerator and the step-index lookup reads it
    back (``index_for_timestep``'s ``.item()``): two host syncs in every call of a generator,
    i.e. in every optimisation step. `set_schedule` sets the begin index (``set_begin_index``)
    so the lookup never runs; the scheduler state, and so every result, is the one a fresh
    ``set_timesteps`` gives (the pipelines' steps share the scheduler and change it: the
    restore undoes that too). The states live on `owner` (a generator)."""
    states = owner.__dict__.setdefault("_schedule_states", {})
    state = states.get(key)
    if state is None or state[0] is not scheduler:
        set_schedule()
        state = states[key] = (scheduler, dict(vars(scheduler)))
    scheduler.__dict__.update(state[1])


def compile_generator(
    generator: OneStepGenerator, cuda_graphs: bool = False, reward: nn.Module | None = None
) -> dict[str, str]:
    """Compile the generator's forward, and the reward's, in place (issue 18; `--compile`):
    each module of :meth:`OneStepGenerator.compiled_modules` through
    `engine.compile.compile_module` (the U-Net's transformer blocks regionally, the VAE decoder
    whole) and the reward models' transformer layers (`engine.compile.compile_layers`).
    ``cuda_graphs``: the generator's modules whole and everything in torch.compile's
    "reduce-overhead" mode, which replays CUDA graphs (static shapes: one batch and image size
    per run; CUDA only). Returns name -> "regional" | "whole" | "<n> layers"."""
    from diffalign.engine.compile import (
        check_compile_available,
        check_cuda_graphs,
        compile_layers,
        compile_module,
    )

    if cuda_graphs:
        check_cuda_graphs(generator.device)
    check_compile_available(generator.device)
    kw = {"mode": "reduce-overhead"} if cuda_graphs else {}
    done = {
        name: compile_module(m, regional=not cuda_graphs, **kw)
        for name, m in generator.compiled_modules().items()
    }
    if reward is not None:
        done["reward"] = f"{compile_layers(reward, **kw)} layers"
    return done


def embeds_batch_size(embeds: PromptEmbeds) -> int:
    sizes = {int(v.shape[0]) for v in embeds.values()}
    if len(sizes) != 1:
        raise DiffalignError(f"encoded prompts disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def select_embeds(
    embeds: PromptEmbeds, index: torch.Tensor | Sequence[int] | slice
) -> PromptEmbeds:
    """Rows ``index`` of every tensor of an encoded prompt batch."""
    if not isinstance(index, slice):
        index = torch.as_tensor(index, dtype=torch.long)
    return {
        k: v[index] if isinstance(index, slice) else v[index.to(v.device)]
        for k, v in embeds.items()
    }


def repeat_embeds(embeds: PromptEmbeds, repeats: int) -> PromptEmbeds:
    """Each prompt ``repeats`` times in a row (``[a, b] -> [a, a, b, b]``)."""
    if repeats == 1:
        return embeds
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in embeds.items()}
