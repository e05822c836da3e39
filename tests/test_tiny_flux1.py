"""`diffalign make-tiny flux-dev | flux-schnell`: FLUX.1 text-to-image folders (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign.cli import main


@pytest.mark.parametrize("kind", ["flux-dev", "flux-schnell"])
def test_flux1_layout_loads_and_generates(tiny_model_dir, kind):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5EncoderModel

    path = Path(tiny_model_dir(kind))
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name in (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ):
        assert (path / name).is_dir(), name
    card = (path / "README.md").read_text()
    repo = {
        "flux-dev": "black-forest-labs/FLUX.1-dev",
        "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    }[kind]
    assert repo in card and ("FLUX.1 [dev]" in card) == (kind == "flux-dev")

    pipe = FluxPipeline.from_pretrained(path)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    cfg = pipe.transformer.config
    assert (cfg.in_channels, pipe.transformer.out_channels) == (64, 64)
    assert len(pipe.transformer.transformer_blocks) == 2
    assert len(pipe.transformer.single_transformer_blocks) == 2
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.tokenizer_2.model_max_length == 512
    sched = pipe.scheduler.config
    if kind == "flux-dev":
        assert cfg.guidance_embeds and sched.use_dynamic_shifting and sched.shift == 3.0
    else:
        assert not cfg.guidance_embeds and not sched.use_dynamic_shifting and sched.shift == 1.0

    out = pipe(
        prompt="a red cube",
        height=32,
        width=48,
        num_inference_steps=2,
        guidance_scale=3.5 if kind == "flux-dev" else 0.0,
        max_sequence_length=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()


def test_flux1_overrides(tmp_path):
    out = tmp_path / "m"
    args = ["make-tiny", "flux-schnell", "--out", str(out), "--set", "num_single_layers=3"]
    assert main(args) == 0
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"]) == (2, 3, False)
    assert main(["make-tiny", "flux-dev", "--out", str(tmp_path / "x"), "--patch-size", "2"]) == 2
    assert (
        main(["make-tiny", "flux-dev", "--out", str(tmp_path / "y"), "--attention-head-dim", "12"])
        == 2
    )
    assert not (tmp_path / "y").exists()


def test_flux1_presets_resolve_to_the_releases():
    from diffalign.engine.download import ASSETS
    from diffalign.engine.loading import PRESETS

    for name, repo in (
        ("flux-dev", "black-forest-labs/FLUX.1-dev"),
        ("flux-schnell", "black-forest-labs/FLUX.1-schnell"),
    ):
        assert PRESETS[name].repo_id == repo and PRESETS[name].family == "flux"
        assert ASSETS[PRESETS[name].download_name].sources[0].repo_id == repo
