"""`diffalign noise ...` on the few-step transformer generators (issue 17): reward optimisation
on tiny FLUX.1-schnell with a tiny CLIP reward, the assign -> build-dataset -> sft (LoRA) -> em
chain, the LoRA in a plain FluxPipeline, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.io import load_tensors
from diffalign.noise.orthogonal import apply_patch_orthogonal, orthogonality_error
from noise_data_helpers import SIZE, model_args, write_pairs

TRAIN = ["--tracker", "none", "--batch-size", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def flux(tiny_model_dir):
    return tiny_model_dir("flux-schnell")


def test_optimize_on_flux_schnell_raises_the_reward_and_keeps_q_orthogonal(
    flux, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["noise", "optimize", "--prompt", "a red cube", "--clip-model", tiny_model_dir("clip")]
    argv += ["--output-dir", str(out), "--steps", "4", "--lr", "0.05", "--save-every", "0"]
    argv += ["--final-steps", "4", *model_args(flux)]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["generator"] == "flux-schnell" and s["num_steps"] == 1
    assert s["latent_shape"] == [16, SIZE // 8, SIZE // 8]  # unpacked: Q acts on [C, H/8, W/8]
    assert s["best_reward"] > s["init_reward"], (s["init_reward"], s["best_reward"])
    assert s["orthogonality_error_best"] < 1e-6
    noise, _ = load_tensors(out / "best_noise.safetensors")
    q, _ = load_tensors(out / "adapter_final.safetensors")
    assert orthogonality_error(q["q_best"]) < 1e-6
    assert q["q_best"].shape == (64, 64)  # D = 16 * 2^2: FLUX's own 2x2 packing group
    expected = apply_patch_orthogonal(noise["base_noise"], q["q_best"], 2)
    assert torch.equal(noise["noise"], expected)  # the saved noise is exactly Q z
    assert (out / "best.png").is_file() and (out / "best_4step.png").is_file()
    assert s["final_steps"] == 4 and isinstance(s["final_steps_reward"], float)


def test_assign_dataset_lora_sft_on_flux_schnell(flux, tmp_path, capsys):
    from diffusers import FluxPipeline

    data = write_pairs(tmp_path / "data", n=2)
    one = tmp_path / "assign"
    argv = ["noise", "assign", "--prompt", "a photo number 0", "--target-image"]
    argv += [str(data / "images" / "0000.png"), "--output-dir", str(one), "--steps", "2"]
    assert main(argv + model_args(flux)) == 0, capsys.readouterr().err
    assert json.loads((one / "summary.json").read_text())["generator"] == "flux-schnell"

    ds = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(ds)]
    argv += ["--steps", "2", "--no-plots", "--num-intermediates", "0"]
    assert main(argv + model_args(flux)) == 0, capsys.readouterr().err

    sft = tmp_path / "sft"
    argv = ["noise", "sft", "--manifest-path", str(ds), "--output-dir", str(sft)]
    argv += ["--max-steps", "2", "--lora-rank", "4", *TRAIN]
    assert main(argv + model_args(flux)) == 0, capsys.readouterr().err
    final = sft / "checkpoint-final"
    tensors, _ = load_tensors(final / "pytorch_lora_weights.safetensors")
    assert tensors and all(k.startswith("transformer.") and "lora" in k for k in tensors)

    # the export loads into a plain FluxPipeline and changes what it makes
    pipe = FluxPipeline.from_pretrained(flux)
    kw = {"prompt": "a cat", "height": SIZE, "width": SIZE, "num_inference_steps": 1}
    kw.update(guidance_scale=0.0, output_type="pt")
    before = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(final)
    after = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert float((after - before).abs().max()) > 0


def test_em_cycles_a_lora_on_flux_schnell(flux, tmp_path, capsys):
    data = write_pairs(tmp_path / "data", n=2)
    work = tmp_path / "em"
    argv = ["noise", "em", "--data-root", str(data), "--work-dir", str(work)]
    argv += ["--num-cycles", "2", "--assign-steps", "1", "--train-max-steps", "1"]
    argv += ["--train-batch-size", "2", "--tracker", "none", "--no-plots"]
    argv += ["--num-intermediates", "0", "--lora-rank", "2"]
    assert main(argv + model_args(flux)) == 0, capsys.readouterr().err
    s = json.loads((work / "summary.json").read_text())
    assert [c["cycle"] for c in s["cycles"]] == [0, 1] and s["lora"]
    assert (work / "cycle-001/sft/checkpoint-final/pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("sd35-turbo", ["--generator", "flux-schnell"], "runs a FluxPipeline"),
        ("sdxl", ["--generator", "pixart-dmd"], "runs a PixArtAlphaPipeline"),
        ("flux-dev", ["--generator", "flux-schnell"], "which generator flux-schnell does not run"),
        ("flux-schnell", ["--num-steps", "5"], "outside flux-schnell's range 1..4"),
        ("sana-sprint", ["--num-steps", "3"], "outside sana-sprint's range 1..2"),
        ("pixart-dmd", ["--num-steps", "2"], "exactly 1 step"),
        ("pixart-dmd", ["--final-steps", "4"], "no multi-step sampling"),
        ("sdxl", ["--final-steps", "4"], "no multi-step sampling"),
        ("flux-schnell", ["--patch-size", "3"], "patch"),
    ],
)
def test_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, kind, extra, message):
    argv = ["noise", "optimize", "--prompt", "a cat", "--output-dir", str(tmp_path / "o")]
    argv += ["--clip-model", tiny_model_dir("clip"), "--steps", "1", *extra]
    code = main(argv + model_args(tiny_model_dir(kind)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("diffalign: error:"), err
    assert message in err[0], err
    assert not (tmp_path / "o" / "summary.json").exists()


# kind -> (make-tiny kind, image size); pixart-dmd takes no LoRA (tested as bad input)
OTHERS = {
    "sd3.5-large-turbo": ("sd35-turbo", 32),
    "sana-sprint": ("sana-sprint", 64),
}


@pytest.mark.parametrize("kind", list(OTHERS))
def test_lora_sft_on_the_other_generators_loads_into_their_pipelines(
    tiny_model_dir, tmp_path, capsys, kind
):
    import diffusers

    from diffalign.noise.flow_generators import FEWSTEP_GENERATORS

    tiny, size = OTHERS[kind]
    model = tiny_model_dir(tiny)
    margs = ["--model", model, "--height", str(size), "--width", str(size), "--num-steps", "1"]
    data = write_pairs(tmp_path / "data", n=1, size=size)
    ds = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(ds)]
    argv += ["--steps", "1", "--no-plots", "--num-intermediates", "0", *margs]
    assert main(argv) == 0, capsys.readouterr().err
    sft = tmp_path / "sft"
    argv = ["noise", "sft", "--manifest-path", str(ds), "--output-dir", str(sft), "--lr", "1e-2"]
    argv += ["--max-steps", "1", "--lora-rank", "2", "--tracker", "none", *margs]
    assert main(argv) == 0, capsys.readouterr().err
    final = sft / "checkpoint-final"
    tensors, _ = load_tensors(final / "pytorch_lora_weights.safetensors")
    assert tensors and all("lora" in k for k in tensors)
    from diffalign.noise.generators import load_generator

    # the export records its recipe: it loads again as this kind (base + the LoRA fused)
    gen = load_generator(str(final), None, height=size, width=size, device="cpu")
    assert gen.name == kind and gen.recipe.loras == (str(final.absolute()),)
    assert gen.num_steps == 1  # as trained (--num-steps 1), not the kind's default
    pipe = getattr(diffusers, FEWSTEP_GENERATORS[kind].recipe.pipeline_class).from_pretrained(model)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(final)
    pipe.fuse_lora()
    after = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items()}
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k in after)


def test_full_transformer_sft_exports_a_pipeline_that_runs_again(tiny_model_dir, tmp_path, capsys):
    from diffalign.noise.generators import load_generator

    model = tiny_model_dir("pixart-dmd")
    data = write_pairs(tmp_path / "data", n=1)
    ds = tmp_path / "ds"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(ds)]
    assert main(argv + ["--steps", "1", "--no-plots", *model_args(model)]) == 0
    sft = tmp_path / "sft"
    argv = ["noise", "sft", "--manifest-path", str(ds), "--output-dir", str(sft)]
    argv += ["--max-steps", "1", "--tracker", "none", *model_args(model)]
    capsys.readouterr()
    assert main([*argv, "--lora-rank", "2"]) == 2  # PixArt-alpha has no diffusers LoRA loader
    assert "pixart-dmd takes no LoRA" in capsys.readouterr().err
    assert main(argv) == 0
    final = sft / "checkpoint-final"
    record = json.loads((final / "diffalign_generator.json").read_text())
    assert record["generator"] == "pixart-dmd" and record["export"] == "pipeline"
    gen = load_generator(str(final), None, height=SIZE, width=SIZE, device="cpu")
    assert gen.name == "pixart-dmd"  # recognised again without --generator
    with torch.no_grad():
        img = gen.generate(gen.sample_noise(1), gen.encode_prompts(["a cat"]))
    assert img.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    "title",
    ["Stable Diffusion 3.5 Large", "Stable Diffusion 3 Medium", "Stable Diffusion 3.5 Medium"],
)
def test_sd3_base_models_are_not_run_as_the_turbo(tiny_model_dir, tmp_path, capsys, title):
    """A 28-step SD3 / SD3.5 folder (told by its model card) is not run with the 4-step,
    guidance-free SD3.5-Large-Turbo recipe, as FLUX.1-dev is not run as FLUX.1-schnell."""
    import shutil

    folder = tmp_path / "sd3-base"
    shutil.copytree(tiny_model_dir("sd3"), folder)
    (folder / "README.md").write_text(f"---\nlicense: other\n---\n\n# {title}\n", encoding="utf-8")
    argv = ["noise", "optimize", "--prompt", "a cat", "--output-dir", str(tmp_path / "o")]
    argv += ["--clip-model", tiny_model_dir("clip"), "--steps", "1"]
    argv += ["--model", str(folder), "--generator", "sd3.5-large-turbo"]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"is {title}" in err[0] and "which generator sd3.5-large-turbo does not run" in err[0]
    assert not (tmp_path / "o").exists()
