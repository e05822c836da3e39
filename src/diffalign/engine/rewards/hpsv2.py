"""HPSv2 / HPSv2.1 (`hpsv2`): the official `HPS_v2*_compressed.pt` (open_clip ViT-H-14 in the
OpenAI-CLIP layout) mapped onto a transformers `CLIPModel` (issue 7 "Rewards", seed 001
`rewards_hpsv2.py`). Score = cos(image, text) of the L2-normalised embeddings; ReNO's loss
`1 - score`.

open_clip is not used: it needs torchvision, which does not import beside this torch. Every
size (widths, depths, patch, image size, vocabulary, context length) is read from the tensors;
head counts follow open_clip's model configs (head width 64, 80 for the 1280-wide ViT-H/14
tower; the tiny test checkpoints, narrower than 64, use head width 8).
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import torch

from diffalign.engine.download import HPS_FILES
from diffalign.engine.errors import DiffalignError
from diffalign.engine.rewards.files import (
    asset_path,
    check_tokenizer_files,
    missing,
    quiet_hf_progress,
    resolve_file,
    state_dict_of,
)

# keys of the open_clip state dict that the transformers model does not need (buffers)
HPS_UNUSED_KEYS = frozenset({"attn_mask"})
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_REQUIRED = (
    "token_embedding.weight",
    "positional_embedding",
    "text_projection",
    "ln_final.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.conv1.weight",
    "visual.proj",
    "visual.ln_pre.weight",
    "visual.ln_post.weight",
)


def open_clip_clean(text: str) -> str:
    """The prompt cleaning of open_clip's tokenizer, which HPSv2 scores with (`basic_clean`,
    `whitespace_clean`, lowercase): ftfy's `fix_text` (straight quotes, no ligatures, half-width
    letters, NFC), HTML entities unescaped twice, whitespace runs to one space, stripped."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def open_clip_heads(width: int) -> int:
    """Attention heads of an open_clip tower `width` wide (see the module docstring)."""
    if width in (1280, 1408, 1664):  # ViT-H/14, ViT-g/14, ViT-bigG/14: 16 heads
        return 16
    if width % 64 == 0:
        return width // 64
    if width % 8 == 0:
        return width // 8
    raise DiffalignError(f"HPS checkpoint: cannot tell the head count of a {width}-wide tower")


def _layers(sd: dict, prefix: str) -> int:
    idx = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and (m.group(1) or "") == prefix}
    if not idx or idx != set(range(max(idx) + 1)):
        raise DiffalignError(f"HPS checkpoint: {prefix or 'text '}transformer blocks are not 0..N")
    return max(idx) + 1


def hps_clip_config(
    sd: dict[str, torch.Tensor],
    eos_token_id: int,
    pad_token_id: int = 0,
    bos_token_id: int | None = None,
):
    """A `CLIPConfig` whose shapes are those of the open_clip state dict `sd`."""
    from transformers import CLIPConfig

    lacking = [k for k in _REQUIRED if k not in sd]
    if lacking:
        raise DiffalignError(
            f"not an open_clip CLIP checkpoint (HPSv2 layout): missing {', '.join(lacking[:4])}"
        )
    t_width = sd["token_embedding.weight"].shape[1]
    v_width = sd["visual.class_embedding"].numel()
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise DiffalignError("HPS checkpoint: visual.positional_embedding is not 1 + a square grid")
    text = {
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "hidden_size": t_width,
        "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _layers(sd, ""),
        "num_attention_heads": open_clip_heads(t_width),
        "max_position_embeddings": sd["positional_embedding"].shape[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": sd["text_projection"].shape[1],
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id - 1 if bos_token_id is None else bos_token_id,
        "pad_token_id": pad_token_id,
    }
    vision = {
        "hidden_size": v_width,
        "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _layers(sd, "visual."),
        "num_attention_heads": open_clip_heads(v_width),
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": sd["visual.proj"].shape[1],
    }
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1]
    )


def map_open_clip_to_transformers(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip (OpenAI-CLIP layout) keys -> transformers `CLIPModel` keys.

    Returns the mapped state dict and the source keys left unused (only `HPS_UNUSED_KEYS` may
    be). `attn.in_proj_weight/bias` split into q/k/v; `text_projection` and `visual.proj`
    (used as `x @ P`) transpose into Linear weights.
    """
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    simple = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "logit_scale": "logit_scale",
    }
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}."
            part = m.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if part.endswith("weight") else "bias"
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            elif part in _BLOCK_PARTS:
                out[base + _BLOCK_PARTS[part]] = value
            else:
                unused.append(key)
        else:
            unused.append(key)
    return out, unused


def empty_clip_model(config):
    """A CLIPModel without random initialisation (its weights are loaded next)."""
    from transformers import CLIPModel

    from diffalign.engine.rewards.base import no_init_weights

    with no_init_weights():
        return CLIPModel(config)


def load_hps_clip(
    sd: dict[str, torch.Tensor],
    path: Path,
    eos_token_id: int,
    pad_token_id: int = 0,
    bos_token_id: int | None = None,
):
    """The transformers CLIPModel of an HPS state dict; every key must be mapped or known unused."""
    try:
        config = hps_clip_config(sd, eos_token_id, pad_token_id, bos_token_id)
    except DiffalignError as e:  # name the file the user passed
        raise DiffalignError(f"HPS checkpoint {path}: {e}") from None
    mapped, unused = map_open_clip_to_transformers(sd)
    strange = [k for k in unused if k not in HPS_UNUSED_KEYS]
    if strange:
        raise DiffalignError(
            f"HPS checkpoint {path}: unexpected keys for the open_clip layout: "
            f"{', '.join(strange[:4])}{' ...' if len(strange) > 4 else ''}"
        )
    model = empty_clip_model(config)
    result = model.load_state_dict(mapped, strict=False)
    lacking = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if lacking or result.unexpected_keys:
        raise DiffalignError(
            f"HPS checkpoint {path}: does not fill the CLIP model (missing "
            f"{', '.join(lacking[:4]) or 'none'}; unexpected {', '.join(result.unexpected_keys[:4]) or 'none'})"
        )
    return model


def load_hpsv2(
    checkpoint: str | None,
    processor: str | None,
    *,
    version: str = "v2.1",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    geometry: str = "reno",
):
    """The `hpsv2` reward from `HPS_v2.1_compressed.pt` / `HPS_v2_compressed.pt` (weights_only)
    and a CLIP-H/14 tokenizer + processor folder (default `processor/` beside the checkpoint).

    `geometry`: "reno" (default, ReNO's resize of the shorter side + centre crop) or "official"
    (`img_score.py`'s open_clip `ResizeMaxSize`: resize the longer side, pad with black)."""
    from transformers import AutoTokenizer

    from diffalign.engine.io import load_pt
    from diffalign.engine.rewards.base import GEOMETRIES, enable_gradient_checkpointing, freeze
    from diffalign.engine.rewards.clip import CLIPBundle, CLIPScoreReward, _processor_settings

    if geometry not in GEOMETRIES:
        raise DiffalignError(
            f"--hps-geometry must be one of {', '.join(GEOMETRIES)}, got '{geometry}'"
        )
    if version not in HPS_FILES:
        raise DiffalignError(
            f"--hps-version must be one of {', '.join(HPS_FILES)}, got '{version}'"
        )
    path = resolve_file(
        checkpoint,
        HPS_FILES[version],
        "HPS checkpoint",
        "HPSv2",
        "--hps-checkpoint-path",
        # `download --only HPSv2` fetches v2.1 unless told the version
        download_extra="" if version == "v2.1" else f"--hps-version {version}",
    )
    if processor:
        proc = Path(processor).expanduser()
    elif (path.parent / "processor").is_dir():
        proc = path.parent / "processor"
    else:
        proc = asset_path("HPSv2", "processor")
    if not proc.is_dir():
        raise missing("HPSv2 tokenizer/processor folder", proc, "HPSv2", "--hps-processor")
    check_tokenizer_files(proc, "bpe", "HPSv2 tokenizer/processor folder")
    try:
        with quiet_hf_progress():
            tokenizer = AutoTokenizer.from_pretrained(str(proc), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DiffalignError(f"HPSv2 tokenizer in {proc}: cannot be loaded ({e})") from None
    sd = state_dict_of(load_pt(path), path, "HPS checkpoint")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = load_hps_clip(sd, path, eos, pad, tokenizer.bos_token_id)
    model = freeze(model).to(device=device, dtype=dtype)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    size, mean, std = _processor_settings([proc], int(model.config.vision_config.image_size))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # open_clip tokenises the cleaned text as it is: no NFC after it
        backend.normalizer = None
    bundle = CLIPBundle(model, tokenizer, size, mean, std, str(path), clean=open_clip_clean)
    bundle.geometry = geometry
    reward = CLIPScoreReward(bundle, name="hpsv2", scale=1.0, loss_offset=1.0)
    reward.version = version
    return reward
