"""Plain reference forwards of the official reward layouts (issue 7 "Rewards").

Each is written directly on the official state dict (or the official model class) in plain
torch ops, independent of how `engine.rewards` maps the checkpoints onto transformers modules.
The reward tests compare our rewards with them on tiny checkpoints; `diffalign selftest` runs
the same comparisons on the real files under `models/`. Slow and obviously correct.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _open_clip_block(x: torch.Tensor, sd: dict, p: str, heads: int, causal: bool) -> torch.Tensor:
    """open_clip ResidualAttentionBlock: x + attn(ln_1 x); x + mlp(ln_2 x)."""
    b, n, w = x.shape
    h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
    qkv = h @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]
    q, k, v = (t.reshape(b, n, heads, w // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
    att = (q @ k.transpose(-1, -2)) / (w // heads) ** 0.5
    if causal:
        att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
    h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]


def reference_hps(
    sd: dict[str, torch.Tensor],
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    text_heads: int,
    vision_heads: int,
) -> torch.Tensor:
    """HPSv2 score = cos(encode_image, encode_text) of open_clip's CLIP on the official
    `HPS_v2*_compressed.pt` state dict. `pixels`: normalised `[B, 3, S, S]`; `tokens`: `[B, T]`
    ids padded to the context length (the end-of-text id is the largest, as in open_clip)."""
    w = sd["visual.class_embedding"].numel()
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, w), x], 1)
    x = x + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        x = _open_clip_block(x, sd, f"visual.transformer.resblocks.{i}.", vision_heads, False)
        i += 1
    x = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    img = F.normalize(x @ sd["visual.proj"], dim=-1)

    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        t = _open_clip_block(t, sd, f"transformer.resblocks.{i}.", text_heads, True)
        i += 1
    tw = t.shape[-1]
    t = F.layer_norm(t, (tw,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    t = t[torch.arange(t.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    txt = F.normalize(t, dim=-1)
    return (img * txt).sum(-1)


def _bert_attention(q_in, kv_in, sd, p, heads, mask=None):
    """BLIP med BertSelfAttention + BertSelfOutput (post-LayerNorm residual)."""
    b, n, w = q_in.shape
    hd = w // heads
    q = (q_in @ sd[p + "self.query.weight"].t() + sd[p + "self.query.bias"]).view(b, n, heads, hd)
    k = (kv_in @ sd[p + "self.key.weight"].t() + sd[p + "self.key.bias"]).view(b, -1, heads, hd)
    v = (kv_in @ sd[p + "self.value.weight"].t() + sd[p + "self.value.bias"]).view(b, -1, heads, hd)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / hd**0.5
    if mask is not None:
        s = s + (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).reshape(b, n, w)
    o = o @ sd[p + "output.dense.weight"].t() + sd[p + "output.dense.bias"]
    return F.layer_norm(
        o + q_in, (w,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], 1e-12
    )


def reference_imagereward(
    sd: dict[str, torch.Tensor],
    pixels: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    vision_heads: int,
    text_heads: int,
    mean: float,
    std: float,
) -> torch.Tensor:
    """ImageReward's `score_gard` on the official `ImageReward.pt` state dict (BLIP's vit.py
    and med.py in plain ops), normalised `(raw - mean) / std` as the package does."""
    v = "blip.visual_encoder."
    w = sd[v + "cls_token"].shape[-1]
    x = F.conv2d(
        pixels,
        sd[v + "patch_embed.proj.weight"],
        sd[v + "patch_embed.proj.bias"],
        stride=sd[v + "patch_embed.proj.weight"].shape[-1],
    )
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], 1, w), x.flatten(2).transpose(1, 2)], 1)
    x = x + sd[v + "pos_embed"][:, : x.shape[1]]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in sd:
        p = f"{v}blocks.{i}."
        h = F.layer_norm(x, (w,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        b, n, _ = h.shape
        qkv = (
            (h @ sd[p + "attn.qkv.weight"].t() + sd[p + "attn.qkv.bias"])
            .reshape(b, n, 3, vision_heads, w // vision_heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (w // vision_heads) ** -0.5).softmax(-1)
        o = (a @ qkv[2]).transpose(1, 2).reshape(b, n, w)
        x = x + o @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        h = F.layer_norm(x, (w,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].t() + sd[p + "mlp.fc2.bias"]
        i += 1
    image_embeds = F.layer_norm(x, (w,), sd[v + "norm.weight"], sd[v + "norm.bias"], 1e-6)

    t = "blip.text_encoder."
    e = (
        sd[t + "embeddings.word_embeddings.weight"][ids]
        + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    tw = e.shape[-1]
    h = F.layer_norm(
        e, (tw,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], 1e-12
    )
    i = 0
    while f"{t}encoder.layer.{i}.intermediate.dense.weight" in sd:
        p = f"{t}encoder.layer.{i}."
        h = _bert_attention(h, h, sd, p + "attention.", text_heads, mask)
        h = _bert_attention(h, image_embeds, sd, p + "crossattention.", text_heads)
        f = F.gelu(h @ sd[p + "intermediate.dense.weight"].t() + sd[p + "intermediate.dense.bias"])
        f = f @ sd[p + "output.dense.weight"].t() + sd[p + "output.dense.bias"]
        h = F.layer_norm(
            f + h, (tw,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], 1e-12
        )
        i += 1
    r = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = r @ sd[f"mlp.layers.{idx}.weight"].t() + sd[f"mlp.layers.{idx}.bias"]
    return (r.squeeze(-1) - mean) / std


@torch.no_grad()
def reference_clip_cos(model: Any, tokenizer: Any, pixels: torch.Tensor, prompts: list[str]):
    """cos(image, text) from a transformers CLIPModel's own forward (`logits_per_image /
    logit_scale.exp()`, diagonal) and the L2-normalised image embeddings (for the aesthetic
    head). `pixels`: preprocessed `[B, 3, S, S]`, one prompt per image."""
    t = tokenizer(prompts, padding=True, return_tensors="pt")
    out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixels)
    return (out.logits_per_image / model.logit_scale.exp()).diagonal(), out.image_embeds


def reference_aesthetic_head(sd: dict[str, torch.Tensor]) -> nn.Sequential:
    """The LAION improved-aesthetic-predictor MLP exactly as published (`nn.Sequential` of
    Linear/Dropout, no activations), loaded from its `layers.*` state dict, in eval mode."""
    dims = [sd["layers.0.weight"].shape[1]] + [
        sd[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)
    ]
    head = nn.Sequential(
        nn.Linear(dims[0], dims[1]),
        nn.Dropout(0.2),
        nn.Linear(dims[1], dims[2]),
        nn.Dropout(0.2),
        nn.Linear(dims[2], dims[3]),
        nn.Dropout(0.1),
        nn.Linear(dims[3], dims[4]),
        nn.Linear(dims[4], dims[5]),
    ).eval()
    head.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()})
    return head
