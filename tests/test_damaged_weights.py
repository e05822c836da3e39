"""A damaged weights file in a local model folder (a safetensors file cut short) is said to be
damaged, naming the file, in one line (exit 2): it was reported as "model 'X' not found" with
advice to fetch it, which misled (the folder is there)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffalign.cli import main


def _one_line(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _cut_copy(model: str, dest: Path, weights: str, keep: int) -> Path:
    """`model` copied to `dest` with `weights` cut to its first `keep` bytes (keep < 0: all but
    the last -keep)."""
    shutil.copytree(model, dest)
    path = dest / weights
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    return dest


def test_safetensors_damage_agrees_with_safetensors(tmp_path):
    """Reference: the library itself. A whole file is fine; every cut the check calls damaged
    fails to load in safetensors (header, or a tensor's bytes)."""
    from safetensors.torch import load_file, save_file

    from diffalign.engine.loading import safetensors_damage

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(100.0), "b": torch.ones(3, 7)}, str(path))
    assert safetensors_damage(path) is None
    raw = path.read_bytes()
    for keep in (0, 5, 8, 40, len(raw) // 2, len(raw) - 1):
        cut = tmp_path / f"cut{keep}.safetensors"
        cut.write_bytes(raw[:keep])
        assert safetensors_damage(cut) is not None, keep
        with pytest.raises(Exception):  # noqa: B017 - whatever the library raises
            load_file(str(cut))


def test_fill_infer_with_a_cut_transformer_names_the_file(tmp_path, tiny_model_dir, capsys):
    """A diffusers pipeline folder (FluxFillPipeline) whose transformer weights are cut short."""
    from fill_helpers import write_image

    broken = _cut_copy(
        tiny_model_dir("flux-fill"),
        tmp_path / "broken",
        "transformer/diffusion_pytorch_model.safetensors",
        -100,
    )
    visible = write_image(tmp_path / "a_visible.png", (16, 16))
    argv = ["fill", "infer", "--model", str(broken), "--visible", str(visible)]
    argv += ["--prompt", "a cat", "--output", str(tmp_path / "out"), "--steps", "1"]
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "transformer/diffusion_pytorch_model.safetensors is damaged or incomplete" in line
    assert "cut short" in line and "replace the file" in line
    assert "not found" not in line


def test_dinov2_with_a_cut_weights_file_names_the_file(tmp_path, tiny_model_dir, capsys):
    """A transformers model folder (Dinov2Model, `repa preprocess dino`) whose weights file is
    cut inside its header; a missing model is still "not found"."""
    from test_repa_train import build_data_dir

    data = build_data_dir(tmp_path / "data")
    broken = _cut_copy(tiny_model_dir("dinov2"), tmp_path / "broken", "model.safetensors", 64)
    argv = ["repa", "preprocess", "dino", "--data-dir", str(data), "--num-workers", "1"]
    argv += ["--overwrite"]  # the data folder holds a store made by another model
    capsys.readouterr()
    assert main([*argv, "--dino-model", str(broken)]) == 2
    line = _one_line(capsys)
    assert f"{broken}: model.safetensors is damaged or incomplete (cut short: 64 bytes" in line
    assert "diffalign download --only" in line and "not found" not in line
    assert main([*argv, "--dino-model", "someorg/dinov2-not-cached"]) == 2
    assert "not found" in _one_line(capsys)


def test_clip_reward_with_a_cut_weights_file_names_the_file(tmp_path, tiny_model_dir):
    """A transformers CLIPModel folder (the CLIP reward's loader) whose weights lose their
    last bytes: its header reads, a tensor's bytes are missing."""
    from diffalign.engine.errors import DiffalignError, ModelNotFoundError
    from diffalign.engine.rewards.clip import load_clip_bundle

    broken = _cut_copy(tiny_model_dir("clip"), tmp_path / "broken", "model.safetensors", -10)
    with pytest.raises(DiffalignError) as e:
        load_clip_bundle(str(broken))
    assert not isinstance(e.value, ModelNotFoundError)
    line = str(e.value)
    assert "\n" not in line and "model.safetensors is damaged or incomplete (cut short:" in line
    assert "re-download it with `diffalign download --only CLIP-ViT-L-14`" in line


def test_cut_single_file_names_the_damage(tmp_path):
    """A single .safetensors file cut short, with no config: its damage is named (it was "cannot
    tell which sd3 model this single file is": an unreadable file has no layout to recognise),
    as --model and as a VAE file; a whole file of an unknown layout keeps that line."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    from diffalign.engine.errors import DiffalignError
    from diffalign.engine.loading import load_pipeline, load_vae

    whole = tmp_path / "whole.safetensors"
    save_file({"decoder.conv_in.weight": torch.ones(4, 4, 3, 3), "x": torch.ones(64)}, str(whole))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-10])
    with pytest.raises(DiffalignError, match=r"cut\.safetensors is damaged or incomplete \(cut"):
        load_pipeline(str(cut), StableDiffusion3Pipeline, "sd3")
    with pytest.raises(DiffalignError, match=r"cut\.safetensors is damaged or incomplete \(cut"):
        load_vae(str(cut))
    with pytest.raises(DiffalignError, match="cannot tell which sd3 model"):
        load_pipeline(str(whole), StableDiffusion3Pipeline, "sd3")
    with pytest.raises(DiffalignError, match="cannot tell which model's VAE config"):
        load_vae(str(whole))


def test_vae_of_a_pipeline_folder_names_only_its_vae(tmp_path, tiny_model_dir):
    """A pipeline folder as the VAE: a damaged file elsewhere in it (transformer/) is not named
    when the VAE failed otherwise (weights not of its config); a damaged vae/ file is."""
    from diffalign.engine.errors import ModelNotFoundError
    from diffalign.engine.loading import load_vae

    folder = _cut_copy(
        tiny_model_dir("sd3"),
        tmp_path / "broken",
        "transformer/diffusion_pytorch_model.safetensors",
        -100,
    )
    config = folder / "vae" / "config.json"
    text = config.read_text()
    config.write_text(json.dumps({**json.loads(text), "latent_channels": 5}))  # weights don't fit
    with pytest.raises(ModelNotFoundError) as info:
        load_vae(str(folder))
    assert "transformer" not in str(info.value) and "damaged" not in str(info.value)
    config.write_text(text)
    vae_weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae_weights.write_bytes(vae_weights.read_bytes()[:-100])
    with pytest.raises(Exception, match=r"vae/diffusion_pytorch_model\.safetensors is damaged"):
        load_vae(str(folder))
