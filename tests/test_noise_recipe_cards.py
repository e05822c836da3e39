"""Each generator kind against its release's own published call, written out here literally
(the model card's / release demo's scheduler, step count, timesteps, guidance, text length), not
read from our recipe objects (`pipeline_kwargs`, `GENERATORS`, `flow_generators` constants): a
wrong constant in the recipe fails here. The reference pipeline is built in the test from the
same tiny folder; only the image size is the tiny one (the card's size is checked separately).
FLUX.1-schnell's card call is `test_flux_schnell_is_renos_one_step_call`.

Sources: stabilityai/sdxl-turbo and stabilityai/sd-turbo cards (1 step, guidance 0, 512 px; the
releases' schedulers: EulerAncestral / Euler with trailing spacing), ByteDance/Hyper-SD card
(SD 1.5 unified 1-step LoRA: fused, TCD, eta 1, guidance 0; SDXL 1-step U-Net: LCM,
`timesteps=[800]`, guidance 0), stabilityai/stable-diffusion-3.5-large-turbo card (4 steps,
guidance 0), Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers card (2 steps, the
pipeline's defaults otherwise), PixArt-sigma `app/app_pixart_dmd.py` for
PixArt-Alpha-DMD-XL-2-512x512 (`timesteps=[400]`, 1 step, guidance 1, T5 length 120) and
ReNO's `RewardPixartPipeline` (the same, `clean_caption=False`).
"""

from __future__ import annotations

import pytest
import torch

from diffalign.noise.generators import load_generator

# the second prompt is longer than every text length (CLIP 77, T5 120/256, Gemma 300 tokens),
# so a wrong length truncates it elsewhere
PROMPTS = ["a cat", " ".join(["a red dog on a green lawn"] * 60)]


def _noise(gen, seed: int = 0) -> torch.Tensor:
    return gen.sample_noise(len(PROMPTS), generator=torch.Generator().manual_seed(seed))


def _ours(gen, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gen.generate(z, gen.encode_prompts(PROMPTS))


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    diff = float((ours - ref).abs().max())
    assert diff <= tol, diff


# ------------------------------------------------------------------ U-Net one-step kinds


def test_sdxl_turbo_is_its_card_call(tiny_model_dir):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    folder = tiny_model_dir("sdxl")  # carries SDXL-Turbo's card: recognised as sdxl-turbo
    gen = load_generator(folder, None, height=32, width=32, device="cpu")
    assert gen.name == "sdxl-turbo" and gen.image_size() == (32, 32)
    z = _noise(gen)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPTS,
            num_inference_steps=1,
            guidance_scale=0.0,
            height=32,
            width=32,
            latents=z.clone(),
            output_type="pt",
        ).images
    assert pipe.scheduler.timesteps.tolist() == [999]
    _close(_ours(gen, z), ref)


def test_sd_turbo_is_its_card_call(tiny_model_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    folder = tiny_model_dir("sd21")  # carries SD-Turbo's card
    gen = load_generator(folder, None, height=32, width=32, device="cpu")
    assert gen.name == "sd-turbo"
    z = _noise(gen, 1)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPTS,
            num_inference_steps=1,
            guidance_scale=0.0,
            height=32,
            width=32,
            latents=z.clone(),
            output_type="pt",
        ).images
    assert pipe.scheduler.timesteps.tolist() == [999]
    _close(_ours(gen, z), ref)


def test_hyper_sd15_is_its_card_call(tiny_model_dir):
    from diffusers import StableDiffusionPipeline, TCDScheduler

    folder, lora = (
        tiny_model_dir("sd15"),
        f"{tiny_model_dir('hyper-sd')}/Hyper-SD15-1step-lora.safetensors",
    )
    gen = load_generator(folder, "hyper-sd15", weights=lora, height=32, width=32, device="cpu")
    z = _noise(gen, 2)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPTS,
            num_inference_steps=1,
            guidance_scale=0.0,
            eta=1.0,
            height=32,
            width=32,
            latents=z.clone(),
            output_type="pt",
        ).images
    _close(_ours(gen, z), ref)


def test_hyper_sdxl_is_its_card_call(tiny_model_dir):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    folder = tiny_model_dir("sdxl")
    unet_file = f"{tiny_model_dir('hyper-sd')}/Hyper-SDXL-1step-Unet.safetensors"
    gen = load_generator(folder, "hyper-sdxl", weights=unet_file, height=32, width=32, device="cpu")
    z = _noise(gen, 3)
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(folder, subfolder="unet")
    )
    unet.load_state_dict(load_file(unet_file))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, unet=unet)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPTS,
            num_inference_steps=1,
            guidance_scale=0.0,
            timesteps=[800],
            height=32,
            width=32,
            latents=z.clone(),
            output_type="pt",
        ).images
    _close(_ours(gen, z), ref)


# ------------------------------------------------------------ few-step transformer kinds


def test_sd35_large_turbo_is_its_card_call(tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline

    folder = tiny_model_dir("sd35-turbo")
    gen = load_generator(folder, None, height=32, width=32, device="cpu")
    assert gen.name == "sd3.5-large-turbo" and gen.num_steps == 4  # the card's step count
    z = _noise(gen, 4)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    with torch.no_grad():  # the card: num_inference_steps=4, guidance_scale=0.0 (else defaults)
        ref = pipe(
            prompt=PROMPTS,
            num_inference_steps=4,
            guidance_scale=0.0,
            height=32,
            width=32,
            latents=z.clone(),
            output_type="pt",
        ).images
    _close(_ours(gen, z), ref)


def test_sana_sprint_is_its_card_call(tiny_model_dir):
    from diffusers import SanaSprintPipeline

    folder = tiny_model_dir("sana-sprint")
    gen = load_generator(folder, None, height=64, width=64, device="cpu")
    assert gen.name == "sana-sprint" and gen.num_steps == 2  # the card's step count
    z = _noise(gen, 5)
    pipe = SanaSprintPipeline.from_pretrained(folder)
    with torch.no_grad():
        # the card: num_inference_steps=2, everything else the pipeline's defaults (guidance
        # 4.5, max_timesteps 1.5708, intermediate 1.3, Gemma length 300, its instruction);
        # resolution binning maps the card's square 1024 px to itself, so it is off for the
        # tiny 64 px; the generator seeds the 2-step re-noising draw with 0 (its own choice)
        ref = pipe(
            prompt=PROMPTS,
            num_inference_steps=2,
            height=64,
            width=64,
            use_resolution_binning=False,
            generator=torch.Generator().manual_seed(0),
            latents=z.clone(),
            output_type="pt",
        ).images
        ref1 = pipe(  # one step: the SCM scheduler takes no intermediate timestep
            prompt=PROMPTS,
            num_inference_steps=1,
            intermediate_timesteps=None,
            height=64,
            width=64,
            use_resolution_binning=False,
            latents=z.clone(),
            output_type="pt",
        ).images
    _close(_ours(gen, z), ref)
    gen1 = load_generator(folder, None, height=64, width=64, device="cpu", num_steps=1)
    _close(_ours(gen1, z), ref1)


def test_pixart_dmd_is_its_demo_call(tiny_model_dir):
    from diffusers import PixArtAlphaPipeline

    folder = tiny_model_dir("pixart-dmd")
    gen = load_generator(folder, None, height=32, width=32, device="cpu")
    assert gen.name == "pixart-dmd"
    z = _noise(gen, 6)
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    with torch.no_grad():
        # the release demo: timesteps=[400], num_inference_steps=1, guidance_scale=1, T5 length
        # 120; clean_caption=False as ReNO (README: deliberately not the demo's default)
        ref = pipe(
            prompt=PROMPTS,
            timesteps=[400],
            num_inference_steps=1,
            guidance_scale=1.0,
            max_sequence_length=120,
            clean_caption=False,
            height=32,
            width=32,
            use_resolution_binning=False,
            latents=z.clone(),
            output_type="pt",
        ).images
    _close(_ours(gen, z), ref)


# ------------------------------------------------------------------ the cards' image sizes


@pytest.mark.parametrize(
    "kind,size",
    [
        ("sdxl-turbo", 512),
        ("sd-turbo", 512),
        ("hyper-sd15", 512),
        ("hyper-sdxl", 1024),
        ("flux-schnell", 1024),
        ("sd3.5-large-turbo", 1024),
        ("sana-sprint", 1024),
        ("pixart-dmd", 512),
    ],
)
def test_default_size_is_the_cards(kind, size):
    from diffalign.noise.recipes import GENERATORS

    assert GENERATORS[kind].size == size
