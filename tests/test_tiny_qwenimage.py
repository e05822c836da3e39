"""`diffalign make-tiny qwen-image`: a Qwen-Image-shaped pipeline folder (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def test_qwen_image_layout_loads_and_generates(tiny_model_dir):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    path = Path(tiny_model_dir("qwen-image"))
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert "Qwen/Qwen-Image" in (path / "README.md").read_text()
    pipe = QwenImagePipeline.from_pretrained(path)
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    cfg = pipe.transformer.config
    assert (cfg.in_channels, cfg.out_channels) == (64, 16)
    assert cfg.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.z_dim == 16
    sched = pipe.scheduler.config
    assert sched.use_dynamic_shifting and sched.time_shift_type == "exponential"
    # the chat template's special tokens are single tokens, prompts tokenize byte by byte
    ids = pipe.tokenizer("<|im_start|>ab<|im_end|>").input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids) == ["<|im_start|>", "a", "b", "<|im_end|>"]
    out = pipe(
        "a red cat",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=32,
        width=48,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()
