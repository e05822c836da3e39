"""`--model x.safetensors` (spec E) across the commands: which config a single file loads
with, the families whose pipelines diffusers cannot load from one file as a whole, and the
one-line refusals where it cannot be told what the file is."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.cli import main
from diffalign.engine import loading
from diffalign.engine.errors import DiffalignError
from diffalign.engine.loading import load_pipeline
from single_file_helpers import write_ldm_unet_file


def _transformer_file(folder: str, path) -> dict:
    """A file holding a pipeline's transformer weights under diffusers' own names (the layout
    diffusers' Qwen-Image single-file loader reads, and one it passes through for FLUX.1)."""
    sd = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    save_file(sd, str(path))
    return sd


def _same_weights(module, sd: dict) -> bool:
    got = module.state_dict()
    return got.keys() == sd.keys() and all(torch.equal(sd[k], got[k]) for k in sd)


def _one_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty project `models/` folder (the loader's preset folders), Hub offline."""
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def test_qwen_image_single_file_loads_its_transformer(tiny_model_dir, tmp_path):
    """QwenImagePipeline has no `from_single_file`: the transformer loads through its model
    class, the rest (its own VAE class, not AutoencoderKL) from the config folder."""
    from diffalign.textstream.families import load_text_to_image

    folder = tiny_model_dir("qwen-image")
    path = tmp_path / "qwen_image.safetensors"
    sd = _transformer_file(folder, path)
    pipe = load_text_to_image(str(path), "qwen-image", single_file_config=folder)
    assert type(pipe).__name__ == "QwenImagePipeline" and _same_weights(pipe.transformer, sd)
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage"


def test_flux_single_file_runs_as_flux(tiny_model_dir, tmp_path, capsys):
    """The family of a single file comes from its --single-file-config (it was SD3 whatever
    the file held: an internal error inside diffusers); without a config that tells, one line
    that names the option, not "not found"."""
    folder = tmp_path / "config"
    shutil.copytree(tiny_model_dir("flux-schnell"), folder)
    path = tmp_path / "tuned.safetensors"
    _transformer_file(str(folder), path)
    out = tmp_path / "out"
    argv = ["textstream", "sample", "--prompt", "a cat", "--model", str(path), "--steps", "1"]
    argv += ["--height", "32", "--width", "32", "--max-sequence-length", "16"]
    argv += ["--single-file-config", str(folder)]
    assert main([*argv, "--output-dir", str(out)]) == 0
    (settings,) = out.glob("*/settings.json")
    assert "flux" in json.dumps(json.loads(settings.read_text())).lower()
    capsys.readouterr()
    # the images' text encoders came from the config: another one there is another run (a
    # folder of its own, not "already done")
    encoder = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(str(encoder))
    save_file({k: v + 1 for k, v in tensors.items()}, str(encoder))
    assert main([*argv, "--output-dir", str(out)]) == 0
    assert len(list(out.glob("*/settings.json"))) == 2
    argv = argv[:-2]

    assert main([*argv, "--output-dir", str(tmp_path / "none")]) == 2
    line = _one_line(capsys)
    assert "cannot tell which" in line and "--single-file-config" in line, line
    assert "not found" not in line and not (tmp_path / "none").exists()


def test_config_of_another_pipeline_is_one_line(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    path = tmp_path / "sd3.safetensors"
    _transformer_file(tiny_model_dir("sd3"), path)
    with pytest.raises(DiffalignError, match="holds FluxPipeline, not a sd3 model"):
        load_pipeline(
            str(path),
            StableDiffusion3Pipeline,
            "sd3",
            single_file_config=tiny_model_dir("flux-schnell"),
        )


def test_cache_records_the_config_train_weights_uses_it(tiny_model_dir, tmp_path, capsys):
    """`textstream cache` of a single file records its config (the text encoders came from
    it): `train-weights` loads the file with it; a re-run with another config is refused."""
    from noise_data_helpers import write_pairs

    folder = tiny_model_dir("flux-schnell")
    path = tmp_path / "tuned.safetensors"
    _transformer_file(folder, path)
    data = write_pairs(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    argv = ["textstream", "cache", "--model", str(path), "--dataset", str(data / "pairs.jsonl")]
    argv += ["--resolution", "32", "--max-sequence-length", "16", "--output-dir", str(cache)]
    assert main([*argv, "--single-file-config", folder]) == 0
    assert main([*argv, "--single-file-config", folder]) == 0  # the same: resumed
    capsys.readouterr()
    other = tmp_path / "other"
    other.symlink_to(tiny_model_dir("flux-dev"), target_is_directory=True)
    assert main([*argv, "--single-file-config", str(other)]) == 2
    assert "single_file_config" in _one_line(capsys)
    # a cache of an older diffalign, which recorded no config: said so, not "other settings"
    record = cache / "job.json"
    kept = record.read_bytes()
    job = json.loads(kept)
    del job["single_file_config"]
    record.write_text(json.dumps(job))
    assert main([*argv, "--single-file-config", folder]) == 2
    line = _one_line(capsys)
    assert "single_file_config: not recorded (made by an older diffalign)" in line, line
    # ... beside a real change: the change is named
    assert main([*argv[:-6], "--resolution", "16", *argv[-4:], "--single-file-config", folder]) == 2
    line = _one_line(capsys)
    assert "resolution" in line and "not recorded" not in line, line
    record.write_bytes(kept)

    run = tmp_path / "run"
    argv = ["textstream", "train-weights", "--cache", str(cache), "--output-dir", str(run)]
    argv += ["--residual-target-layers", "1,2", "--max-steps", "1", "--batch-size", "2"]
    argv += ["--eval-samples", "1", "--eval-steps", "1", "--tracker", "none"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (run / "residual_weights.safetensors").is_file()


def test_unknown_layout_is_not_taken_for_sd15(tiny_model_dir, tmp_path, models_dir):
    """diffusers calls any layout it does not know "v1": only an original-layout U-Net is
    taken for SD 1.x (and then loads with the `models/sd15` config, weights unchanged)."""
    from diffusers import StableDiffusionPipeline

    from diffalign.repa.model import load_sd15_unet

    (models_dir / "sd15").symlink_to(tiny_model_dir("sd15"), target_is_directory=True)
    ldm = tmp_path / "sd15_ldm.safetensors"
    sd = write_ldm_unet_file(tiny_model_dir("sd15"), ldm)
    assert loading.single_file_preset(str(ldm)).name == "sd15"
    unet, _, _ = load_sd15_unet(str(ldm))
    assert _same_weights(unet, sd)

    flux = tmp_path / "flux.safetensors"  # transformer weights: no release diffusers knows
    _transformer_file(tiny_model_dir("flux-schnell"), flux)
    assert loading.single_file_preset(str(flux)) is None
    with pytest.raises(DiffalignError, match="cannot tell which sd15 model"):
        load_pipeline(str(flux), StableDiffusionPipeline, "sd15")


def test_repa_vae_step_refuses_a_unet_file_and_keeps_the_store(
    tiny_model_dir, tmp_path, models_dir, capsys
):
    """`repa preprocess vae --model unet_only.safetensors --overwrite`: one line (the file holds
    no VAE), and the store it would rebuild is still there (it was emptied before the VAE
    loaded)."""
    from test_repa_train import build_data_dir

    (models_dir / "sd15").symlink_to(tiny_model_dir("sd15"), target_is_directory=True)
    ldm = tmp_path / "sd15_unet.safetensors"
    write_ldm_unet_file(tiny_model_dir("sd15"), ldm)
    data = build_data_dir(tmp_path / "data")
    before = (data / "vae_latents.lmdb" / "data.mdb").read_bytes()
    argv = ["repa", "preprocess", "vae", "--data-dir", str(data), "--model", str(ldm)]
    assert main([*argv, "--overwrite", "--num-workers", "1"]) == 2
    line = _one_line(capsys)
    assert "holds no VAE weights" in line and "not found" not in line, line
    assert (data / "vae_latents.lmdb" / "data.mdb").read_bytes() == before


def test_pixart_single_file_is_one_line(tiny_model_dir, tmp_path):
    """Neither PixArtAlphaPipeline nor its transformer class has `from_single_file` in
    diffusers: one line naming what to pass (was an AttributeError)."""
    from diffusers import PixArtAlphaPipeline

    folder = tiny_model_dir("pixart-dmd")
    path = tmp_path / "pixart.safetensors"
    _transformer_file(folder, path)
    with pytest.raises(DiffalignError, match="cannot load PixArtAlphaPipeline .* single file"):
        load_pipeline(str(path), PixArtAlphaPipeline, "pixart-dmd", single_file_config=folder)


def test_config_read_once_and_a_vae_entry_naming_no_class(tiny_model_dir, tmp_path, monkeypatch):
    """The single file's config is read once per load (a Hub request each online); a config
    whose model_index.json "vae" is [null, null] or an unknown class is one line (was a
    TypeError / AttributeError traceback)."""
    from diffusers import FluxPipeline

    folder = tmp_path / "config"
    shutil.copytree(tiny_model_dir("flux-schnell"), folder)
    path = tmp_path / "tuned.safetensors"
    _transformer_file(str(folder), path)  # no VAE weights: the VAE comes from the config
    index = json.loads((folder / "model_index.json").read_text())
    reads = []
    read = FluxPipeline.load_config
    monkeypatch.setattr(
        FluxPipeline, "load_config", lambda *a, **k: reads.append(a) or read(*a, **k)
    )
    for vae in ([None, None], ["diffusers", "NoSuchAutoencoder"]):
        (folder / "model_index.json").write_text(json.dumps({**index, "vae": vae}))
        reads.clear()
        with pytest.raises(DiffalignError, match=r"its vae entry .* names no diffusers class"):
            load_pipeline(str(path), FluxPipeline, "flux", single_file_config=str(folder))
        assert len(reads) == 1
