"""One-step generators: each equals its own diffusers pipeline for the same noise (tiny models)."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.noise.generators import GENERATORS, generator_recipe, load_generator

SIZE = 32  # pixels; the tiny VAEs downsample 8x -> a 4x4 latent

CASES = {
    "sdxl-turbo": ("sdxl", None, [999]),
    "sd-turbo": ("sd21", None, [999]),
    "hyper-sd15": ("sd15", "Hyper-SD15-1step-lora.safetensors", [999]),
    "hyper-sdxl": ("sdxl", "Hyper-SDXL-1step-Unet.safetensors", [800]),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir


def _load(tiny, kind, **kw):
    base, weights, _ = CASES[kind]
    w = None if weights is None else f"{tiny('hyper-sd')}/{weights}"
    return load_generator(tiny(base), kind, weights=w, height=SIZE, width=SIZE, device="cpu", **kw)


@pytest.mark.parametrize("kind", list(CASES))
def test_generator_matches_its_pipeline_and_is_differentiable(tiny, kind):
    gen = _load(tiny, kind)
    prompts = ["a cat", "a red dog"]
    z = gen.sample_noise(2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    images = gen.generate(z, gen.encode_prompts(prompts))
    assert images.shape == (2, 3, SIZE, SIZE)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    with torch.no_grad():
        ref = gen.pipe(
            prompt=prompts,
            latents=z.detach().clone(),
            height=SIZE,
            width=SIZE,
            output_type="pt",
            **gen.pipeline_kwargs(),
        ).images
    assert torch.allclose(images.detach(), ref, atol=1e-5), float((images - ref).abs().max())
    assert gen.scheduler.timesteps.tolist() == CASES[kind][2]
    (images * torch.linspace(0, 1, images.numel()).view_as(images)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and float(z.grad.abs().sum()) > 0


def test_sdxl_turbo_step_is_the_documented_one(tiny):
    """DIFFUSERS-FACTS: one trailing EulerAncestral step: t = 999, sigmas [14.6146, 0],
    latents = z * 14.6146 (SDXL's scaled-linear betas, which the tiny model keeps)."""
    gen = _load(tiny, "sdxl-turbo")
    gen._timestep()
    assert gen.scheduler.sigmas.tolist() == pytest.approx([14.6146, 0.0], abs=1e-3)
    assert float(gen.scheduler.init_noise_sigma) == pytest.approx(14.6146, abs=1e-3)


def test_batched_prompts_equal_one_at_a_time(tiny):
    gen = _load(tiny, "sdxl-turbo")
    z = gen.sample_noise(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = gen.generate(z, gen.encode_prompts(["a cat", "a dog"]))
        one = gen.generate(z[1:], gen.encode_prompts(["a dog"]))
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_hyper_lora_is_applied_in_kohya_layout(tiny):
    from diffalign.engine.io import load_tensors

    tensors, _ = load_tensors(f"{tiny('hyper-sd')}/Hyper-SD15-1step-lora.safetensors")
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith(".alpha") for k in tensors)
    hyper = _load(tiny, "hyper-sd15")
    # the same base model and TCD step without the LoRA gives another image
    from diffusers import StableDiffusionPipeline

    from diffalign.noise.generators import DiffusionOneStepGenerator

    pipe = StableDiffusionPipeline.from_pretrained(tiny("sd15"))
    bare = DiffusionOneStepGenerator(pipe, GENERATORS["hyper-sd15"], height=SIZE, width=SIZE)
    z = hyper.sample_noise(1, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = hyper.generate(z, hyper.encode_prompts(["x"]))
        b = bare.generate(z, bare.encode_prompts(["x"]))
    assert float((a - b).abs().max()) > 1e-4


def test_hyper_lora_in_diffusers_layout_loads_the_same(tiny, tmp_path):
    """Whichever LoRA layout a release file uses (kohya or diffusers/peft), it loads the same."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    from diffalign.engine.io import load_tensors, save_tensors

    kohya, _ = load_tensors(f"{tiny('hyper-sd')}/Hyper-SD15-1step-lora.safetensors")
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    assert all(k.startswith("unet.") for k in converted)
    # alpha == rank in the tiny file, so the layout without alphas has the same scale (1)
    assert {float(v) for v in alphas.values()} == {4.0}
    path = tmp_path / "diffusers-layout.safetensors"
    save_tensors(path, converted)
    a_gen = _load(tiny, "hyper-sd15")
    b_gen = load_generator(
        tiny("sd15"), "hyper-sd15", weights=str(path), height=SIZE, width=SIZE, device="cpu"
    )
    z = a_gen.sample_noise(1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = a_gen.generate(z, a_gen.encode_prompts(["x"]))
        b = b_gen.generate(z, b_gen.encode_prompts(["x"]))
    assert torch.allclose(a, b, atol=1e-5)


def test_half_precision_upcasts_the_vae(tiny):
    gen = _load(tiny, "sdxl-turbo", dtype="bf16")
    assert gen.unet.dtype == torch.bfloat16 and gen.vae.dtype == torch.float32
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    img = gen.generate(z, gen.encode_prompts(["a cat"]))
    img.mean().backward()
    assert img.dtype == torch.float32 and torch.isfinite(z.grad).all()


def test_other_vae_runs_in_the_model_dtype(tiny):
    # --vae: e.g. the fp16-fix SDXL VAE; here the tiny model's own vae/ folder
    gen = _load(tiny, "sdxl-turbo", dtype="bf16", vae=f"{tiny('sdxl')}/vae")
    assert gen.vae.dtype == torch.bfloat16
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = gen.generate(z, gen.encode_prompts(["a cat"]))
    assert img.shape == (1, 3, SIZE, SIZE) and torch.isfinite(img).all()


def test_kind_inference_and_bad_inputs(tiny, tmp_path):
    # recognised by the release's model card make-tiny writes (tests/test_noise_recipe.py)
    assert generator_recipe(tiny("sdxl")).spec.name == "sdxl-turbo"
    assert generator_recipe(tiny("sd21")).spec.name == "sd-turbo"
    assert generator_recipe("hyper-sdxl").spec.name == "hyper-sdxl"
    with pytest.raises(DiffalignError, match="unknown generator"):
        load_generator(tiny("sdxl"), "sdxl-lightning")
    # a model folder without a component the generator needs
    broken = tmp_path / "broken"
    shutil.copytree(tiny("sdxl"), broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["text_encoder_2"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffalignError, match="text_encoder_2"):
        load_generator(str(broken), "sdxl-turbo")
    # Hyper-SD weights: missing file, wrong file for the kind
    with pytest.raises(DiffalignError, match="download --only hyper-sd"):
        load_generator(tiny("sd15"), "hyper-sd15", weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(DiffalignError, match="not a hyper-sdxl U-Net"):
        load_generator(
            tiny("sdxl"),
            "hyper-sdxl",
            weights=f"{tiny('hyper-sd')}/Hyper-SD15-1step-lora.safetensors",
        )
    with pytest.raises(DiffalignError, match="only for|for hyper-sd15"):
        load_generator(tiny("sdxl"), "sdxl-turbo", weights="x.safetensors")
    gen = _load(tiny, "sd-turbo")
    with pytest.raises(DiffalignError, match="multiples of 8"):
        gen.latent_shape(30, 32)
    with pytest.raises(DiffalignError, match="noises for"):
        gen.generate(torch.zeros(3, 4, 4, 4), gen.encode_prompts(["a", "b"]))


def _rerun_set_timesteps(gen):
    """The old per-call path: `set_timesteps` and the step-index search at every call."""
    if gen.spec.timesteps:
        gen.scheduler.set_timesteps(timesteps=list(gen.spec.timesteps), device=gen.device)
    else:
        gen.scheduler.set_timesteps(1, device=gen.device)
    return gen.scheduler.timesteps[0]


@pytest.mark.parametrize("kind", list(CASES))
def test_one_step_schedule_is_set_once_with_the_same_result(tiny, kind, monkeypatch):
    """`set_timesteps` (a host-to-device copy) and `index_for_timestep` (a `.item()`) are host
    syncs: the optimisation loop calls `generate` once per step, so they run once per
    generator, not per call, and the images are bit-identical to re-running them per call,
    also after the diffusers pipeline has used (and changed) the shared scheduler."""
    gen = _load(tiny, kind)
    embeds = gen.encode_prompts(["a cat"])
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(3))
    sched_cls = type(gen.scheduler)
    calls = {"set_timesteps": 0, "index_for_timestep": 0}
    for name in calls:
        orig = getattr(sched_cls, name)

        @functools.wraps(orig)  # the pipeline inspects set_timesteps' signature
        def counted(self, *a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(sched_cls, name, counted)
    with torch.no_grad():
        torch.manual_seed(0)  # EulerAncestral draws (zero-weighted) step noise from the global RNG
        fast = [gen.generate(z, embeds) for _ in range(4)]
        assert calls == {"set_timesteps": 1, "index_for_timestep": 0}, calls
        gen.pipe(
            prompt=["a cat"],
            latents=z.clone(),
            height=SIZE,
            width=SIZE,
            output_type="pt",
            **gen.pipeline_kwargs(),
        )
        after_pipe = gen.generate(z, embeds)
        monkeypatch.setattr(gen, "_timestep", lambda: _rerun_set_timesteps(gen))
        torch.manual_seed(0)
        slow = [gen.generate(z, embeds) for _ in range(4)]
    if gen.spec.pipeline == "sdxl":  # the size conditioning is built once, not copied per call
        seen = []
        hook = gen.unet.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"]), with_kwargs=True
        )
        with torch.no_grad():
            for _ in range(2):
                gen.denoise(z, embeds)
        hook.remove()
        assert seen[0] is seen[1]
    for f, s in zip(fast, slow):
        assert torch.equal(f, s)
    assert torch.equal(after_pipe, slow[0])
