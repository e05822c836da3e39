"""Few-step transformer generators behind the one-step interface (spec N; issue 17).

The same :class:`~diffalign.noise.onestep.OneStepGenerator` the U-Net generators implement, so
`noise optimize | assign | build-dataset | sft | em` run on them unchanged. Each runs its diffusers
pipeline's own sampling loop, differentiably from the initial noise ``z [B, C, H/8, W/8]`` (the
*unpacked* latent the orthogonal ``Q`` acts on) through every step and the VAE decoder:

- ``flux-schnell`` (`FluxPipeline`): ``Q z`` is packed into 2x2 patches as the pipeline packs it
  (``[B, (H/16)(W/16), 4C]``, the same ``(c, dy, dx)`` grouping as our patch of p = 2), flow
  matching with sigmas ``linspace(1, 1/n, n)``, no guidance, T5 length 256; 1 step while
  optimising (as ReNO), up to 4;
- ``sd3.5-large-turbo`` (`StableDiffusion3Pipeline`): guidance 0, 1-4 flow-matching steps;
- ``sana-sprint`` (`SanaSprintPipeline`): TrigFlow/SCM, 1 step (t = pi/2) or 2 (pi/2, 1.3),
  embedded guidance 4.5; the 2-step path's re-noising draws from a fixed seed, so ``G`` stays a
  function of ``z``;
- ``pixart-dmd`` (`PixArtAlphaPipeline` + the DMD transformer): one DDPM step at t = 400 (the
  release's demo: ``timesteps=[400]``, guidance 1), the x0 prediction, T5 length 120.

Gradient checkpointing of the transformer (and the VAE decoder where it has it) is on by default:
the gradient flows through every step. ``render(z, c, k)`` re-renders with ``k`` steps of the same
model (`noise optimize --final-steps`). Each kind is also a recipe of
:mod:`diffalign.noise.recipes` (pipeline class, release, preset), so a folder is recognised as
every generator's is (:func:`~diffalign.noise.recipes.generator_recipe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.noise.onestep import OneStepGenerator, PromptEmbeds, cached_schedule

__all__ = [
    "FEWSTEP_GENERATORS",
    "FewStepSpec",
    "FewStepTransformerGenerator",
    "load_fewstep_generator",
]


@dataclass(frozen=True)
class FewStepSpec:
    """How a few-step kind samples; its recipe (pipeline class, release, preset, image size)
    is :data:`diffalign.noise.recipes.GENERATORS` ``[name]``."""

    name: str
    default_steps: int  # steps while optimising
    max_steps: int  # the model's step range is 1..max_steps
    transformer: str  # transformer class name

    @property
    def recipe(self):
        from diffalign.noise.recipes import GENERATORS

        return GENERATORS[self.name]


FEWSTEP_GENERATORS: dict[str, FewStepSpec] = {
    s.name: s
    for s in (
        FewStepSpec("flux-schnell", 1, 4, "FluxTransformer2DModel"),
        FewStepSpec("sd3.5-large-turbo", 4, 4, "SD3Transformer2DModel"),
        FewStepSpec("sana-sprint", 2, 2, "SanaTransformer2DModel"),
        FewStepSpec("pixart-dmd", 1, 1, "PixArtTransformer2DModel"),
    )
}

FLUX_MAX_SEQUENCE_LENGTH = 256  # FLUX.1-schnell's T5 length
SD3_MAX_SEQUENCE_LENGTH = 256
SANA_MAX_SEQUENCE_LENGTH = 300
SANA_GUIDANCE = 4.5  # SANA-Sprint card
SANA_MAX_TIMESTEP = 1.57080
SANA_INTERMEDIATE_TIMESTEP = 1.3
PIXART_DMD_TIMESTEP = 400  # the release's demo: timesteps=[400], guidance 1, one step
PIXART_MAX_SEQUENCE_LENGTH = 120
STEP_NOISE_SEED = 0  # the SANA 2-step re-noising draw


# ------------------------------------------------------------------------------ the generators


class FewStepTransformerGenerator(OneStepGenerator):
    """A diffusers transformer pipeline run as a differentiable few-step generator (module doc).

    Subclasses implement ``encode_prompts`` and ``_sample(noise, embeds, num_steps)`` (the x0
    latent, unpacked, in the VAE's normalised space); everything else is shared.
    """

    trainable_name = "transformer"

    def __init__(
        self,
        pipe,
        spec: FewStepSpec,
        *,
        recipe=None,
        num_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        gradient_checkpointing: bool = True,
        vae_upcast: bool = True,
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.spec = spec
        self.recipe = recipe  # how it was loaded (`noise.recipes.Recipe`), recorded in exports
        self.pipe = pipe
        self.transformer = pipe.transformer.eval().requires_grad_(False)
        self.vae = pipe.vae.eval().requires_grad_(False)
        for enc in self._text_encoders().values():
            enc.eval().requires_grad_(False)
        self.scheduler = pipe.scheduler
        self.dtype = self.transformer.dtype
        if vae_upcast and self.vae.dtype in (torch.float16, torch.bfloat16):
            self.vae.to(torch.float32)
        self.num_steps = check_num_steps(spec, num_steps)
        self.height = height or spec.recipe.size
        self.width = width or spec.recipe.size
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
            if getattr(self.vae, "_supports_gradient_checkpointing", False):
                self.vae.enable_gradient_checkpointing()

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        out = {}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(self.pipe, name, None)
            if enc is not None:
                out[name] = enc
        return out

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    # ---------------------------------------------------------------- shape

    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def latent_multiple(self) -> int:
        """The latent side must be a multiple of this (the transformer's patch size)."""
        return int(getattr(self.transformer.config, "patch_size", 1) or 1)

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        h, w = height or self.height, width or self.width
        f = self.vae_scale_factor * self.latent_multiple()
        if h % f or w % f:
            raise DiffalignError(f"--height/--width ({h}x{w}) must be multiples of {f}")
        return (self.latent_channels(), h // self.vae_scale_factor, w // self.vae_scale_factor)

    def image_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    # ---------------------------------------------------------------- sampling

    def _sample(self, noise: torch.Tensor, embeds: PromptEmbeds, num_steps: int) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """The sampled ``x0`` latent (float32, unpacked ``[B, C, h, w]``) from the initial noise."""
        self.check_noise(noise, embeds)
        return self._sample(noise.to(self.device, torch.float32), embeds, self.num_steps)

    def generate(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.decode(self.denoise(noise, embeds))

    @torch.no_grad()
    def render(self, noise: torch.Tensor, embeds: PromptEmbeds, num_steps: int) -> torch.Tensor:
        """Images from ``num_steps`` steps of the same model (no gradient)."""
        steps = check_num_steps(self.spec, num_steps, option="--final-steps")
        self.check_noise(noise, embeds)
        return self.decode(self._sample(noise.to(self.device, torch.float32), embeds, steps))

    def max_steps(self) -> int:
        return self.spec.max_steps

    # ---------------------------------------------------------------- VAE

    def _shift_scale(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(getattr(cfg, "shift_factor", None) or 0.0), float(cfg.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1] (the pipelines' ``x / scale + shift`` and postprocess)."""
        shift, scale = self._shift_scale()
        x = latents.to(self.vae.dtype) / scale + shift
        image = self.vae.decode(x, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE latent of images in [0, 1], normalised as the latents `denoise` returns."""
        shift, scale = self._shift_scale()
        x = images.to(self.device, self.vae.dtype) * 2.0 - 1.0
        enc = self.vae.encode(x)
        lat = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latent
        return ((lat - shift) * scale).float()

    # ---------------------------------------------------------------- fine-tuning

    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae, **self._text_encoders()}

    def compiled_modules(self) -> dict[str, torch.nn.Module]:
        # `--compile`: the transformer (its repeated blocks) and the VAE's decoder
        return {
            "transformer": self.transformer,
            "vae.decoder": getattr(self.vae, "decoder", self.vae),
        }

    def frozen_copy(self) -> FewStepTransformerGenerator:
        import copy

        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.transformer = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        return new

    def load_lora(self, path: str | Path, adapter_name: str = "default") -> None:
        """Load a LoRA export (a folder or file) onto the transformer."""
        if not hasattr(self.pipe, "load_lora_weights"):
            raise DiffalignError(no_lora_message(self))
        self.pipe.load_lora_weights(str(path), adapter_name=adapter_name)

    def fuse_lora(self) -> None:
        if not hasattr(self.pipe, "fuse_lora"):
            raise DiffalignError(no_lora_message(self))
        self.pipe.fuse_lora()

    def export_finetuned(self, out_dir, info: dict | None = None) -> None:
        """Full transformer: the whole pipeline (`save_pretrained`) plus the kind it runs as; a
        LoRA: `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights` reads."""
        from diffalign.engine.io import write_json
        from diffalign.noise.recipes import RECIPE_FILE, recipe_record

        if getattr(self.transformer, "peft_config", None):
            from diffalign.engine.lora import save_transformer_lora

            save_transformer_lora(type(self.pipe), out_dir, self.transformer)
            export = "lora"
        else:
            self.pipe.save_pretrained(str(out_dir), safe_serialization=True)
            export = "pipeline"
        record = recipe_record(self.spec.recipe, export, self.recipe, None)
        write_json(Path(out_dir) / RECIPE_FILE, {**record, "num_steps": self.num_steps})


def no_lora_message(gen: OneStepGenerator) -> str:
    """Why a generator takes no LoRA (PixArt-alpha: neither its pipeline nor its transformer
    has diffusers' LoRA loaders in 0.42), and what to do instead."""
    return (
        f"{gen.name} takes no LoRA: its {type(gen.pipe).__name__} / "
        f"{type(gen.trainable_module()).__name__} have no diffusers LoRA loader; fine-tune the "
        "whole transformer (leave out --lora-rank / --init-lora)"
    )


def check_num_steps(spec: FewStepSpec, num_steps: int | None, option: str = "--num-steps") -> int:
    """``num_steps`` within the kind's range (None: its default); else one line."""
    if num_steps is None:
        return spec.default_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise DiffalignError(f"{option} must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= spec.max_steps:
        if spec.max_steps == 1:
            raise DiffalignError(
                f"{option} {num_steps}: {spec.name} samples in exactly 1 step (no multi-step "
                "sampling)"
            )
        raise DiffalignError(
            f"{option} {num_steps} is outside {spec.name}'s range 1..{spec.max_steps}"
        )
    return num_steps


class FluxSchnellGenerator(FewStepTransformerGenerator):
    """FLUX.1-schnell: packed latents, FlowMatchEuler with sigmas ``linspace(1, 1/n, n)``."""

    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def latent_multiple(self) -> int:
        return 2  # 2x2 packing

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        pe, pooled, _ = self.pipe.encode_prompt(
            prompt=[str(p) for p in prompts],
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH,
        )
        return {"prompt_embeds": pe.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def _sample(self, noise: torch.Tensor, embeds: PromptEmbeds, num_steps: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        pipe, cfg = self.pipe, self.scheduler.config
        b, c, h, w = noise.shape
        latents = pipe._pack_latents(noise, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        pe = embeds["prompt_embeds"]
        txt_ids = torch.zeros(pe.shape[1], 3, device=self.device, dtype=self.dtype)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if cfg.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )

        def set_schedule() -> None:
            retrieve_timesteps(self.scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
            self.scheduler.set_begin_index(0)

        key = (str(self.device), num_steps, h, w)
        cached_schedule(self, self.scheduler, key, set_schedule)  # no host sync per call
        timesteps = self.scheduler.timesteps
        guidance = None
        if self.transformer.config.guidance_embeds:  # not schnell; kept for FLUX.1-dev folders
            guidance = torch.zeros(b, device=self.device, dtype=torch.float32)
        for t in timesteps:
            timestep = t.expand(b).to(latents.dtype)
            pred = self.transformer(
                hidden_states=latents.to(self.dtype),
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=embeds["pooled_prompt_embeds"],
                encoder_hidden_states=pe,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
        return pipe._unpack_latents(
            latents, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor
        ).float()


class SD3TurboGenerator(FewStepTransformerGenerator):
    """SD3.5-Large-Turbo: FlowMatchEuler, guidance 0 (no CFG), gradients through every step."""

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        pe, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[str(p) for p in prompts],
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=SD3_MAX_SEQUENCE_LENGTH,
        )
        return {"prompt_embeds": pe.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def _sample(self, noise: torch.Tensor, embeds: PromptEmbeds, num_steps: int) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        cfg = self.scheduler.config
        kwargs: dict[str, Any] = {}
        if cfg.get("use_dynamic_shifting", None):
            p = self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (noise.shape[-2] // p) * (noise.shape[-1] // p),
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )

        def set_schedule() -> None:
            retrieve_timesteps(self.scheduler, num_steps, self.device, **kwargs)
            self.scheduler.set_begin_index(0)

        key = (str(self.device), num_steps, *noise.shape[-2:])
        cached_schedule(self, self.scheduler, key, set_schedule)  # no host sync per call
        timesteps = self.scheduler.timesteps
        latents = noise
        for t in timesteps:
            pred = self.transformer(
                hidden_states=latents.to(self.dtype),
                timestep=t.expand(latents.shape[0]),
                encoder_hidden_states=embeds["prompt_embeds"],
                pooled_projections=embeds["pooled_prompt_embeds"],
                return_dict=False,
            )[0]
            latents = self.scheduler.step(pred, t, latents, return_dict=False)[0]
        return latents.float()


class SanaSprintGenerator(FewStepTransformerGenerator):
    """SANA-Sprint: TrigFlow/SCM with embedded guidance (its pipeline's loop, written once)."""

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        import inspect

        chi = inspect.signature(type(self.pipe).__call__).parameters["complex_human_instruction"]
        pe, mask = self.pipe.encode_prompt(
            [str(p) for p in prompts],
            num_images_per_prompt=1,
            device=self.device,
            clean_caption=False,
            max_sequence_length=SANA_MAX_SEQUENCE_LENGTH,
            complex_human_instruction=chi.default,  # the pipeline's default instruction
        )
        return {"prompt_embeds": pe.to(self.dtype), "prompt_attention_mask": mask}

    def _sample(self, noise: torch.Tensor, embeds: PromptEmbeds, num_steps: int) -> torch.Tensor:
        sched = self.scheduler

        def set_schedule() -> None:
            sched.set_timesteps(
                num_steps,
                device=self.device,
                max_timesteps=SANA_MAX_TIMESTEP,
                intermediate_timesteps=SANA_INTERMEDIATE_TIMESTEP if num_steps == 2 else None,
            )
            sched.set_begin_index(0)

        cached_schedule(self, sched, (str(self.device), num_steps), set_schedule)
        sigma_data = sched.config.sigma_data
        b = noise.shape[0]
        pe = embeds["prompt_embeds"]
        guidance = torch.full([b], SANA_GUIDANCE, device=self.device, dtype=torch.float32)
        guidance = guidance.to(pe.dtype) * self.transformer.config.guidance_embeds_scale
        step_noise = torch.Generator().manual_seed(STEP_NOISE_SEED)
        latents = noise * sigma_data
        denoised = latents
        for t in sched.timesteps[:-1]:
            s = torch.sin(t.expand(b)) / (torch.cos(t.expand(b)) + torch.sin(t.expand(b)))
            s4 = s.view(-1, 1, 1, 1)
            norm = torch.sqrt(s4**2 + (1 - s4) ** 2)
            model_in = latents / sigma_data * norm
            pred = self.transformer(
                model_in.to(self.dtype),
                encoder_hidden_states=pe.to(self.dtype),
                encoder_attention_mask=embeds["prompt_attention_mask"],
                guidance=guidance,
                timestep=s,
                return_dict=False,
            )[0]
            pred = ((1 - 2 * s4) * model_in + (1 - 2 * s4 + 2 * s4**2) * pred) / norm
            pred = pred.float() * sigma_data
            latents, denoised = sched.step(
                pred, t.expand(b), latents, generator=step_noise, return_dict=False
            )
        return (denoised / sigma_data).float()


class PixArtDMDGenerator(FewStepTransformerGenerator):
    """PixArt-alpha DMD: one DDPM step at t = 400, the x0 prediction (learned sigma dropped)."""

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        pe, mask, _, _ = self.pipe.encode_prompt(
            [str(p) for p in prompts],
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.device,
            clean_caption=False,
            max_sequence_length=PIXART_MAX_SEQUENCE_LENGTH,
        )
        return {"prompt_embeds": pe.to(self.dtype), "prompt_attention_mask": mask}

    def init_noise_sigma(self) -> float:
        """DDPM's ``init_noise_sigma`` (1), the factor ``_sample`` scales the noise by."""
        return float(self.scheduler.init_noise_sigma)

    def _sample(self, noise: torch.Tensor, embeds: PromptEmbeds, num_steps: int) -> torch.Tensor:
        sched = self.scheduler
        cached_schedule(  # set once: no host-to-device copy per call
            self,
            sched,
            (str(self.device),),
            lambda: sched.set_timesteps(timesteps=[PIXART_DMD_TIMESTEP], device=self.device),
        )
        t = sched.timesteps[0]
        b, c = noise.shape[:2]
        latents = noise * sched.init_noise_sigma
        model_in = sched.scale_model_input(latents, t)
        cond: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if self.transformer.config.sample_size == 128:  # the 1024 px models' size conditioning
            h, w = (s * self.vae_scale_factor for s in noise.shape[-2:])
            cond = {
                "resolution": torch.tensor([[h, w]], device=self.device, dtype=self.dtype).repeat(
                    b, 1
                ),
                "aspect_ratio": torch.tensor(
                    [[h / w]], device=self.device, dtype=self.dtype
                ).repeat(b, 1),
            }
        pred = self.transformer(
            model_in.to(self.dtype),
            encoder_hidden_states=embeds["prompt_embeds"],
            encoder_attention_mask=embeds["prompt_attention_mask"],
            timestep=t[None].to(self.device).expand(b),
            added_cond_kwargs=cond,
            return_dict=False,
        )[0]
        if self.transformer.config.out_channels // 2 == c:
            pred = pred.chunk(2, dim=1)[0]  # learned sigma
        g = torch.Generator().manual_seed(STEP_NOISE_SEED)  # DDPM's (unused) variance draw
        return sched.step(pred, t, latents, generator=g, return_dict=False)[1].float()


_CLASSES: dict[str, type[FewStepTransformerGenerator]] = {
    "flux-schnell": FluxSchnellGenerator,
    "sd3.5-large-turbo": SD3TurboGenerator,
    "sana-sprint": SanaSprintGenerator,
    "pixart-dmd": PixArtDMDGenerator,
}


def pipeline_kwargs(gen: FewStepTransformerGenerator, num_steps: int | None = None) -> dict:
    """What ``pipe(prompt, latents=..., **kw)`` needs to take the generator's own path (for
    reference checks against the diffusers pipeline)."""
    n = num_steps or gen.num_steps
    kw: dict[str, Any] = {"num_inference_steps": n, "height": gen.height, "width": gen.width}
    if gen.name == "flux-schnell":
        kw.update(guidance_scale=0.0, max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH)
    elif gen.name == "sd3.5-large-turbo":
        kw.update(guidance_scale=0.0, max_sequence_length=SD3_MAX_SEQUENCE_LENGTH)
    elif gen.name == "sana-sprint":
        kw.update(
            guidance_scale=SANA_GUIDANCE,
            max_sequence_length=SANA_MAX_SEQUENCE_LENGTH,
            intermediate_timesteps=SANA_INTERMEDIATE_TIMESTEP if n == 2 else None,
            use_resolution_binning=False,
            generator=torch.Generator().manual_seed(STEP_NOISE_SEED),
        )
    else:
        kw.update(
            timesteps=[PIXART_DMD_TIMESTEP],
            guidance_scale=1.0,
            max_sequence_length=PIXART_MAX_SEQUENCE_LENGTH,
            clean_caption=False,
            use_resolution_binning=False,
        )
    return kw


# ------------------------------------------------------------------------------ loading


def recorded_num_steps(recipe) -> int | None:
    """The step count a `noise sft` export of this recipe recorded (its newest LoRA export's,
    else the pipeline export's), else None."""
    from diffalign.noise.recipes import read_recorded_recipe

    for source in (*reversed(recipe.loras), recipe.model):
        record = read_recorded_recipe(source)
        steps = (record or {}).get("num_steps")
        if isinstance(steps, int) and not isinstance(steps, bool):
            return steps
    return None


def load_fewstep_generator(
    recipe,
    *,
    num_steps: int | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    height: int | None = None,
    width: int | None = None,
    gradient_checkpointing: bool = True,
) -> FewStepTransformerGenerator:
    """Load the few-step generator a :class:`~diffalign.noise.recipes.Recipe` names (its kind,
    the pipeline to load, LoRA exports to fuse) through ``engine.loading.load_pipeline``."""
    import diffusers

    from diffalign.engine.loading import load_pipeline, parse_dtype
    from diffalign.noise.generators import _fuse_finetuned_lora

    kind = recipe.spec.name
    spec = FEWSTEP_GENERATORS[kind]
    if num_steps is None:  # a fine-tuned export samples as it was trained
        num_steps = recorded_num_steps(recipe)
    steps = check_num_steps(spec, num_steps)  # before minutes of loading
    torch_dtype = parse_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(
        recipe.model,
        getattr(diffusers, recipe.spec.pipeline_class),
        recipe.spec.family,
        dtype=torch_dtype,
        device=None,
        expect={"transformer": getattr(diffusers, spec.transformer)},
    )
    if kind == "flux-schnell" and pipe.transformer.config.guidance_embeds:
        raise DiffalignError(
            f"--model {recipe.model}: its transformer embeds guidance (FLUX.1-dev), not "
            "FLUX.1-schnell"
        )
    for i, lora in enumerate(recipe.loras):  # fine-tuned LoRA exports, in the order made
        _fuse_finetuned_lora(pipe, lora, f"finetuned{i}")
    pipe.to(device)
    return _CLASSES[kind](
        pipe,
        spec,
        recipe=recipe,
        num_steps=steps,
        height=height,
        width=width,
        gradient_checkpointing=gradient_checkpointing,
    )
