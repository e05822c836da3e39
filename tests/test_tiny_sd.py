"""make-tiny sd15 / sd21 / sdxl: real pipeline folders that load and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign.engine.loading import load_pipeline

CASES = {
    "sd15": ("StableDiffusionPipeline", "PNDMScheduler", 0.18215),
    "sd21": ("StableDiffusionPipeline", "EulerDiscreteScheduler", 0.18215),
    "sdxl": ("StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler", 0.13025),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_tiny_unet_pipeline_loads_and_generates(tiny_model_dir, kind):
    import diffusers

    pipe_name, scheduler_name, scale = CASES[kind]
    folder = Path(tiny_model_dir(kind))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipe_name
    assert index["scheduler"] == ["diffusers", scheduler_name]
    family = "sdxl" if kind == "sdxl" else "sd15"
    pipe = load_pipeline(str(folder), getattr(diffusers, pipe_name), family)
    assert pipe.vae.config.scaling_factor == pytest.approx(scale)
    assert pipe.vae_scale_factor == 8  # the real 8x VAE downsampling
    assert pipe.unet.mid_block is not None
    out = pipe(
        "a red cube",
        num_inference_steps=1,
        guidance_scale=0.0,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_tiny_set_override_changes_size(tmp_path):
    from diffalign.cli import main

    out = tmp_path / "sd15"
    assert (
        main(["make-tiny", "sd15", "--out", str(out), "--set", "block_out_channels=8,16,16"]) == 0
    )
    cfg = json.loads((out / "unet" / "config.json").read_text())
    assert cfg["block_out_channels"] == [8, 16, 16]
    assert main(["make-tiny", "sd15", "--out", str(tmp_path / "b"), "--set", "bogus=1"]) == 2
    assert main(["make-tiny", "sd15", "--out", str(tmp_path / "c"), "--set", "nonsense"]) == 2
