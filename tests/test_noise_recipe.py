"""Which recipe a `--model` runs as (issue 13 items 6-7): exports record their recipe and load
as it (the Hyper-SD weights applied once), folders are recognised by the release's own marks
(model card, Hub id, download record), anything else needs `--generator`; references are plain
diffusers pipelines built here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.noise.generators import load_generator
from diffalign.noise.sft import sft
from noise_data_helpers import SIZE, model_args, write_pairs

KW = dict(height=SIZE, width=SIZE, device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A 2-item manifest for direct SFT (targets and prompts; direct SFT draws its noises)."""
    root = write_pairs(tmp_path_factory.mktemp("recipe-data"), n=2)
    lines = [
        {"id": str(i), "prompt": f"a photo number {i}", "target_image": f"images/{i:04d}.png"}
        | {"noise_file": f"noise/{i}.safetensors"}
        for i in range(2)
    ]
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "manifest.jsonl"


def _hyper(tiny, name: str) -> str:
    return f"{tiny('hyper-sd')}/{name}"


def _export(gen, manifest, out, lr: float = 1e-12, **kw) -> str:
    """A `noise sft` checkpoint-final: 1 direct step (at the default lr the weights stay put)."""
    r = sft(
        gen, manifest, out, direct=True, max_steps=1, lr=lr, tracker="none", progress=False,
        preserve_latent_weight=0.0, preserve_pixel_weight=0.0, **kw,
    )  # fmt: skip
    return r["model"]


def _abs(path) -> str:
    return str(Path(path).absolute())


def _images(gen, seed: int = 0):
    z = gen.sample_noise(1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return z, gen.generate(z, gen.encode_prompts(["a cat"]))


def _reference(pipe, scheduler, z, **call):
    """The plain diffusers pipeline's one step (the release card's settings)."""
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            prompt=["a cat"], latents=z.clone(), height=SIZE, width=SIZE, output_type="pt",
            guidance_scale=0.0, **call,
        ).images  # fmt: skip


# ------------------------------------------------------------------ item 6: exports


def test_hyper_sdxl_export_runs_lcm_at_800(tiny, manifest, tmp_path):
    """A hyper-sdxl `noise sft` export runs as hyper-sdxl (LCM, t = 800), as diffusers' own
    SDXL pipeline with the Hyper-SDXL card's scheduler runs those weights; not as sdxl-turbo
    (EulerAncestral at t = 999, the old guess)."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        LCMScheduler,
        StableDiffusionXLPipeline,
    )

    gen = load_generator(
        tiny("sdxl"), "hyper-sdxl", weights=_hyper(tiny, "Hyper-SDXL-1step-Unet.safetensors"), **KW
    )
    export = _export(gen, manifest, tmp_path / "sft")
    loaded = load_generator(export, **KW)  # no --generator: the recorded recipe
    assert loaded.name == "hyper-sdxl"
    z, img = _images(loaded)
    assert loaded.scheduler.timesteps.tolist() == [800]
    pipe = StableDiffusionXLPipeline.from_pretrained(export)
    ref = _reference(pipe, LCMScheduler, z, num_inference_steps=1, timesteps=[800])
    assert torch.allclose(img, ref, atol=1e-5), float((img - ref).abs().max())
    turbo = _reference(pipe, EulerAncestralDiscreteScheduler, z, num_inference_steps=1)
    assert float((img - turbo).abs().max()) > 1e-3  # the recipes differ on these weights
    # the same recipe through the CLI's optimise verb (the symptom)
    out = tmp_path / "opt"
    argv = ["noise", "optimize", "--prompt", "a cat", "--reward", "clip", "--clip-model"]
    argv += [tiny("clip"), "--steps", "1", "--output-dir", str(out), *model_args(export)]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["generator"] == "hyper-sdxl"


def test_hyper_sd15_export_is_not_fused_twice(tiny, manifest, tmp_path, monkeypatch, capsys):
    """`--generator hyper-sd15` on a hyper-sd15 export (the Hyper LoRA at its default place)
    gives the once-fused generator: diffusers' SD pipeline + the LoRA fused once + TCD."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    lora = _hyper(tiny, "Hyper-SD15-1step-lora.safetensors")
    models = tmp_path / "models"
    (models / "hyper-sd").mkdir(parents=True)
    shutil.copy(lora, models / "hyper-sd")
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(models))
    gen = load_generator(tiny("sd15"), "hyper-sd15", **KW)  # the default weights file
    export = _export(gen, manifest, tmp_path / "sft")
    loaded = load_generator(export, "hyper-sd15", **KW)  # same recipe: accepted
    z, img = _images(loaded)
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny("sd15"), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(lora)  # active once, unfused
    ref = _reference(pipe, TCDScheduler, z, num_inference_steps=1, eta=1.0)
    assert torch.allclose(img, ref, atol=1e-4), float((img - ref).abs().max())
    # the weights are in the export: --weights again, or another recipe, is one line, exit 2
    base = ["noise", "optimize", "--prompt", "a cat", "--output-dir", str(tmp_path / "o")]
    base += [*model_args(export), "--reward", "clip", "--clip-model", tiny("clip")]
    for extra, needle in (
        (["--generator", "hyper-sd15", "--weights", lora], "already holds the hyper-sd15"),
        (["--generator", "sd-turbo"], "is a hyper-sd15 fine-tune"),
    ):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_lora_export_records_its_recipe_and_loads_as_model(tiny, manifest, tmp_path, capsys):
    """A LoRA export (hyper-sd15 + a fine-tuned LoRA) records kind, scheduler, base model and
    Hyper file; as `--model` it is the base + the Hyper LoRA + its LoRA, each fused once."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    from diffalign.noise.recipes import RECIPE_FILE, generator_recipe

    lora = _hyper(tiny, "Hyper-SD15-1step-lora.safetensors")
    gen = load_generator(tiny("sd15"), "hyper-sd15", weights=lora, **KW)
    _, once = _images(gen)
    export = _export(gen, manifest, tmp_path / "sft", lr=1e-2, lora_rank=2)
    record = json.loads((tmp_path / "sft" / "checkpoint-final" / RECIPE_FILE).read_text())
    assert record["generator"] == "hyper-sd15" and record["export"] == "lora"
    assert record["scheduler"] == "tcd" and record["eta"] == 1.0 and record["size"] == 512
    assert record["weights_in_export"] is False
    assert record["base_model"] == _abs(tiny("sd15"))
    assert record["weights_file"] == _abs(lora)
    recipe = generator_recipe(export)
    assert (recipe.spec.name, recipe.model, recipe.weights) == (
        "hyper-sd15",
        record["base_model"],
        record["weights_file"],
    )
    assert recipe.loras == (_abs(export),) and not recipe.weights_in_model
    loaded = load_generator(export, **KW)
    z, img = _images(loaded)
    assert float((img - once).abs().max()) > 1e-3  # the fine-tuned LoRA is in it
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny("sd15"), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(lora, adapter_name="hyper")  # both adapters active, unfused
    pipe.load_lora_weights(export, adapter_name="tuned")
    pipe.set_adapters(["hyper", "tuned"], [1.0, 1.0])
    ref = _reference(pipe, TCDScheduler, z, num_inference_steps=1, eta=1.0)
    assert torch.allclose(img, ref, atol=1e-4), float((img - ref).abs().max())
    # a pipeline export of it records that the Hyper weights are in it, and round-trips
    again = _export(loaded, manifest, tmp_path / "sft2")
    rec2 = json.loads((tmp_path / "sft2" / "checkpoint-final" / RECIPE_FILE).read_text())
    assert rec2["export"] == "pipeline" and rec2["weights_in_export"] is True
    r2 = generator_recipe(again, "hyper-sd15")
    assert r2.weights_in_model and r2.loras == () and r2.model == again
    # continuing the LoRA on a model of another recipe: one line
    argv = ["noise", "sft", "--manifest-path", str(manifest), "--output-dir", str(tmp_path / "x")]
    argv += ["--direct", "--init-lora", export, "--tracker", "none", *model_args(tiny("sd21"))]
    capsys.readouterr()
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "was trained on hyper-sd15" in err[0], err


def test_em_lora_e_step_keeps_the_hyper_lora(tiny, tmp_path, monkeypatch):
    """EM with a LoRA on hyper-sd15: cycle 1 assigns with base + Hyper LoRA + cycle 0's LoRA
    (loading cycle 0's LoRA beside the fused Hyper adapter used to unmerge and drop it)."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    from diffalign.noise import dataset as dataset_module
    from diffalign.noise.dataset import AssignSettings
    from diffalign.noise.em import em

    lora = _hyper(tiny, "Hyper-SD15-1step-lora.safetensors")
    seen = []
    real = dataset_module.build_dataset

    def spy(gen, *args, **kwargs):
        seen.append(gen)
        return real(gen, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "build_dataset", spy)
    s = em(
        tiny("sd15"),
        write_pairs(tmp_path / "data", n=2),
        tmp_path / "em",
        num_cycles=2,
        load=lambda m, first: load_generator(
            m, "hyper-sd15", weights=lora if first else None, **KW
        ),
        assign_kwargs={"settings": AssignSettings(steps=1), "batch_size": 2, "plots": False},
        sft_kwargs={"lora_rank": 2, "max_steps": 1, "lr": 1e-2, "batch_size": 2,
                    "tracker": "none"},
        lora=True,
        progress=False,
    )  # fmt: skip
    cycle0 = s["cycles"][0]["model"]
    z, img = _images(seen[1])
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny("sd15"), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(lora, adapter_name="hyper")
    pipe.load_lora_weights(cycle0, adapter_name="tuned")
    pipe.set_adapters(["hyper", "tuned"], [1.0, 1.0])
    ref = _reference(pipe, TCDScheduler, z, num_inference_steps=1, eta=1.0)
    assert torch.allclose(img, ref, atol=1e-4), float((img - ref).abs().max())


# ------------------------------------------------------------------ item 7: recognition


def test_tiny_kinds_are_recognised_by_their_release(tiny, tmp_path):
    """make-tiny writes the release's model card: sdxl = SDXL-Turbo, sd21 = SD-Turbo; the same
    folder without its card is no longer guessed from its pipeline type."""
    from diffalign.noise.recipes import generator_recipe

    r = generator_recipe(tiny("sdxl"))
    assert r.spec.name == "sdxl-turbo" and "model card" in r.found_by
    assert generator_recipe(tiny("sd21")).spec.name == "sd-turbo"
    bare = tmp_path / "bare-sdxl"
    shutil.copytree(tiny("sdxl"), bare)
    (bare / "README.md").unlink()
    with pytest.raises(DiffalignError, match=r"pass --generator sdxl-turbo\|hyper-sdxl"):
        generator_recipe(str(bare))
    # the other marks of a real release: a Hub cache path, our download record
    cache = tmp_path / "hub" / "models--stabilityai--sdxl-turbo" / "snapshots" / "0123abc"
    shutil.copytree(bare, cache)
    assert generator_recipe(str(cache)).spec.name == "sdxl-turbo"
    fetched = tmp_path / "models" / "my-turbo"
    shutil.copytree(bare, fetched)
    (fetched / ".diffalign-download.json").write_text(
        json.dumps({"asset": "sdxl-turbo", "repos": ["stabilityai/sdxl-turbo"]})
    )
    assert "download" in generator_recipe(str(fetched)).found_by


@pytest.mark.parametrize("verb", ["optimize", "assign"])
def test_sd15_base_needs_generator(tiny, tmp_path, capsys, verb):
    """SD 1.5 is not a one-step model: without --generator the noise verbs refuse it (the old
    guess ran it one-step as sd-turbo)."""
    out = tmp_path / "o"
    argv = ["noise", verb, "--prompt", "a cat", "--output-dir", str(out), "--steps", "1"]
    argv += model_args(tiny("sd15"))
    if verb == "optimize":
        argv += ["--reward", "clip", "--clip-model", tiny("clip")]
    else:
        target = write_pairs(tmp_path / "data", n=1) / "images" / "0000.png"
        argv += ["--target-image", str(target)]
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    assert "Stable Diffusion v1-5" in err[0] and "not a one-step model" in err[0], err
    assert "--generator" in err[0] and "hyper-sd15" in err[0], err
    assert not out.exists()


def test_pipeline_class_mismatch_is_one_line(tiny, tmp_path, capsys):
    """`--model <sdxl> --generator sd-turbo`: one line naming both pipeline classes (issue 13
    item 15; it was a TypeError)."""
    out = tmp_path / "o"
    argv = ["noise", "optimize", "--prompt", "a cat", "--generator", "sd-turbo"]
    argv += ["--output-dir", str(out), *model_args(tiny("sdxl"))]
    argv += ["--reward", "clip", "--clip-model", tiny("clip")]
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "StableDiffusionXLPipeline" in err[0], err
    assert "sd-turbo runs a StableDiffusionPipeline" in err[0], err
    assert not out.exists()


def test_model_card_title_skips_the_front_matter(tmp_path):
    """An early SDXL-Turbo card has YAML comments starting with '# ' in its front matter."""
    from diffalign.engine.releases import identify_release, model_card_title

    (tmp_path / "README.md").write_text(
        "---\n# For reference on model card metadata, see the spec\n{}\n---\n\n"
        "# SDXL-Turbo Model Card\n\n<!-- summary -->\n## Model Details\n"
    )
    assert model_card_title(tmp_path) == "SDXL-Turbo Model Card"
    assert identify_release(str(tmp_path))[0].hub_id == "stabilityai/sdxl-turbo"
    (tmp_path / "README.md").write_text("# My SDXL fine-tune\n\nbased on SDXL-Turbo Model Card\n")
    assert identify_release(str(tmp_path)) is None


def test_a_new_kind_registers_its_marks_in_one_place(tiny, tmp_path, monkeypatch):
    """A kind names its release (engine.releases: Hub ids, card title, pipeline class); folders
    and Hub ids of that release then run as the kind with no other change."""
    from dataclasses import replace

    from diffalign.engine import releases
    from diffalign.noise import recipes

    rel = releases.Release(
        "Tiny-Lightning", ("example/tiny-lightning",), "Tiny-Lightning", "StableDiffusionXLPipeline"
    )
    monkeypatch.setitem(releases.RELEASES, rel.hub_id, rel)
    spec = replace(recipes.GENERATORS["sdxl-turbo"], name="tiny-lightning", release=rel.hub_id)
    monkeypatch.setitem(recipes.GENERATORS, spec.name, spec)
    folder = tmp_path / "m"
    shutil.copytree(tiny("sdxl"), folder)
    releases.write_model_card(folder, rel, "a tiny stand-in")
    assert recipes.generator_recipe(str(folder)).spec.name == "tiny-lightning"
    assert recipes.generator_recipe("example/tiny-lightning").spec.name == "tiny-lightning"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not a valid recipe record"),
        ('{"generator": ["sdxl-turbo"], "export": "pipeline"}', "records generator"),
        ('{"generator": "sdxl-lightning", "export": "pipeline"}', "records generator"),
        ('{"generator": "sdxl-turbo", "export": "zip"}', "'export' must be"),
        ('{"generator": "hyper-sd15", "export": "lora", "base_model": 3}', "'base_model'"),
    ],
)
def test_a_broken_recipe_record_is_one_error(tmp_path, text, needle):
    from diffalign.noise.recipes import RECIPE_FILE, generator_recipe

    (tmp_path / RECIPE_FILE).write_text(text)
    with pytest.raises(DiffalignError, match=needle):
        generator_recipe(str(tmp_path))


def test_a_folder_named_like_a_kind_runs_its_own_recipe(tiny, tmp_path, monkeypatch):
    """`--model sdxl-turbo` with a folder `./sdxl-turbo` here: `load_pipeline` loads that folder
    (a local path comes first), so its recorded recipe must count, not the kind of that name
    (before: a hyper-sdxl export there ran as sdxl-turbo, EulerAncestral at t = 999)."""
    from diffalign.noise.recipes import RECIPE_FILE, generator_recipe

    folder = tmp_path / "sdxl-turbo"
    shutil.copytree(tiny("sdxl"), folder)  # an SDXL pipeline with the Hyper U-Net in it
    record = {"format": 1, "generator": "hyper-sdxl", "export": "pipeline"}
    (folder / RECIPE_FILE).write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    recipe = generator_recipe("sdxl-turbo")
    assert recipe.spec.name == "hyper-sdxl" and recipe.weights_in_model
    assert recipe.model == "sdxl-turbo" and RECIPE_FILE in recipe.found_by
    gen = load_generator("sdxl-turbo", **KW)
    assert gen.name == "hyper-sdxl" and gen.scheduler.__class__.__name__ == "LCMScheduler"
    with pytest.raises(DiffalignError, match="contradicts"):
        generator_recipe("sdxl-turbo", "sdxl-turbo")
    monkeypatch.chdir(tmp_path / "sdxl-turbo")  # no such folder here: the kind's name again
    assert generator_recipe("sdxl-turbo").found_by == "its name"
