"""Real one-step diffusion generators behind one interface (spec N; issue "Generators").

Each generator runs its diffusers pipeline's own one-step path, differentiably from the initial
noise through the U-Net, the scheduler step and the VAE decoder:

    latents = z * init_noise_sigma
    eps     = unet(scheduler.scale_model_input(latents, t), t, text conditioning)
    x0      = scheduler.step(eps, t, latents).prev_sample      (the last step: no noise added)
    image   = (vae.decode(x0 / scaling_factor) / 2 + 0.5).clamp(0, 1)

which equals ``pipe(prompt, num_inference_steps=1, guidance_scale=0, latents=z,
output_type="pt")`` (tested per generator on tiny models). Kinds (DIFFUSERS-FACTS "SDXL-Turbo
one step", "One-step generators"):

- ``sdxl-turbo``: SDXL-Turbo, EulerAncestral with trailing spacing, t = 999, 512 px;
- ``sd-turbo``: SD-Turbo (SD 2.1 U-Net), Euler with trailing spacing, t = 999, 512 px;
- ``hyper-sd15``: SD 1.5 + the Hyper-SD 1-step LoRA (fused), TCD, eta 1, t = 999, 512 px;
- ``hyper-sdxl``: SDXL base with the Hyper-SDXL 1-step U-Net, LCM at timestep 800, 1024 px.

Precision: ``dtype`` for the U-Net and text encoders; the VAE runs in float32 when the model
runs in fp16/bf16 (the seed's VAE upcast), unless ``vae`` names another VAE (e.g. the fp16-fix
SDXL VAE), which then runs in ``dtype``. Gradient checkpointing of the U-Net and the VAE decoder
is on by default (it only acts while gradients are recorded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.noise.onestep import OneStepGenerator, PromptEmbeds, cached_schedule
from diffalign.noise.recipes import (
    GENERATORS,
    RECIPE_FILE,
    GeneratorSpec,
    Recipe,
    generator_recipe,
    recipe_record,
)

__all__ = [
    "GENERATORS",
    "DiffusionOneStepGenerator",
    "GeneratorSpec",
    "OneStepGenerator",
    "generator_recipe",
    "load_generator",
]


def _scheduler(kind: str, config):
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        TCDScheduler,
    )

    if kind == "euler_ancestral":
        return EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if kind == "tcd":
        return TCDScheduler.from_config(config)
    if kind == "lcm":
        return LCMScheduler.from_config(config)
    raise DiffalignError(f"unknown scheduler kind {kind!r}")


class DiffusionOneStepGenerator(OneStepGenerator):
    """A diffusers SD / SDXL pipeline run as a differentiable one-step generator (module doc)."""

    def __init__(
        self,
        pipe,
        spec: GeneratorSpec,
        *,
        height: int | None = None,
        width: int | None = None,
        gradient_checkpointing: bool = True,
        vae_upcast: bool = True,
        recipe: Recipe | None = None,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.spec = spec
        # how it was loaded, recorded in its exports: the recipe and the extra weights applied
        self.recipe = recipe
        self.weights_path = weights_path
        self.pipe = pipe
        self.unet = pipe.unet.eval().requires_grad_(False)
        self.vae = pipe.vae.eval().requires_grad_(False)
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(pipe, name, None)
            if enc is not None:
                enc.eval().requires_grad_(False)
        self.scheduler = _scheduler(spec.scheduler, pipe.scheduler.config)
        pipe.scheduler = self.scheduler  # the pipeline reference uses the same scheduler
        self.dtype = self.unet.dtype
        if vae_upcast and self.vae.dtype in (torch.float16, torch.bfloat16):
            self.vae.to(torch.float32)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.height = height or spec.size
        self.width = width or spec.size
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if getattr(self.vae, "_supports_gradient_checkpointing", False):
                self.vae.enable_gradient_checkpointing()

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What the pipeline call needs to take the same one step (for reference checks)."""
        kw: dict[str, Any] = {"num_inference_steps": 1, "guidance_scale": 0.0}
        if self.spec.timesteps:
            kw["timesteps"] = list(self.spec.timesteps)
        if self.spec.eta is not None:
            kw["eta"] = self.spec.eta
        return kw

    # ---------------------------------------------------------------- interface

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple:
        h, w = height or self.height, width or self.width
        f = self.vae_scale_factor
        if h % f or w % f:
            raise DiffalignError(f"--height/--width ({h}x{w}) must be multiples of {f}")
        return (self.unet.config.in_channels, h // f, w // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        prompts = [str(p) for p in prompts]
        if self.spec.pipeline == "sdxl":
            pe, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            return {
                "prompt_embeds": pe.to(self.dtype),
                "pooled_prompt_embeds": pooled.to(self.dtype),
            }
        pe, _ = self.pipe.encode_prompt(
            prompts, self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": pe.to(self.dtype)}

    def init_noise_sigma(self) -> float:
        """The scheduler's ``init_noise_sigma`` once its one-step timesteps are set (EulerAncestral
        / Euler trailing: ``sigma_max``, 14.6 on the SD-2/SDXL schedules; TCD, LCM: 1)."""
        self._timestep()
        return float(self.scheduler.init_noise_sigma)

    def _timestep(self) -> torch.Tensor:
        """Put the scheduler in its one-step state (set once per device: `cached_schedule`,
        no host sync per call) and return the step's timestep."""

        def set_schedule() -> None:
            sched = self.scheduler
            if self.spec.timesteps:
                sched.set_timesteps(timesteps=list(self.spec.timesteps), device=self.device)
            else:
                sched.set_timesteps(1, device=self.device)
            if len(sched.timesteps) == 1:  # index_for_timestep's answer for the one timestep
                sched.set_begin_index(0)

        cached_schedule(self, self.scheduler, (str(self.device),), set_schedule)
        return self.scheduler.timesteps[0]

    def _unet_kwargs(self, embeds: PromptEmbeds, height: int, width: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": embeds["prompt_embeds"]}
        if self.spec.pipeline == "sdxl":
            b = embeds["prompt_embeds"].shape[0]
            key = (b, height, width, str(self.device), self.dtype)
            cache = self.__dict__.setdefault("_time_ids", {})
            if key not in cache:  # built once: a host-to-device copy (a host sync) per call else
                cache[key] = torch.tensor(
                    [[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device
                ).repeat(b, 1)  # original size, crop (0, 0), target size: the pipeline's defaults
            time_ids = cache[key]
            kw["added_cond_kwargs"] = {
                "text_embeds": embeds["pooled_prompt_embeds"],
                "time_ids": time_ids,
            }
        return kw

    def denoise(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """The one denoising step: ``x0`` latents (float32) from the initial noise."""
        self.check_noise(noise, embeds)
        t = self._timestep()
        latents = noise.to(self.device, torch.float32) * self.scheduler.init_noise_sigma
        model_in = self.scheduler.scale_model_input(latents, t).to(self.dtype)
        h, w = (s * self.vae_scale_factor for s in noise.shape[-2:])
        eps = self.unet(model_in, t, **self._unet_kwargs(embeds, h, w), return_dict=False)[0]
        kwargs = {"eta": self.spec.eta} if self.spec.eta is not None else {}
        return self.scheduler.step(eps.float(), t, latents, **kwargs, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1] (the pipelines' latent scaling and postprocessing)."""
        cfg = self.vae.config
        x = latents.to(self.vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            x = x * std_t / cfg.scaling_factor + mean_t
        else:
            x = x / cfg.scaling_factor
        image = self.vae.decode(x, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def generate(self, noise: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        return self.decode(self.denoise(noise, embeds))

    # ------------------------------------------------ assignment and fine-tuning (spec N)

    def image_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior mode of images in [0, 1], scaled like the latents `denoise` returns."""
        cfg = self.vae.config
        x = images.to(self.device, self.vae.dtype) * 2.0 - 1.0
        lat = self.vae.encode(x).latent_dist.mode()
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
            std_t = torch.tensor(std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1)
            lat = (lat - mean_t) * cfg.scaling_factor / std_t
        else:
            lat = lat * cfg.scaling_factor
        return lat.float()

    trainable_name = "unet"

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"vae": self.vae}
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(self.pipe, name, None)
            if enc is not None:
                mods[name] = enc
        return mods

    def compiled_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae.decoder": self.vae.decoder}

    def frozen_copy(self) -> DiffusionOneStepGenerator:
        import copy

        new = copy.copy(self)
        new._modules = dict(self._modules)  # nn.Module keeps children in this dict: unshare it
        new.unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        return new

    def load_lora(self, path, adapter_name: str = "default") -> None:
        """Load a LoRA export (a folder or file `pipe.load_lora_weights` reads) onto the U-Net."""
        self.pipe.load_lora_weights(str(path), adapter_name=adapter_name)

    def fuse_lora(self) -> None:
        self.pipe.fuse_lora()

    def export_finetuned(self, out_dir, info: dict | None = None) -> None:
        """Full U-Net: the whole pipeline (`save_pretrained`, loadable as `--model`); a U-Net
        with a LoRA adapter: `pytorch_lora_weights.safetensors` that `pipe.load_lora_weights`
        reads (diffusers' LoRA layout). Either records its recipe (``RECIPE_FILE``), so it
        loads again as this kind, the Hyper-SD weights applied exactly once."""
        from diffalign.engine.io import write_json

        if getattr(self.unet, "peft_config", None):
            from diffalign.engine.lora import save_unet_lora

            save_unet_lora(type(self.pipe), out_dir, self.unet)
            export = "lora"
        else:
            self.pipe.save_pretrained(str(out_dir), safe_serialization=True)
            export = "pipeline"
        record = recipe_record(self.spec, export, self.recipe, self.weights_path)
        write_json(Path(out_dir) / RECIPE_FILE, record)


# ------------------------------------------------------------------ loading


def default_weights_path(spec: GeneratorSpec) -> Path | None:
    """Where `diffalign download --only hyper-sd` puts the kind's extra weights."""
    if spec.weights_file is None:
        return None
    from diffalign.engine.loading import LEGACY_MODELS_DIR, models_dir

    for base in (models_dir(), Path(LEGACY_MODELS_DIR)):
        cand = base / str(spec.weights_asset) / spec.weights_file
        if cand.is_file():
            return cand
    return models_dir() / str(spec.weights_asset) / spec.weights_file


def _fuse_lora(pipe, source, adapter: str) -> None:
    """Load a LoRA (file tensors or a folder), fuse it into the U-Net and drop its adapter
    layers, keeping the fused weights: a later LoRA then loads onto plain weights (loading one
    beside a fused adapter unmerges that adapter and leaves it inactive)."""
    pipe.load_lora_weights(source, adapter_name=adapter)
    pipe.fuse_lora(adapter_names=[adapter])
    pipe.unload_lora_weights()


def _apply_lora(pipe, path: Path, spec: GeneratorSpec) -> int:
    """Fuse a LoRA file (kohya `lora_unet_*` or diffusers/peft keys) into the U-Net; return how
    many U-Net weights it changed (0 means the file does not fit this U-Net)."""
    from diffalign.engine.errors import library_output_held
    from diffalign.engine.io import load_tensors

    tensors, _ = load_tensors(path)  # safetensors only in practice; .pt via weights_only
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if k.endswith("weight")}
    try:
        with library_output_held():  # diffusers logs the failure itself: our line alone
            _fuse_lora(pipe, tensors, "onestep")
    except (ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DiffalignError(f"{path}: not a {spec.name} LoRA for this model ({first})") from None
    after = pipe.unet.state_dict()
    changed = sum(1 for k, v in before.items() if k in after and not torch.equal(after[k], v))
    if changed == 0:
        raise DiffalignError(f"{path}: no LoRA weight in it matches this model's U-Net")
    return changed


def _apply_unet(pipe, path: Path, spec: GeneratorSpec) -> None:
    from diffalign.engine.io import load_tensors

    tensors, _ = load_tensors(path)
    missing, unexpected = [], []
    state = pipe.unet.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    bad_shape = [k for k in tensors if k in state and tensors[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        detail = (
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(bad_shape)} of the wrong "
            f"shape (e.g. {(missing + unexpected + bad_shape)[0]})"
        )
        raise DiffalignError(
            f"{path}: not a {spec.name} U-Net for this base model ({detail}); it must be a "
            "diffusers UNet2DConditionModel state dict"
        )
    pipe.unet.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()})


def _expected_components(spec: GeneratorSpec) -> dict[str, type]:
    """Components the one-step path uses (SDXL pipelines list the text encoders as optional,
    so a folder without them would load and fail later)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

    expect = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": PreTrainedTokenizerBase,
    }
    if spec.pipeline == "sdxl":
        expect.update(
            text_encoder_2=CLIPTextModelWithProjection, tokenizer_2=PreTrainedTokenizerBase
        )
    return expect


def load_generator(
    model: str | None = None,
    generator: str | None = None,
    *,
    weights: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    vae: str | None = None,
    height: int | None = None,
    width: int | None = None,
    gradient_checkpointing: bool = True,
    num_steps: int | None = None,
) -> OneStepGenerator:
    """Load a one-step generator through ``engine.loading.load_pipeline`` (spec E).

    ``model``: a generator kind (``sdxl-turbo``, ``sd-turbo``, ``hyper-sd15``, ``hyper-sdxl``;
    the base model then comes from its preset), a preset, a local pipeline folder, a Hub id or a
    `noise sft` export (pipeline or LoRA). Its recipe comes from :func:`generator_recipe`
    (``generator``: ``--generator``). ``weights``: the Hyper-SD LoRA / U-Net file (default: the
    one an export recorded, else ``models/hyper-sd/<release file name>``); never applied to a
    model that already holds it. ``vae``: another VAE (e.g. the fp16-fix SDXL VAE), run in
    ``dtype``.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffalign.engine.loading import load_pipeline, load_vae, parse_dtype

    recipe = generator_recipe(model, generator)
    spec = recipe.spec
    from diffalign.noise.flow_generators import FEWSTEP_GENERATORS, load_fewstep_generator

    if spec.name in FEWSTEP_GENERATORS:  # the few-step transformer generators (issue 17)
        if weights:
            raise DiffalignError(f"--weights is for hyper-sd15 / hyper-sdxl, not {spec.name}")
        if vae is not None:
            raise DiffalignError(f"--vae is for the U-Net generators, not {spec.name}")
        return load_fewstep_generator(
            recipe,
            num_steps=num_steps,
            dtype=dtype,
            device=device,
            height=height,
            width=width,
            gradient_checkpointing=gradient_checkpointing,
        )
    if num_steps not in (None, 1):
        raise DiffalignError(
            f"--num-steps {num_steps}: {spec.name} samples in exactly 1 step (no multi-step "
            "sampling)"
        )
    if weights and spec.weights is None:
        raise DiffalignError(f"--weights is for hyper-sd15 / hyper-sdxl, not {spec.name}")
    if weights and recipe.weights_in_model:
        raise DiffalignError(
            f"--model {model} already holds the {spec.name} weights ({recipe.found_by}); drop "
            "--weights"
        )
    base = recipe.model
    torch_dtype = parse_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe_cls = StableDiffusionXLPipeline if spec.pipeline == "sdxl" else StableDiffusionPipeline
    components: dict[str, Any] = {}
    if spec.pipeline == "sd":
        components.update(safety_checker=None, requires_safety_checker=False)
    if vae is not None:
        from diffalign.engine.loading import resolve_model

        resolved = resolve_model(base, spec.family)
        components["vae"] = load_vae(
            vae, config=resolved.source, dtype=torch_dtype, family=spec.family
        )
    pipe = load_pipeline(
        base,
        pipe_cls,
        spec.family,
        dtype=torch_dtype,
        device=None,
        expect=_expected_components(spec),
        **components,
    )
    applied = None
    if spec.weights is not None and not recipe.weights_in_model:
        path = Path(weights or recipe.weights or default_weights_path(spec))
        if not path.is_file():
            raise DiffalignError(
                f"{spec.name} needs {spec.weights_file}: {path} not found; fetch it with "
                f"`diffalign download --only {spec.weights_asset}` or pass --weights FILE"
            )
        if spec.weights == "lora":
            _apply_lora(pipe, path, spec)
        else:
            _apply_unet(pipe, path, spec)
        applied = str(path)
    for i, lora in enumerate(recipe.loras):  # fine-tuned LoRA exports, in the order made
        _fuse_finetuned_lora(pipe, lora, f"finetuned{i}")
    pipe.to(device)
    return DiffusionOneStepGenerator(
        pipe,
        spec,
        height=height,
        width=width,
        gradient_checkpointing=gradient_checkpointing,
        vae_upcast=vae is None,
        recipe=recipe,
        weights_path=applied,
    )


def _fuse_finetuned_lora(pipe, folder: str, adapter: str) -> None:
    """Fuse a `noise sft` LoRA export into the U-Net (diffusers' LoRA layout)."""
    try:
        _fuse_lora(pipe, str(folder), adapter)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DiffalignError(f"{folder}: cannot load its LoRA into this model ({first})") from None
