"""Shared helpers of the FLUX Fill training / inference tests (tiny triptych folders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_triptychs(root: Path, n: int = 3, panel: int = 16, seed: int = 0) -> Path:
    """`n` random [visible | target | semantic] triptychs with captions.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            arr = rng.integers(0, 255, (panel, 3 * panel, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"t{i}.png")
            f.write(json.dumps({"image": f"t{i}.png", "prompt": f"a photo number {i}"}) + "\n")
    return root


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB PNG of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def tiny_train_args(model: str, data: Path, out: Path, **extra) -> list[str]:
    """`diffalign fill train` options for a fast run on the tiny model."""
    opts = {
        "model": model,
        "data": str(data),
        "output-dir": str(out),
        "panel": 16,
        "batch-size": 1,
        "max-sequence-length": 8,
        "lora-rank": 4,
        "max-steps": 2,
        "checkpoint-every": 1,
        "log-every": 1,
        "validate-every": 0,
        "num-validation": 1,
        "validation-steps": 1,
        "tracker": "none",
        "lr-semantic": 0.05,
        "lr-lora": 0.001,
    }
    opts.update({k.replace("_", "-"): v for k, v in extra.items()})
    args = ["fill", "train"]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args
