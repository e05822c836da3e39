"""The released models' transformer sizes the benches build (random weights), in one place.

`FLUX1`: FLUX.1 [dev] / [schnell] / Fill's transformer (19 double-stream + 38 single-stream
blocks, 24 heads of 128 = 3072 wide, T5-XXL context 4096 wide with 512 tokens, CLIP ViT-L
pooled projection 768). `SD3_MEDIUM`: SD3-medium's (24 joint blocks, 24 heads of 64 = 1536
wide, T5 context 4096, pooled CLIP-L + bigG 2048, 77 CLIP + 256 T5 = 333 text tokens, 4096
image tokens at 1024 px, classifier-free guidance batch 2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerSize:
    """One transformer's size (diffusers config names in the comments)."""

    blocks: int  # num_layers (FLUX: the double-stream blocks)
    heads: int  # num_attention_heads
    head_dim: int  # attention_head_dim
    text_dim: int  # joint_attention_dim: the T5 context's width
    pooled_dim: int  # pooled_projection_dim
    text_tokens: int
    single_blocks: int = 0  # num_single_layers (FLUX)
    image_tokens: int | None = None  # at the model's native resolution
    batch: int | None = None

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def describe(self) -> str:
        """E.g. "19 + 38 blocks, 24 heads x 128" (the benches' help texts)."""
        blocks = f"{self.blocks} + {self.single_blocks}" if self.single_blocks else str(self.blocks)
        return f"{blocks} blocks, {self.heads} heads x {self.head_dim}"


FLUX1 = TransformerSize(
    blocks=19, single_blocks=38, heads=24, head_dim=128, text_dim=4096, pooled_dim=768,
    text_tokens=512, image_tokens=4096,
)  # fmt: skip
SD3_MEDIUM = TransformerSize(
    blocks=24, heads=24, head_dim=64, text_dim=4096, pooled_dim=2048, text_tokens=333,
    image_tokens=4096, batch=2,
)  # fmt: skip
