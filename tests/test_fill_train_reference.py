"""`fill train`'s loss of one step against diffusers' FLUX training recipe, re-computed here from
the pipeline's own pieces (spec F: Train): `FluxFillPipeline._encode_vae_image`,
`prepare_mask_latents`, `encode_prompt`, `_pack_latents` / `_unpack_latents`,
`_prepare_latent_image_ids` and its default `guidance_scale`, with the noisy input, the
`timestep = sigma` argument and the `noise - x0` MSE written as in diffusers'
examples/dreambooth/train_dreambooth_lora_flux.py and examples/flux-control/
train_control_lora_flux.py (the condition concatenated after the noisy tokens as the Fill
pipeline's denoising loop does)."""

from __future__ import annotations

import inspect

import pytest
import torch

from fill_helpers import write_triptychs


@pytest.fixture(scope="module")
def task(tiny_model_dir, tmp_path_factory):
    from diffalign.fill.config import load_config
    from diffalign.fill.model import lora_parameters
    from diffalign.fill.train import FillTrainTask

    data = write_triptychs(tmp_path_factory.mktemp("trip"), n=2)
    cfg = load_config(
        overrides={
            "model": tiny_model_dir("flux-fill"),
            "data": str(data),
            "output_dir": str(tmp_path_factory.mktemp("out")),
            "panel": 16,
            "max_sequence_length": 8,
            "lora_rank": 4,
            "tracker": "none",
        }
    )
    torch.manual_seed(0)
    t = FillTrainTask(cfg, log=lambda *a: None)
    with torch.no_grad():  # a LoRA that changes the output (fresh LoRA has B = 0)
        for p in lora_parameters(t.transformer):
            p.normal_(0, 0.05)
    return t


def _reference_loss(pipe, batch, sigmas, noise, x0, guidance, seed):
    """The diffusers FLUX trainers' step for the Fill model, from the pipeline's own parts."""
    b = batch["visible"].shape[0]
    p = batch["visible"].shape[-1]
    h, w = p, 2 * p
    diptych = torch.cat([batch["visible"], batch["target"]], dim=-1)
    image = pipe.image_processor.preprocess(diptych, height=h, width=w).float()
    mask = torch.zeros(b, 1, h, w)
    mask[..., p:] = 1.0  # 1 = paint: the target panel
    mask = pipe.mask_processor.preprocess(mask, height=h, width=w)
    # encode_batch's VAE draws: the clean diptych, then the masked one
    g = torch.Generator().manual_seed(seed)
    model_input = pipe._encode_vae_image(image, generator=g)
    if x0 is not None:
        torch.testing.assert_close(x0, model_input, rtol=0, atol=0)
    c = model_input.shape[1]
    mask_latents, masked_latents = pipe.prepare_mask_latents(
        mask, image * (1 - mask), b, c, 1, h, w, torch.float32, "cpu", g
    )
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        batch["prompt"], prompt_2=None, device="cpu", max_sequence_length=8
    )
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * model_input + s * noise
    lh, lw = noisy.shape[2:]
    hidden = torch.cat(
        [pipe._pack_latents(noisy, b, c, lh, lw), masked_latents, mask_latents], dim=2
    )
    timesteps = sigmas * 1000  # the scheduler's timesteps; the trainers pass timesteps / 1000
    pred = pipe.transformer(
        hidden_states=hidden,
        timestep=timesteps / 1000,
        guidance=torch.tensor([guidance]).expand(b),
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=pipe._prepare_latent_image_ids(b, lh // 2, lw // 2, "cpu", torch.float32),
        return_dict=False,
    )[0]
    pred = pipe._unpack_latents(pred, h, w, pipe.vae_scale_factor)
    target = noise - model_input
    return torch.mean(((pred.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


def test_train_step_loss_equals_the_diffusers_flux_fill_recipe(task):
    from diffusers import FluxFillPipeline

    from diffalign.fill.data import collate_triptychs
    from diffalign.fill.encode import pack_latents, unpack_latents

    pipe = task.pipe
    batch = collate_triptychs([task.dataset[0], task.dataset[1]])
    enc = task.encode_batch(batch, torch.device("cpu"), torch.Generator().manual_seed(7))
    b, p = 2, batch["visible"].shape[-1]
    c, f = pipe.vae.config.latent_channels, pipe.vae_scale_factor
    noise = torch.randn(b, c, p // f, 2 * p // f, generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor([0.3, 0.8])
    pipeline_guidance = inspect.signature(FluxFillPipeline.__call__).parameters["guidance_scale"]
    x0 = unpack_latents(enc["x0"], p // f, 2 * p // f)

    with torch.no_grad():
        ours = task.loss(enc, pack_latents(noise), sigmas)
        want = _reference_loss(pipe, batch, sigmas, noise, x0, pipeline_guidance.default, 7)
        # the comparison can tell: another guidance value moves the loss
        other_g = _reference_loss(pipe, batch, sigmas, noise, None, 3.5, 7)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other_g, want, rtol=1e-4)


def _diffusers_sigmas(scheme, n, generator, **kw):
    """The sigmas diffusers' FLUX trainers draw: `u` -> scheduler index -> `sigmas[index]`
    (FLUX's scheduler config: dynamic shifting, so the training table is unshifted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    u = compute_density_for_timestep_sampling(scheme, n, generator=generator, **kw)
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    index = (sched.timesteps[None, :] == timesteps[:, None]).float().argmax(1)
    return sched.sigmas[index]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            ("logit-normal", {"logit_mean": 0.0}),
            ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}),
        ),
        (
            ("logit-normal", {"logit_mean": -0.7}),
            ("logit_normal", {"logit_mean": 0.7, "logit_std": 1.0}),
        ),
        (("mode", {"mode_scale": 1.29}), ("mode", {"mode_scale": 1.29})),
        (("uniform", {}), ("none", {})),
    ],
)
def test_timestep_distribution_equals_the_diffusers_trainers(ours, theirs):
    """Our `t` has the distribution of the trainers' sigma; `--logit-mean` is mirrored (help)."""
    from diffalign.fill.flow import sample_timesteps

    n = 20000
    t = sample_timesteps(ours[0], n, generator=torch.Generator().manual_seed(0), **ours[1])
    s = _diffusers_sigmas(theirs[0], n, torch.Generator().manual_seed(1), **theirs[1])
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    torch.testing.assert_close(torch.quantile(t, q), torch.quantile(s, q), rtol=0, atol=0.015)
    if ours[1].get("logit_mean"):  # the same mean on both sides would be mirrored: it differs
        same = _diffusers_sigmas(
            "logit_normal", n, torch.Generator().manual_seed(1), logit_mean=-0.7, logit_std=1.0
        )
        assert (torch.quantile(t, q) - torch.quantile(same, q)).abs().max() > 0.1
