"""Small real-image datasets for the U-REPA tests: crops of scikit-learn's two photos and digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _sources() -> dict[str, list[Image.Image]]:
    from sklearn.datasets import load_digits, load_sample_images

    photos = load_sample_images().images  # china, flower: 427 x 640 RGB
    out: dict[str, list[Image.Image]] = {"china": [], "flower": [], "digit": []}
    for name, photo in zip(("china", "flower"), photos, strict=True):
        for k in range(4):
            top, left = 40 + 60 * k, 50 + 110 * k
            out[name].append(Image.fromarray(photo[top : top + 80, left : left + 96]))
    digits = load_digits().images  # 8 x 8 in 0..16: grayscale, upscaled to 96 x 80
    for k in range(4):
        arr = (digits[k] * 15).astype(np.uint8)
        out["digit"].append(Image.fromarray(arr, mode="L").resize((96, 80), Image.NEAREST))
    return out


def make_class_tree(root: Path) -> Path:
    """`root/<class>/<class>_<k>.{jpg,png}`: 3 classes x 4 images (96 x 80; digits grayscale)."""
    for cls, images in _sources().items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(images):
            suffix = "png" if cls == "digit" else "jpg"
            img.save(root / cls / f"img{k}.{suffix}")
    return root


WNIDS = {"china": "n00000001", "flower": "n00000002", "digit": "n00000003"}
NAMES = {"n00000001": "temple, pagoda", "n00000002": "flower, bloom", "n00000003": "digit"}


def make_imagenet(root: Path, val_labels: str = "LOC_val_solution.csv") -> Path:
    """An ImageNet-layout root: train/<wnid>/<wnid>_<k>.JPEG (3 x 3), flat val/ with
    ILSVRC2012_val_%08d.JPEG (one per class), LOC_synset_mapping.txt and the val labels."""
    sources = _sources()
    (root / "val").mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {NAMES[w]}\n" for w in sorted(NAMES))
    )
    val_rows = []
    for cls, images in sources.items():
        wnid = WNIDS[cls]
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(images[:3]):
            img.convert("RGB").save(root / "train" / wnid / f"{wnid}_{k + 10}.JPEG")
        n = len(val_rows) + 1
        images[3].convert("RGB").save(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG")
        val_rows.append((n, wnid))
    if val_labels == "LOC_val_solution.csv":
        lines = ["ImageId,PredictionString"]
        lines += [f"ILSVRC2012_val_{n:08d},{w} 10 20 30 40" for n, w in val_rows]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    else:
        order = sorted(NAMES)
        (root / "val.txt").write_text(
            "".join(f"ILSVRC2012_val_{n:08d}.JPEG {order.index(w)}\n" for n, w in val_rows)
        )
    return root
