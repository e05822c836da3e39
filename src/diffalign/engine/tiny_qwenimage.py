"""`diffalign make-tiny qwen-image`: a tiny random Qwen-Image pipeline in the real layout.

The folder is what `QwenImagePipeline.save_pretrained` writes for Qwen/Qwen-Image:
`model_index.json`, `transformer/` (QwenImageTransformer2DModel: dual-stream MMDiT blocks,
64 = 16 x 2x2 packed input channels, 16 output channels), `vae/` (AutoencoderKLQwenImage, 16
latent channels, 8x spatial downsampling, the release's latent mean/std), `text_encoder/`
(Qwen2_5_VLForConditionalGeneration: a tiny Qwen2.5-VL, text and vision towers), `tokenizer/`
(Qwen2Tokenizer: byte-level BPE over the 256 byte characters, no merges, plus the chat special
tokens the prompt template uses), `scheduler/` (FlowMatchEulerDiscreteScheduler with the
release's exponential dynamic shift) and the model card `README.md` naming the release.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError
from diffalign.engine.tiny import _bytes_to_unicode, register_kind, require_positive

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_VISION_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_QWEN_OVERRIDES: dict[str, Any] = {
    "num_layers": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "text_hidden_size": 32,
}


def tiny_qwen2_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, the real format) over the 256 byte characters with no
    merges, then the chat and vision special tokens; ids: bytes 0-255, specials from 256."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tok.add_tokens(list(QWEN_SPECIAL_TOKENS + QWEN_VISION_TOKENS), special_tokens=True)
    return tok


def build_tiny_qwen_image_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 4,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_hidden_size: int = 32,
):
    """A tiny random `QwenImagePipeline` in memory, wired like Qwen-Image.

    `text_hidden_size` is the Qwen2.5-VL width (= the transformer's `joint_attention_dim`,
    3584 in the release); `attention_head_dim` must be a multiple of 8 (three even RoPE axes
    summing to it, like 16/56/56 of 128).
    """
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffalign.engine.tiny_flux import flux_rope_axes

    require_positive(
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        text_hidden_size=text_hidden_size,
    )
    if text_hidden_size % 4:
        raise DiffalignError("make-tiny: text_hidden_size must be a multiple of 4")
    tokenizer = tiny_qwen2_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + QWEN_VISION_TOKENS}
    vocab_size = len(tokenizer)

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2, as the release
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_hidden_size,
        axes_dims_rope=tuple(flux_rope_axes(attention_head_dim)),
    )

    torch.manual_seed(seed + 1)
    heads = 2
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_hidden_size,
            "intermediate_size": 2 * text_hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_sections(text_hidden_size // heads),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": text_hidden_size,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three downsamplings: 8x, as the release
    ).eval()

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def mrope_sections(head_dim: int) -> list[int]:
    """Qwen2.5-VL's M-RoPE sections (time, height, width) summing to half the head dim, split
    like the release's [16, 24, 24] of 64."""
    half = head_dim // 2
    first = max(1, half // 4)
    second = (half - first) // 2
    return [first, second, half - first - second]


@register_kind(
    "qwen-image",
    "QwenImagePipeline shaped like Qwen-Image (dual-stream MMDiT, tiny Qwen2.5-VL text encoder "
    "and byte-level Qwen2 tokenizer, 16-channel VAE packed 2x2, exponential-shift scheduler)",
    _QWEN_OVERRIDES,
)
def _build_qwen_image(out: Path, seed: int, **overrides: Any) -> None:
    from diffalign.engine.tiny_flux1 import release_model_card

    build_tiny_qwen_image_pipeline(seed, **overrides).save_pretrained(out)
    (Path(out) / "README.md").write_text(
        release_model_card(
            "Qwen-Image", "Qwen/Qwen-Image", "QwenImagePipeline", "20B MMDiT, 60 blocks"
        ),
        encoding="utf-8",
    )
