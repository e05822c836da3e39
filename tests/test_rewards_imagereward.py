"""ImageReward: the official `ImageReward.pt` layout (BLIP ViT + BERT with cross-attention + MLP)
loaded into transformers' BLIP modules, proven against a slow reference written directly on the
official state dict (BLIP's vit.py and med.py in plain torch ops)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffalign.engine import selftest_refs
from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards import clip_preprocess, load_reward
from diffalign.engine.rewards.imagereward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    UNUSED_KEYS,
    UNUSED_PREFIXES,
    map_blip_vision_key,
)

PROMPTS = ["a cat on a red sofa", "two dogs"]


@pytest.fixture(scope="module")
def ir_dir(tiny_model_dir):
    return Path(tiny_model_dir("imagereward"))


def reference_imagereward(sd, pixels, ids, mask, vision_heads, text_heads):
    """ImageReward.score_gard on the official state dict, no transformers involved."""
    return selftest_refs.reference_imagereward(
        sd, pixels, ids, mask, vision_heads, text_heads, IMAGEREWARD_MEAN, IMAGEREWARD_STD
    )


def test_key_map_is_complete(ir_dir):
    from transformers import BlipVisionModel

    from diffalign.engine.rewards.imagereward import (
        blip_vision_config,
        split_imagereward_state_dict,
    )

    sd = torch.load(ir_dir / "ImageReward.pt", weights_only=True)
    vision, text, mlp, unused = split_imagereward_state_dict(sd, ir_dir)
    assert all(k in UNUSED_KEYS or k.startswith(UNUSED_PREFIXES) for k in unused)
    assert len(vision) + len(text) + len(mlp) + len(unused) == len(sd)
    model = BlipVisionModel(blip_vision_config(vision))
    assert set(dict(model.named_parameters())) == set(vision)  # every ViT parameter filled
    assert (
        map_blip_vision_key("blocks.7.attn.proj.weight")
        == "encoder.layers.7.self_attn.projection.weight"
    )
    assert map_blip_vision_key("norm.bias") == "post_layernorm.bias"
    assert map_blip_vision_key("head.weight") is None


def test_imagereward_matches_reference(ir_dir):
    reward = load_reward("imagereward", imagereward_model_path=str(ir_dir / "ImageReward.pt"))
    assert reward.name == "imagereward" and reward.loss_offset == 2.0
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    value = reward(x, PROMPTS)
    sd = torch.load(ir_dir / "ImageReward.pt", weights_only=True)
    ids, mask = reward.tokens(PROMPTS)
    assert ids.shape == (2, 35)  # ImageReward pads to 35 tokens
    med = json.loads((ir_dir / "med_config.json").read_text())
    ref = reference_imagereward(
        sd,
        clip_preprocess(x.detach(), 32),
        ids,
        mask,
        vision_heads=3,
        text_heads=med["num_attention_heads"],
    )
    torch.testing.assert_close(value.detach(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reward.loss(x, PROMPTS), 2 - value)
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_imagereward_defaults_and_errors(ir_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path))
    with pytest.raises(
        DiffalignError,
        match=r"ImageReward checkpoint not found: .*ImageReward\.pt.*--only ImageReward",
    ):
        load_reward("imagereward")
    shutil.copytree(ir_dir, tmp_path / "ImageReward")
    assert load_reward("imagereward")(torch.rand(1, 3, 32, 32), "a").shape == (1,)

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ir_dir / "ImageReward.pt", alone / "ImageReward.pt")
    monkeypatch.setenv("DIFFALIGN_MODELS_DIR", str(tmp_path / "empty"))
    with pytest.raises(
        DiffalignError, match=r"med_config.json not found: .*--imagereward-med-config-path"
    ):
        load_reward("imagereward", imagereward_model_path=str(alone / "ImageReward.pt"))
    shutil.copy(ir_dir / "med_config.json", alone / "med_config.json")
    with pytest.raises(
        DiffalignError, match=r"BERT tokenizer folder not found.*--only ImageReward"
    ):
        load_reward("imagereward", imagereward_model_path=str(alone / "ImageReward.pt"))

    # wrong layouts: an HPS checkpoint; an extra key; a med_config of another model
    hps = tmp_path / "hps.pt"
    torch.save({"state_dict": {"token_embedding.weight": torch.zeros(4, 4)}}, hps)
    with pytest.raises(DiffalignError, match="not the official ImageReward layout"):
        load_reward(
            "imagereward",
            imagereward_model_path=str(hps),
            imagereward_med_config_path=str(ir_dir / "med_config.json"),
            imagereward_tokenizer=str(ir_dir / "bert-base-uncased"),
        )
    sd = torch.load(ir_dir / "ImageReward.pt", weights_only=True)
    sd["blip.visual_encoder.head.weight"] = torch.zeros(2, 2)
    bad = tmp_path / "bad" / "ImageReward.pt"
    bad.parent.mkdir()
    torch.save(sd, bad)
    with pytest.raises(
        DiffalignError,
        match="unexpected keys for the official layout: blip.visual_encoder.head.weight",
    ):
        load_reward(
            "imagereward",
            imagereward_model_path=str(bad),
            imagereward_med_config_path=str(ir_dir / "med_config.json"),
            imagereward_tokenizer=str(ir_dir / "bert-base-uncased"),
        )
    med = json.loads((ir_dir / "med_config.json").read_text())
    med["hidden_size"] = 768
    (tmp_path / "med.json").write_text(json.dumps(med))
    with pytest.raises(DiffalignError, match="med_config.json says hidden_size=768"):
        load_reward(
            "imagereward",
            imagereward_model_path=str(ir_dir / "ImageReward.pt"),
            imagereward_med_config_path=str(tmp_path / "med.json"),
        )
