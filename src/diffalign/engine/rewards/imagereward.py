"""ImageReward (`imagereward`): the official `ImageReward.pt` + `med_config.json` loaded into
transformers' BLIP modules (issue 7 "Rewards", seed 001 `rewards_imagereward.py`).

ImageReward = BLIP ViT-L/16 image encoder -> BERT text encoder with cross-attention to the
image tokens -> MLP on the [CLS] state; score normalised `(r - 0.16717) / 1.03334`; prompts
tokenized with BERT (bert-base-uncased) to 35 tokens; ReNO's loss `2 - score`.

The `image-reward` package is not used (it pins timm 0.6.13 and fairscale and fails to import on
transformers 5). Key map: `blip.visual_encoder.*` -> `BlipVisionModel` with the renames of
transformers' own BLIP conversion script; `blip.text_encoder.*` -> `BlipTextModel` (a port of
BLIP's `med.py`: identical key names, cross-attention built with `is_decoder=True` and run in
encoder mode); `mlp.layers.*` -> the 5-Linear head. `blip.vision_proj`, `blip.text_proj`
(contrastive heads) and the `position_ids` buffer are not used by the score.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    Reward,
    clip_preprocess,
    enable_gradient_checkpointing,
    freeze,
    no_init_weights,
)
from diffalign.engine.rewards.files import (
    asset_path,
    check_tokenizer_files,
    missing,
    quiet_hf_progress,
    read_json_config,
    resolve_file,
    state_dict_of,
)

IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_DIR = "bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
# source keys the score does not use (contrastive projections, a buffer)
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.")
UNUSED_KEYS = frozenset({"blip.text_encoder.embeddings.position_ids"})

_VIS = "blip.visual_encoder."
_TXT = "blip.text_encoder."
_VIS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_VIS_BLOCK_PARTS = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIS_SIMPLE = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def vit_heads(width: int) -> int:
    """BLIP ViT heads: head width 64 (ViT-B 12, ViT-L 16); tiny test widths use head width 8."""
    if width % 64 == 0:
        return width // 64
    if width % 8 == 0:
        return width // 8
    raise DiffalignError(f"ImageReward checkpoint: cannot tell the heads of a {width}-wide ViT")


def map_blip_vision_key(key: str) -> str | None:
    """`cls_token`, `blocks.3.attn.qkv.weight`, ... (below `blip.visual_encoder.`) -> the
    BlipVisionModel key, or None if the key is not part of the BLIP ViT."""
    if key in _VIS_SIMPLE:
        return _VIS_SIMPLE[key]
    m = _VIS_BLOCK.match(key)
    if m:
        part, _, kind = m.group(2).rpartition(".")
        if part in _VIS_BLOCK_PARTS and kind in ("weight", "bias"):
            return f"encoder.layers.{m.group(1)}.{_VIS_BLOCK_PARTS[part]}.{kind}"
    return None


def split_imagereward_state_dict(
    sd: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """(vision, text, mlp, unused) state dicts; any key outside the official layout is an error."""
    vision, text, mlp, unused, strange = {}, {}, {}, [], []
    for key, value in sd.items():
        if key.startswith(_VIS):
            new = map_blip_vision_key(key[len(_VIS) :])
            (strange.append(key) if new is None else vision.__setitem__(new, value))
        elif key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES):
            unused.append(key)
        elif key.startswith(_TXT):
            text[key[len(_TXT) :]] = value
        elif key.startswith("mlp."):
            mlp[key] = value
        else:
            strange.append(key)
    if not vision or not text or not mlp:
        lacking = [
            n
            for n, d in (("blip.visual_encoder", vision), ("blip.text_encoder", text), ("mlp", mlp))
            if not d
        ]
        raise DiffalignError(
            f"ImageReward checkpoint {path}: not the official ImageReward layout (no "
            f"{', '.join(lacking)}.* keys)"
        )
    if strange:
        raise DiffalignError(
            f"ImageReward checkpoint {path}: unexpected keys for the official layout: "
            f"{', '.join(strange[:4])}{' ...' if len(strange) > 4 else ''}"
        )
    return vision, text, mlp, unused


def blip_vision_config(vision: dict[str, torch.Tensor]):
    """BlipVisionConfig of a BLIP ViT, every size from the (mapped) tensors."""
    from transformers import BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    n_pos = vision["embeddings.position_embedding"].shape[1]
    grid = math.isqrt(n_pos - 1)
    layers = {int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")}
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=vit_heads(width),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )


# med_config.json keys the text encoder reads: (type, check, what the check wants)
_MED_KEYS = {
    "hidden_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "vocab_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "num_hidden_layers": (int, lambda v: v >= 1, "an integer >= 1"),
    "num_attention_heads": (int, lambda v: v >= 1, "an integer >= 1"),
    "pad_token_id": (int, lambda v: v >= 0, "an integer >= 0"),
    "layer_norm_eps": (float, lambda v: 0 < v < math.inf, "a number > 0"),
    "hidden_act": (str, lambda v: v in _activations(), "a transformers activation name"),
}


def _activations() -> set[str]:
    from transformers.activations import ACT2FN

    return set(ACT2FN)


def check_med_config(med: dict, path: Path) -> dict:
    """`med` with every key the text encoder reads of the right type (one line naming the key
    otherwise); JSON integers are accepted for float keys."""
    for key, (kind, ok, want) in _MED_KEYS.items():
        if key not in med:
            continue
        v = med[key]
        typed = isinstance(v, kind) or (kind is float and isinstance(v, int))
        if isinstance(v, bool) or not typed or not ok(v):
            raise DiffalignError(f"ImageReward med_config {path}: {key} must be {want}, got {v!r}")
    return med


def blip_text_config(med: dict, text: dict[str, torch.Tensor], vision_width: int, path: Path):
    """BlipTextConfig from med_config.json, checked against the text-encoder tensors."""
    from transformers import BlipTextConfig

    vocab, hidden = text["embeddings.word_embeddings.weight"].shape
    layers = {int(k.split(".")[2]) for k in text if k.startswith("encoder.layer.")}
    for name, actual in (
        ("hidden_size", hidden),
        ("vocab_size", vocab),
        ("num_hidden_layers", len(layers)),
    ):
        if name in med and med[name] != actual:
            raise DiffalignError(
                f"med_config.json says {name}={med[name]} but {path} has {actual}: "
                "the config does not belong to this checkpoint"
            )
    heads = med.get("num_attention_heads", 12)
    if hidden % heads:
        raise DiffalignError(
            f"med_config.json says num_attention_heads={heads}, which does not divide the "
            f"text encoder's width {hidden} in {path}"
        )
    return BlipTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        encoder_hidden_size=vision_width,  # BLIP sets encoder_width = vision width in code
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=vocab - 2,  # BLIP's added [DEC] (30522 in the real 30524-token vocabulary)
        eos_token_id=2 if vocab > 2 else None,
        sep_token_id=102 if vocab > 102 else None,
        is_decoder=True,  # builds the cross-attention layers; run in encoder mode
    )


def _load_into(model: torch.nn.Module, sd: dict, what: str, path: Path, ignore=()) -> None:
    result = model.load_state_dict(sd, strict=False)
    lacking = [k for k in result.missing_keys if not k.endswith(tuple(ignore))]
    if lacking or result.unexpected_keys:
        raise DiffalignError(
            f"ImageReward checkpoint {path}: {what} keys do not match (missing "
            f"{', '.join(lacking[:4]) or 'none'}; unexpected "
            f"{', '.join(result.unexpected_keys[:4]) or 'none'})"
        )


class ImageRewardReward(Reward):
    """ImageReward's `score_gard`: BLIP image tokens -> BERT cross-attention [CLS] -> MLP,
    normalised; differentiable in the images."""

    name = "imagereward"
    loss_offset = 2.0

    def __init__(self, visual, text_encoder, head, tokenizer, size: int):
        super().__init__()
        self.visual, self.text_encoder, self.head = visual, text_encoder, head
        self.tokenizer, self.size = tokenizer, size
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT ids + mask, padded to 35 as ImageReward does; cached per prompt."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._tokens]
        if todo:
            t = self.tokenizer(
                todo,
                padding="max_length",
                truncation=True,
                max_length=TEXT_MAX_LENGTH,
                return_tensors="pt",
            )
            for i, p in enumerate(todo):
                self._tokens[p] = (t["input_ids"][i], t["attention_mask"][i])
        ids = torch.stack([self._tokens[p][0] for p in prompts])
        mask = torch.stack([self._tokens[p][1] for p in prompts])
        return ids, mask

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = self.visual.embeddings.patch_embedding.weight.dtype
        device = self.visual.embeddings.patch_embedding.weight.device
        x = clip_preprocess(images.float(), self.size, CLIP_MEAN, CLIP_STD).to(dtype)
        image_embeds = self.visual(pixel_values=x).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        ids, mask = self.tokens(prompts)
        out = self.text_encoder(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        raw = self.head(out.last_hidden_state[:, 0, :]).squeeze(-1).float()
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_bert_tokenizer(folder: Path):
    """bert-base-uncased with BLIP's two extra tokens ([DEC] bos, [ENC]), as `init_tokenizer`."""
    from transformers import BertTokenizer

    try:
        with quiet_hf_progress():
            tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DiffalignError(
            f"ImageReward BERT tokenizer in {folder}: cannot be loaded ({e})"
        ) from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_imagereward(
    model_path: str | None,
    med_config_path: str | None,
    tokenizer_path: str | None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> ImageRewardReward:
    """The `imagereward` reward from the official files (weights_only); defaults in
    `models/ImageReward/` (`diffalign download --only ImageReward`)."""
    from transformers import BlipTextModel, BlipVisionModel

    from diffalign.engine.io import load_pt
    from diffalign.engine.rewards.clip import MLPHead, build_mlp_head

    path = resolve_file(
        model_path,
        IMAGEREWARD_FILE,
        "ImageReward checkpoint",
        "ImageReward",
        "--imagereward-model-path",
    )
    med_path = (
        Path(med_config_path).expanduser() if med_config_path else path.parent / MED_CONFIG_FILE
    )
    if not med_path.is_file():
        raise missing(
            "ImageReward med_config.json", med_path, "ImageReward", "--imagereward-med-config-path"
        )
    if tokenizer_path:
        tok_dir = Path(tokenizer_path).expanduser()
    elif (path.parent / TOKENIZER_DIR).is_dir():
        tok_dir = path.parent / TOKENIZER_DIR
    else:
        tok_dir = asset_path("ImageReward", TOKENIZER_DIR)
    if not tok_dir.is_dir():
        raise missing(
            "ImageReward BERT tokenizer folder", tok_dir, "ImageReward", "--imagereward-tokenizer"
        )
    check_tokenizer_files(tok_dir, "wordpiece", "ImageReward BERT tokenizer folder")
    med = check_med_config(read_json_config(med_path, "ImageReward med_config"), med_path)
    sd = state_dict_of(load_pt(path), path, "ImageReward checkpoint")
    vision_sd, text_sd, mlp_sd, _ = split_imagereward_state_dict(sd, path)

    vcfg = blip_vision_config(vision_sd)
    tcfg = blip_text_config(med, text_sd, vcfg.hidden_size, path)
    with no_init_weights():
        visual = BlipVisionModel(vcfg)
        text_encoder = BlipTextModel(tcfg, add_pooling_layer=False)
    _load_into(visual, vision_sd, "visual encoder", path)
    _load_into(text_encoder, text_sd, "text encoder", path, ignore=("position_ids",))
    with torch.no_grad():  # the buffer is not persistent: rebuild it
        emb = text_encoder.embeddings
        emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1]).expand(1, -1))
    head = MLPHead(build_mlp_head(mlp_sd, "mlp.", "ImageReward checkpoint", path))
    if head.in_features != tcfg.hidden_size:
        raise DiffalignError(
            f"ImageReward checkpoint {path}: the MLP expects {head.in_features} features but the "
            f"text encoder is {tcfg.hidden_size} wide"
        )
    tokenizer = load_bert_tokenizer(tok_dir)
    if len(tokenizer) > tcfg.vocab_size:
        raise DiffalignError(
            f"ImageReward tokenizer {tok_dir} has {len(tokenizer)} tokens but the text encoder "
            f"only {tcfg.vocab_size} (not the bert-base-uncased tokenizer of this checkpoint)"
        )
    for m in (visual, text_encoder, head):
        freeze(m).to(device=device, dtype=dtype)
    if gradient_checkpointing:
        enable_gradient_checkpointing(visual)
        enable_gradient_checkpointing(text_encoder)
    return ImageRewardReward(visual, text_encoder, head, tokenizer, vcfg.image_size)
