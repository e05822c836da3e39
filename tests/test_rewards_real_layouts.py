"""The key maps at the REAL checkpoint sizes, without weights: the official layouts of
HPS_v2.1_compressed.pt (open_clip ViT-H-14, 686 keys) and ImageReward.pt (BLIP ViT-L/16 +
BERT-base with cross-attention) are written on the meta device and must fill transformers'
modules exactly, with the real configs inferred from the shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffalign.engine import tiny_rewards


@pytest.fixture
def meta_tensors(monkeypatch):
    """Make the tiny writers allocate nothing: every random tensor becomes a meta tensor."""
    monkeypatch.setattr(
        tiny_rewards, "_rand", lambda g, *shape, std=0.02: torch.empty(*shape, device="meta")
    )


def test_hps_vit_h_14_real_layout(meta_tensors):
    from transformers import CLIPModel

    from diffalign.engine.rewards.hpsv2 import hps_clip_config, map_open_clip_to_transformers

    sd = tiny_rewards.open_clip_state_dict(
        vocab_size=49408,
        context_length=77,
        text_width=1024,
        text_layers=24,
        vision_width=1280,
        vision_layers=32,
        patch_size=14,
        image_size=224,
        embed_dim=1024,
    )
    assert len(sd) == 686  # the real checkpoint's key count
    cfg = hps_clip_config(sd, eos_token_id=49407, bos_token_id=49406)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (
        1280,
        32,
        16,
        5120,
    )
    assert (v.image_size, v.patch_size, cfg.projection_dim) == (224, 14, 1024)
    mapped, unused = map_open_clip_to_transformers(sd)
    assert unused == []
    with torch.device("meta"):
        model = CLIPModel(cfg)
    params = {k: p.shape for k, p in model.named_parameters()}
    assert set(params) == set(mapped)
    assert all(params[k] == mapped[k].shape for k in params)


def test_imagereward_real_layout(meta_tensors):
    from transformers import BlipTextModel, BlipVisionModel

    from diffalign.engine.rewards.imagereward import (
        blip_text_config,
        blip_vision_config,
        split_imagereward_state_dict,
    )

    sd = tiny_rewards.imagereward_state_dict(
        vocab_size=30524,
        text_width=768,
        text_layers=12,
        text_intermediate=3072,
        max_positions=512,
        vision_width=1024,
        vision_layers=24,
        patch_size=16,
        image_size=224,
        embed_dim=256,
        mlp_hidden=(1024, 128, 64, 16),
    )
    assert sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (
        768,
        1024,
    )
    vision, text, mlp, unused = split_imagereward_state_dict(sd, Path("ImageReward.pt"))
    assert sorted(unused) == [
        "blip.text_encoder.embeddings.position_ids",
        "blip.text_proj.bias",
        "blip.text_proj.weight",
        "blip.vision_proj.bias",
        "blip.vision_proj.weight",
    ]
    vcfg = blip_vision_config(vision)
    assert (vcfg.hidden_size, vcfg.num_hidden_layers, vcfg.num_attention_heads) == (1024, 24, 16)
    assert (vcfg.image_size, vcfg.patch_size, vcfg.layer_norm_eps) == (224, 16, 1e-6)
    # ImageReward's med_config.json (BLIP's bert config); encoder_width is set to the ViT width
    med = tiny_rewards.imagereward_med_config(30524, text_width=768, text_layers=12)
    med.update(intermediate_size=3072, max_position_embeddings=512, num_attention_heads=12)
    tcfg = blip_text_config(med, text, vcfg.hidden_size, Path("ImageReward.pt"))
    assert (tcfg.num_attention_heads, tcfg.encoder_hidden_size, tcfg.vocab_size) == (
        12,
        1024,
        30524,
    )
    with torch.device("meta"):
        vis = BlipVisionModel(vcfg)
        txt = BlipTextModel(tcfg, add_pooling_layer=False)
    for model, part in ((vis, vision), (txt, text)):
        params = {k: p.shape for k, p in model.named_parameters()}
        assert set(params) == set(part) - {"embeddings.position_ids"}
        assert all(params[k] == part[k].shape for k in params)
    assert mlp["mlp.layers.0.weight"].shape == (1024, 768)


def test_aesthetic_real_layout(tmp_path):
    from diffalign.engine.rewards.clip import load_mlp_head

    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(
        tiny_rewards.aesthetic_state_dict(0, in_features=768, hidden=(1024, 128, 64, 16)), path
    )
    head = load_mlp_head(path, "aesthetic checkpoint")
    dims = [m.out_features for m in head.layers if isinstance(m, torch.nn.Linear)]
    assert head.in_features == 768 and dims == [1024, 128, 64, 16, 1]
    assert [type(m).__name__ for m in head.layers] == [
        "Linear",
        "Dropout",
        "Linear",
        "Dropout",
        "Linear",
        "Dropout",
        "Linear",
        "Linear",
    ]
