"""Tiny reward checkpoints in the official layouts and file names (issue 7 "Rewards").

- `clip`: a transformers CLIPModel folder as `openai/clip-vit-large-patch14` is laid out
  (config.json, model.safetensors, tokenizer files, preprocessor_config.json).
- `pickscore`: a CLIPModel folder as `yuvalkirstain/PickScore_v1` plus `processor/` (the CLIP-H
  tokenizer + image processor), as `diffalign download --only PickScore` lays it out.
- `aesthetic`: `sac+logos+ava1-l14-linearMSE.pth`, a plain state dict `layers.{0,2,4,6,7}`
  whose input width is the tiny clip's projection width (16).
- `imagereward`: `ImageReward.pt` (the state dict of ImageReward's own module: `blip.visual_encoder`
  BLIP ViT, `blip.text_encoder` BERT with cross-attention, `blip.vision_proj/text_proj`,
  `mlp.layers`), `med_config.json` and `bert-base-uncased/` (a BERT tokenizer).
- `hpsv2`: `HPS_v2.1_compressed.pt` = `{"state_dict": open_clip ViT-H-14 keys}` plus
  `processor/`.

The official-layout files are written from key names and shapes (open_clip and BLIP cannot be
imported here); the loaders infer every size from the tensors, so these load exactly as the
real files do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffalign.engine.tiny import register_kind, tiny_clip_tokenizer

TINY_IMAGE_SIZE = 32
TINY_PROJECTION_DIM = 16


def _write_preprocessor(folder: Path, size: int) -> None:
    """`preprocessor_config.json` as the CLIP repos carry it (OpenAI mean/std, bicubic)."""
    from diffalign.engine.rewards.base import CLIP_MEAN, CLIP_STD

    cfg = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _write_clip_processor(folder: Path, size: int = TINY_IMAGE_SIZE) -> None:
    tiny_clip_tokenizer().save_pretrained(folder)
    _write_preprocessor(folder, size)


def build_tiny_clip_model(seed: int = 0, projection_dim: int = TINY_PROJECTION_DIM):
    """A tiny random transformers `CLIPModel` (32 px, patch 8, 2 layers per tower)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok = tiny_clip_tokenizer()
    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "projection_dim": projection_dim,
    }
    vision = {
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_attention_heads": 3,
        "num_hidden_layers": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
        "projection_dim": projection_dim,
    }
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    return CLIPModel(config).eval()


@register_kind(
    "clip",
    "CLIPModel folder as openai/clip-vit-large-patch14 (model, tokenizer, preprocessor config)",
    {"projection_dim": TINY_PROJECTION_DIM},
)
def _build_clip(out: Path, seed: int, projection_dim: int = TINY_PROJECTION_DIM) -> None:
    build_tiny_clip_model(seed, int(projection_dim)).save_pretrained(out)
    _write_clip_processor(out)


@register_kind(
    "pickscore",
    "CLIPModel folder as yuvalkirstain/PickScore_v1 + processor/ (CLIP-H tokenizer, processor)",
    {"projection_dim": TINY_PROJECTION_DIM},
)
def _build_pickscore(out: Path, seed: int, projection_dim: int = TINY_PROJECTION_DIM) -> None:
    import torch

    model = build_tiny_clip_model(seed + 1, int(projection_dim))
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # PickScore's trained scale: exp = 100
    model.save_pretrained(out)
    _write_clip_processor(out / "processor")


def aesthetic_state_dict(
    seed: int = 0, in_features: int = TINY_PROJECTION_DIM, hidden=(32, 16, 8, 4)
) -> dict[str, Any]:
    """`layers.{0,2,4,6,7}.{weight,bias}` of the LAION MLP (real: 768-1024-128-64-16-1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sizes = [in_features, *hidden, 1]
    sd: dict[str, Any] = {}
    for idx, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:])):
        sd[f"layers.{idx}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        sd[f"layers.{idx}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return sd


@register_kind(
    "aesthetic",
    "sac+logos+ava1-l14-linearMSE.pth (LAION MLP layers.{0,2,4,6,7}, input = tiny clip width)",
    {"projection_dim": TINY_PROJECTION_DIM},
)
def _build_aesthetic(out: Path, seed: int, projection_dim: int = TINY_PROJECTION_DIM) -> None:
    import torch

    from diffalign.engine.rewards.clip import AESTHETIC_FILE

    torch.save(aesthetic_state_dict(seed, int(projection_dim)), out / AESTHETIC_FILE)


def _rand(g, *shape, std: float = 0.02):
    import torch

    return torch.randn(*shape, generator=g) * std


def _open_clip_block(sd: dict, g, prefix: str, width: int, mlp: int) -> None:
    """One open_clip `ResidualAttentionBlock` (nn.MultiheadAttention's packed in_proj)."""
    import torch

    sd[prefix + "ln_1.weight"] = 1 + _rand(g, width, std=0.1)
    sd[prefix + "ln_1.bias"] = _rand(g, width, std=0.1)
    sd[prefix + "attn.in_proj_weight"] = _rand(g, 3 * width, width, std=width**-0.5)
    sd[prefix + "attn.in_proj_bias"] = _rand(g, 3 * width, std=0.1)
    sd[prefix + "attn.out_proj.weight"] = _rand(g, width, width, std=width**-0.5)
    sd[prefix + "attn.out_proj.bias"] = torch.zeros(width)
    sd[prefix + "ln_2.weight"] = 1 + _rand(g, width, std=0.1)
    sd[prefix + "ln_2.bias"] = _rand(g, width, std=0.1)
    sd[prefix + "mlp.c_fc.weight"] = _rand(g, mlp, width, std=width**-0.5)
    sd[prefix + "mlp.c_fc.bias"] = _rand(g, mlp, std=0.1)
    sd[prefix + "mlp.c_proj.weight"] = _rand(g, width, mlp, std=mlp**-0.5)
    sd[prefix + "mlp.c_proj.bias"] = torch.zeros(width)


def open_clip_state_dict(
    seed: int = 0,
    *,
    vocab_size: int = 514,
    context_length: int = 77,
    text_width: int = 32,
    text_layers: int = 2,
    vision_width: int = 40,
    vision_layers: int = 2,
    patch_size: int = 8,
    image_size: int = TINY_IMAGE_SIZE,
    embed_dim: int = TINY_PROJECTION_DIM,
) -> dict[str, Any]:
    """An open_clip `CLIP` state dict (OpenAI layout, as HPSv2's ViT-H-14 checkpoints hold it:
    1024-wide 24-layer text, 1280-wide 32-layer ViT-H/14 at 224 px, 1024-d embeddings), tiny.

    Tiny widths use head width 8: 4 text heads, 5 vision heads.
    """
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {
        "positional_embedding": _rand(g, context_length, text_width, std=0.01),
        "text_projection": _rand(g, text_width, embed_dim, std=text_width**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "token_embedding.weight": _rand(g, vocab_size, text_width),
        "ln_final.weight": 1 + _rand(g, text_width, std=0.1),
        "ln_final.bias": _rand(g, text_width, std=0.1),
    }
    for i in range(text_layers):
        _open_clip_block(sd, g, f"transformer.resblocks.{i}.", text_width, 4 * text_width)
    grid = image_size // patch_size
    sd.update(
        {
            "visual.class_embedding": _rand(g, vision_width, std=vision_width**-0.5),
            "visual.positional_embedding": _rand(g, grid * grid + 1, vision_width, std=0.1),
            "visual.proj": _rand(g, vision_width, embed_dim, std=vision_width**-0.5),
            "visual.conv1.weight": _rand(g, vision_width, 3, patch_size, patch_size, std=0.1),
            "visual.ln_pre.weight": 1 + _rand(g, vision_width, std=0.1),
            "visual.ln_pre.bias": _rand(g, vision_width, std=0.1),
            "visual.ln_post.weight": 1 + _rand(g, vision_width, std=0.1),
            "visual.ln_post.bias": _rand(g, vision_width, std=0.1),
        }
    )
    for i in range(vision_layers):
        _open_clip_block(
            sd, g, f"visual.transformer.resblocks.{i}.", vision_width, 4 * vision_width
        )
    return sd


@register_kind(
    "hpsv2",
    "HPS_v2.1_compressed.pt ({'state_dict': open_clip ViT-H-14 keys}) + processor/ (CLIP-H)",
)
def _build_hpsv2(out: Path, seed: int) -> None:
    import torch

    from diffalign.engine.rewards.hpsv2 import HPS_FILES

    torch.save({"state_dict": open_clip_state_dict(seed)}, out / HPS_FILES["v2.1"])
    _write_clip_processor(out / "processor")


def tiny_bert_tokenizer():
    """A BertTokenizer (WordPiece, uncased) over ASCII letters, digits and punctuation, with the
    special tokens at bert-base-uncased's positions ([PAD] 0 ... [MASK] 4)."""
    import string

    from transformers import BertTokenizer

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces += chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    return BertTokenizer(vocab={p: i for i, p in enumerate(pieces)})


def _lin(sd: dict, g, prefix: str, n_out: int, n_in: int) -> None:
    sd[prefix + ".weight"] = _rand(g, n_out, n_in, std=n_in**-0.5)
    sd[prefix + ".bias"] = _rand(g, n_out, std=0.05)


def _ln(sd: dict, g, prefix: str, width: int) -> None:
    sd[prefix + ".weight"] = 1 + _rand(g, width, std=0.1)
    sd[prefix + ".bias"] = _rand(g, width, std=0.1)


def imagereward_state_dict(
    seed: int = 0,
    *,
    vocab_size: int,
    text_width: int = 32,
    text_layers: int = 2,
    text_intermediate: int = 37,
    max_positions: int = 64,
    vision_width: int = 24,
    vision_layers: int = 2,
    patch_size: int = 8,
    image_size: int = TINY_IMAGE_SIZE,
    embed_dim: int = 8,
    mlp_hidden=(32, 16, 8, 4),
) -> dict[str, Any]:
    """The state dict of ImageReward's module (`blip.visual_encoder` BLIP ViT, `blip.text_encoder`
    BLIP med BertModel with cross-attention and no pooler, `blip.vision_proj/text_proj`,
    `mlp.layers`), tiny. Real: ViT-L/16 at 224 (1024 wide, 24 blocks), BERT-base (768, 12
    layers, cross-attention key/value 768x1024), vocab 30524, MLP 768-1024-128-64-16-1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}
    v = "blip.visual_encoder."
    grid = image_size // patch_size
    sd[v + "cls_token"] = _rand(g, 1, 1, vision_width)
    sd[v + "pos_embed"] = _rand(g, 1, grid * grid + 1, vision_width, std=0.1)
    sd[v + "patch_embed.proj.weight"] = _rand(g, vision_width, 3, patch_size, patch_size, std=0.1)
    sd[v + "patch_embed.proj.bias"] = _rand(g, vision_width, std=0.05)
    for i in range(vision_layers):
        b = f"{v}blocks.{i}."
        _ln(sd, g, b + "norm1", vision_width)
        _lin(sd, g, b + "attn.qkv", 3 * vision_width, vision_width)
        _lin(sd, g, b + "attn.proj", vision_width, vision_width)
        _ln(sd, g, b + "norm2", vision_width)
        _lin(sd, g, b + "mlp.fc1", 4 * vision_width, vision_width)
        _lin(sd, g, b + "mlp.fc2", vision_width, 4 * vision_width)
    _ln(sd, g, v + "norm", vision_width)

    t = "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(max_positions).expand(1, -1).clone()
    sd[t + "embeddings.word_embeddings.weight"] = _rand(g, vocab_size, text_width)
    sd[t + "embeddings.position_embeddings.weight"] = _rand(g, max_positions, text_width)
    _ln(sd, g, t + "embeddings.LayerNorm", text_width)
    for i in range(text_layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", text_width), ("crossattention", vision_width)):
            _lin(sd, g, f"{b}{att}.self.query", text_width, text_width)
            _lin(sd, g, f"{b}{att}.self.key", text_width, kv_width)
            _lin(sd, g, f"{b}{att}.self.value", text_width, kv_width)
            _lin(sd, g, f"{b}{att}.output.dense", text_width, text_width)
            _ln(sd, g, f"{b}{att}.output.LayerNorm", text_width)
        _lin(sd, g, b + "intermediate.dense", text_intermediate, text_width)
        _lin(sd, g, b + "output.dense", text_width, text_intermediate)
        _ln(sd, g, b + "output.LayerNorm", text_width)
    _lin(sd, g, "blip.vision_proj", embed_dim, vision_width)
    _lin(sd, g, "blip.text_proj", embed_dim, text_width)
    sizes = [text_width, *mlp_hidden, 1]
    for idx, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:])):
        _lin(sd, g, f"mlp.layers.{idx}", n_out, n_in)
    return sd


def imagereward_med_config(vocab_size: int, text_width: int = 32, text_layers: int = 2) -> dict:
    """`med_config.json` as ImageReward ships it (BLIP's BERT config), tiny sizes."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": text_width,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": text_layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": text_width,
        "add_cross_attention": True,
    }


@register_kind(
    "imagereward",
    "ImageReward.pt (BLIP ViT + BERT cross-attention + MLP keys) + med_config.json + "
    "bert-base-uncased/ tokenizer",
)
def _build_imagereward(out: Path, seed: int) -> None:
    import torch

    from diffalign.engine.rewards.imagereward import (
        IMAGEREWARD_FILE,
        MED_CONFIG_FILE,
        TOKENIZER_DIR,
    )

    tok = tiny_bert_tokenizer()
    vocab = len(tok) + 2  # BLIP adds [DEC] and [ENC]
    torch.save(imagereward_state_dict(seed, vocab_size=vocab), out / IMAGEREWARD_FILE)
    (out / MED_CONFIG_FILE).write_text(json.dumps(imagereward_med_config(vocab), indent=2) + "\n")
    tok_dir = out / TOKENIZER_DIR
    tok.save_pretrained(tok_dir)
    if not (tok_dir / "vocab.txt").is_file():  # bert-base-uncased ships vocab.txt too
        vocab_items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        (tok_dir / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab_items))
