"""Run the four preprocessing steps in one `accelerate launch` (the sharded test)."""

from __future__ import annotations

import sys

from diffalign.repa.preprocess import (
    preprocess_clip,
    preprocess_dino,
    preprocess_images,
    preprocess_vae,
)

if __name__ == "__main__":
    tree, data, sd15, dino = sys.argv[1:5]
    preprocess_images(tree, data, resolution=64)
    preprocess_vae(data, sd15, batch_size=2)
    preprocess_dino(data, dino, batch_size=2)
    preprocess_clip(data, sd15, batch_size=1)
