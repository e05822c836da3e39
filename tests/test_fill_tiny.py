"""`diffalign make-tiny flux-fill`: a FLUX.1-Fill-dev-shaped pipeline folder (spec F, issue 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError


def test_flux_fill_layout_loads_and_generates(tiny_model_dir):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5EncoderModel

    path = Path(tiny_model_dir("flux-fill"))
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxFillPipeline"
    for name in (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ):
        assert (path / name).is_dir()
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (path / "scheduler" / "scheduler_config.json").is_file()

    pipe = FluxFillPipeline.from_pretrained(path)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    # The real FLUX.1-Fill-dev channel structure and configs.
    cfg = pipe.transformer.config
    assert (cfg.in_channels, cfg.out_channels, cfg.guidance_embeds) == (384, 64, True)
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611)
    sched = pipe.scheduler.config
    assert sched.use_dynamic_shifting and sched.shift == 3.0 and sched.max_shift == 1.15

    image = torch.rand(1, 3, 32, 64)
    mask = torch.zeros(1, 1, 32, 64)
    mask[..., 32:] = 1
    out = pipe(
        prompt="a red cube",
        image=image,
        mask_image=mask,
        height=32,
        width=64,
        num_inference_steps=1,
        max_sequence_length=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 32, 64) and torch.isfinite(out).all()


def test_flux_fill_overrides_and_bad_options(tmp_path):
    out = tmp_path / "m"
    assert main(["make-tiny", "flux-fill", "--out", str(out), "--num-layers", "2"]) == 0
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["in_channels"] == 384
    # sd3-only options are refused with one line.
    assert main(["make-tiny", "flux-fill", "--out", str(tmp_path / "x"), "--patch-size", "2"]) == 2
    from diffalign.engine.tiny_flux import build_tiny_flux_fill_pipeline

    with pytest.raises(DiffalignError, match="multiple of 8"):
        build_tiny_flux_fill_pipeline(attention_head_dim=12)
