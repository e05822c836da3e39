"""Issue 6 item 2 applied to the loaders that read ONE component with `from_pretrained` (U-REPA's
U-Net, CLIP tokenizer / text encoder and DINOv2 teacher, the engine's `load_vae`): a folder with
a missing vocabulary or only pickled weights is one `incomplete model folder` line naming the
component, never a placeholder tokenizer (every word an unknown id) or an unpickled `.bin`."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffalign.engine.errors import DiffalignError


def _pickle_weights(folder, name):
    """Replace `folder/name` (.safetensors) by the same tensors as a pickled .bin."""
    src = folder / name
    torch.save(load_file(str(src)), str(src.with_suffix(".bin")))
    src.unlink()


@pytest.fixture(scope="module")
def sd15_dir(tiny_model_dir):
    return tiny_model_dir("sd15")


def test_clip_step_refuses_a_tokenizer_without_vocabulary(sd15_dir, tmp_path):
    from diffalign.repa.preprocess import load_text_encoder

    model = tmp_path / "sd15"
    shutil.copytree(sd15_dir, model)
    for f in (model / "tokenizer").iterdir():
        if f.name not in ("tokenizer_config.json", "special_tokens_map.json"):
            f.unlink()
    with pytest.raises(DiffalignError, match=r"incomplete model folder .*'tokenizer'"):
        load_text_encoder(str(model), "cpu")


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_pickled_unet_or_vae_is_refused(sd15_dir, tmp_path, component):
    from diffalign.engine.loading import load_vae
    from diffalign.repa.model import load_sd15_unet

    model = tmp_path / "sd15"
    shutil.copytree(sd15_dir, model)
    _pickle_weights(model / component, "diffusion_pytorch_model.safetensors")
    load = load_sd15_unet if component == "unet" else load_vae
    with pytest.raises(DiffalignError, match=rf"'{component}' .*only pickled weights"):
        load(str(model))
    if component == "vae":  # the VAE's own folder too
        with pytest.raises(DiffalignError, match="only pickled weights"):
            load_vae(str(model / "vae"))


def test_pickled_dino_is_refused(tiny_model_dir, tmp_path):
    from diffalign.repa.teacher import load_dino

    model = tmp_path / "dino"
    shutil.copytree(tiny_model_dir("dinov2"), model)
    _pickle_weights(model, "model.safetensors")
    assert (model / "model.bin").is_file()
    (model / "model.bin").rename(model / "pytorch_model.bin")
    with pytest.raises(DiffalignError, match="incomplete model folder .*only pickled weights"):
        load_dino(str(model))


def test_complete_folders_still_load(sd15_dir, tiny_model_dir):
    from diffalign.engine.loading import load_vae
    from diffalign.repa.preprocess import load_text_encoder
    from diffalign.repa.teacher import load_dino

    tok, _ = load_text_encoder(sd15_dir, "cpu")
    assert 2 not in tok("a photo of a cat").input_ids[1:-1]  # real vocabulary, no unknown ids
    assert load_vae(sd15_dir) is not None
    assert load_dino(tiny_model_dir("dinov2")) is not None
