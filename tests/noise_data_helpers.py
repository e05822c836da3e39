"""Helpers shared by the noise assign / dataset / sft / em tests: tiny targets and pairs.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32  # pixels: the tiny VAEs downsample 8x -> a 4x4 latent


def write_pairs(root: Path, n: int = 4, size: int = SIZE, extra: list[dict] | None = None) -> Path:
    """`root/pairs.jsonl` with `n` random RGB targets under `root/images/` (+ `extra` lines)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / f"{i:04d}.png")
        lines.append({"prompt": f"a photo number {i}", "image": f"images/{i:04d}.png"})
    lines += extra or []
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def model_args(model: str) -> list[str]:
    return ["--model", model, "--height", str(SIZE), "--width", str(SIZE)]
