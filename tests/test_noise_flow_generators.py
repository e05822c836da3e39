"""Few-step transformer generators (issue 17): each equals its own diffusers pipeline, built in
the test from the same tiny folder, for the same noise and settings (fp32); gradients reach z."""

from __future__ import annotations

import functools

import pytest
import torch

from diffalign.noise.flow_generators import pipeline_kwargs
from diffalign.noise.generators import load_generator

# kind -> (make-tiny kind, image size, step counts to check, pipeline class name)
CASES = {
    "flux-schnell": ("flux-schnell", 32, (1, 4), "FluxPipeline"),
    "sd3.5-large-turbo": ("sd35-turbo", 32, (1, 2), "StableDiffusion3Pipeline"),
    "sana-sprint": ("sana-sprint", 64, (1, 2), "SanaSprintPipeline"),
    "pixart-dmd": ("pixart-dmd", 32, (1,), "PixArtAlphaPipeline"),
}


def _pipeline(folder: str, cls_name: str):
    import diffusers

    return getattr(diffusers, cls_name).from_pretrained(folder).to("cpu")


def _packed(pipe, z: torch.Tensor) -> torch.Tensor:
    """The pipeline's own latent input for the unpacked noise (FLUX packs 2x2 patches)."""
    z = z.detach().clone()
    if type(pipe).__name__ == "FluxPipeline":
        b, c, h, w = z.shape
        return pipe._pack_latents(z, b, c, h, w)
    return z


def _unpacked(pipe, lat: torch.Tensor, size: int) -> torch.Tensor:
    if type(pipe).__name__ == "FluxPipeline":
        return pipe._unpack_latents(lat, size, size, pipe.vae_scale_factor)
    return lat


def _case(kind: str, steps: int, tiny_model_dir):
    tiny_kind, size, _, cls_name = CASES[kind]
    folder = tiny_model_dir(tiny_kind)
    gen = load_generator(folder, None, height=size, width=size, device="cpu", num_steps=steps)
    assert gen.name == kind  # recognised from the folder's marks
    return gen, folder, cls_name, size


@pytest.mark.parametrize(
    "kind,steps", [(k, s) for k, case in CASES.items() for s in case[2]], ids=str
)
def test_generator_matches_its_pipeline_and_is_differentiable(tiny_model_dir, kind, steps):
    gen, folder, cls_name, size = _case(kind, steps, tiny_model_dir)
    prompts = ["a cat", "a red dog"]
    z = gen.sample_noise(2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    latents = gen.denoise(z, gen.encode_prompts(prompts))
    images = gen.decode(latents)
    assert images.shape == (2, 3, size, size)
    pipe = _pipeline(folder, cls_name)  # independent of the generator's own pipeline object
    with torch.no_grad():  # fresh kwargs per call: SANA's 2-step re-noising seed
        out = pipe(
            prompt=prompts,
            latents=_packed(pipe, z),
            output_type="latent",
            **pipeline_kwargs(gen, steps),
        )
        ref_lat = _unpacked(pipe, out.images, size)
        ref = pipe(
            prompt=prompts,
            latents=_packed(pipe, z),
            output_type="pt",
            **pipeline_kwargs(gen, steps),
        ).images
    # the sampled latents: the same kernels, equal to float rounding of the scheduler maths
    diff = float((latents.detach() - ref_lat).abs().max())
    assert diff <= 1e-6, diff
    # images: the frozen VAE (requires_grad off) takes other conv kernels than the plain
    # pipeline's, which moves the pixels by float rounding (~1e-5)
    diff = float((images.detach() - ref).abs().max())
    assert diff <= 1e-4, diff
    (images * torch.linspace(0, 1, images.numel()).view_as(images)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and float(z.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind", list(CASES))
def test_tiny_folders_carry_their_release_marks(tiny_model_dir, kind):
    """make-tiny writes the release's model card: the folder is recognised as that release."""
    from diffalign.engine.releases import identify_release, pipeline_class_of
    from diffalign.noise.recipes import GENERATORS, generator_recipe

    folder = tiny_model_dir(CASES[kind][0])
    release, mark = identify_release(folder)
    assert release.hub_id == GENERATORS[kind].release and "model card" in mark
    assert pipeline_class_of(folder) == CASES[kind][3]
    assert generator_recipe(folder).spec.name == kind


def test_flux_schnell_is_renos_one_step_call(tiny_model_dir):
    """Against ReNO's `RewardFluxPipeline.apply` settings written out here, not taken from the
    generator (`pipeline_kwargs`): guidance 0, T5 length 256, 1 step (4 for the re-render). The
    pipeline draws the same seeded noise itself, unpacked `[B, 16, h, w]`, and packs it its own
    way; and the one step by hand: `x0 = z - v(z, t = 1)`, unpacked, `x0 / 0.3611 + 0.1159` into
    the VAE, `x / 2 + 0.5` clamped."""
    from diffusers import FluxPipeline

    size, seed, prompts = 32, 3, ["a cat", "a red dog"]
    folder = tiny_model_dir("flux-schnell")
    gen = load_generator(folder, None, height=size, width=size, device="cpu")
    assert gen.num_steps == 1 and gen.latent_shape() == (16, size // 8, size // 8)
    noise = gen.sample_noise(2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        embeds = gen.encode_prompts(prompts)
        ours, ours4 = gen.generate(noise, embeds), gen.render(noise, embeds, 4)
    pipe = FluxPipeline.from_pretrained(folder)
    reno = dict(height=size, width=size, guidance_scale=0.0, max_sequence_length=256)
    with torch.no_grad():
        ref, ref4 = (
            pipe(
                prompt=prompts,
                num_inference_steps=n,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
                **reno,
            ).images
            for n in (1, 4)
        )
    assert float((ours - ref).abs().max()) <= 1e-4
    assert float((ours4 - ref4).abs().max()) <= 1e-4
    assert float((ours4 - ours).abs().max()) > 1e-3  # the re-render is another image

    b, c, h, w = noise.shape
    vae = pipe.vae.config
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)  # FLUX.1's VAE
    with torch.no_grad():
        pe, pooled, txt_ids = pipe.encode_prompt(prompts, None, max_sequence_length=256)
        z = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        z = z.reshape(b, (h // 2) * (w // 2), c * 4)  # token (i, j) = channels x (dy, dx)
        i, j = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(i), i, j], -1).reshape(-1, 3).float()
        v = pipe.transformer(
            hidden_states=z,
            timestep=torch.ones(b),  # sigma 1: t = 1000, passed as t / 1000
            guidance=None,
            pooled_projections=pooled,
            encoder_hidden_states=pe,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        x0 = (z - v).reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        x0 = x0.reshape(b, c, h, w)
        hand = pipe.vae.decode(x0 / 0.3611 + 0.1159, return_dict=False)[0]
        hand = (hand / 2 + 0.5).clamp(0, 1)
    assert float((ours - hand).abs().max()) <= 1e-4


@pytest.mark.parametrize(
    "kind,steps,schedules",  # schedules: 2 where the key holds the image size (the shift)
    [
        ("flux-schnell", 4, 2),
        ("sd3.5-large-turbo", 2, 2),
        ("sana-sprint", 2, 1),
        ("pixart-dmd", 1, 1),
    ],
    ids=str,
)
def test_schedule_is_set_once_per_size_with_the_same_result(tiny_model_dir, kind, steps, schedules):
    """`set_timesteps` (a host-to-device copy, a host sync) runs once per device, step count and
    image size, not at every call (every optimisation step); the latents are bit-identical to
    setting the schedule afresh at every call (`onestep.cached_schedule`)."""
    import diffalign.noise.flow_generators as flow_mod

    gen = _case(kind, steps, tiny_model_dir)[0]
    embeds = gen.encode_prompts(["a cat"])
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(4))
    z_big = torch.randn(1, z.shape[1], z.shape[2] * 2, z.shape[3] * 2)
    sched_cls = type(gen.scheduler)
    calls = []
    real = sched_cls.set_timesteps

    @functools.wraps(real)  # retrieve_timesteps inspects the signature
    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(sched_cls, "set_timesteps", counted)
        fast = [gen.denoise(z, embeds) for _ in range(3)]
        big = gen.denoise(z_big, embeds)  # another size: its own (shifted) schedule
        again = gen.denoise(z, embeds)
        assert len(calls) == schedules
        mp.setattr(
            flow_mod, "cached_schedule", lambda owner, sched, key, set_schedule: set_schedule()
        )
        slow = gen.denoise(z, embeds)
        slow_big = gen.denoise(z_big, embeds)
    for f in [*fast, again]:
        assert torch.equal(f, slow)
    assert torch.equal(big, slow_big)
