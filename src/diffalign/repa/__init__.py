"""R: U-REPA on SD 1.5 (seed 003): align a U-Net bottleneck with DINOv2 tokens during LoRA
fine-tuning; preprocessing to LMDB, the DINOv2 teacher, training, feature extraction and probes."""

from diffalign.repa.losses import manifold_loss, token_loss

__all__ = ["manifold_loss", "token_loss"]
