"""Image-caption pairs (spec E: Data): COCO captions json, `pairs.jsonl` + images, and image
folders with a `.txt` caption beside each image; plus the resize / centre-crop transform.

`load_image_captions(spec)` returns `ImageCaption`s in a fixed order (the source's order; a
folder's images sorted by relative path). COCO and jsonl go through `engine.prompts.load_prompts`
(so `coco` under `--datadir`, `caption_field` / `image_field` work as there); every record must
name an image that exists. A folder's image without a caption file is skipped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import TEXT_ENCODING

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageCaption:
    """One pair: a unique id, the image file and its caption."""

    id: str
    image: Path
    caption: str


@dataclass
class PairSet:
    """The pairs of a source and what was skipped (folder images without a caption)."""

    pairs: list[ImageCaption]
    skipped_no_caption: int = 0


def center_crop_resize(img, resolution: int):
    """RGB, shorter side to `resolution` (bicubic), centre crop `resolution`^2 (seed 003 §3.1)."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image_captions(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    datadir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    caption_field: str = "prompt",
    image_field: str = "image",
    split: str = "val2017",
) -> PairSet:
    """Pairs of one or more sources (comma-separated or a list), concatenated in order."""
    from diffalign.engine.prompts import (
        DATASET_NAMES,
        _split_spec,
        coco_captions_file,
        load_prompts,
    )

    items = _split_spec(spec)
    if not items:
        raise DiffalignError("no image-caption dataset given")
    if limit is not None and limit < 1:
        raise DiffalignError(f"limit must be at least 1 (got {limit})")
    out = PairSet([])
    for item in items:
        path = Path(item).expanduser()
        # a COCO root (annotations/ + val2017/, FORMATS.md) holds images too: its captions json
        coco_root = path.is_dir() and coco_captions_file(path, split) is not None
        # a name (coco, ...) is looked up under datadir, as load_prompts does, even where the
        # working directory holds a folder of that name
        named = item in DATASET_NAMES
        if not named and path.is_dir() and not coco_root and _holds_images(path):
            part = _load_folder(path)
            out.skipped_no_caption += part.skipped_no_caption
            pairs = part.pairs
        else:
            records = load_prompts(
                item, datadir, prompt_field=caption_field, image_field=image_field, split=split
            )
            pairs = []
            for r in records:
                if not r.image:
                    raise DiffalignError(
                        f"{item}: record '{r.id}' has no image (an image-caption dataset needs "
                        f"'{image_field}' in each jsonl line, or a COCO images folder)"
                    )
                if not Path(r.image).is_file():
                    raise DiffalignError(f"{item}: image of record '{r.id}' not found: {r.image}")
                pairs.append(ImageCaption(id=str(r.id), image=Path(r.image), caption=r.prompt))
        if not pairs:
            raise DiffalignError(f"image-caption dataset '{item}' has no pair")
        out.pairs.extend(pairs)
        if limit is not None and len(out.pairs) >= limit:
            break
    if limit is not None:
        out.pairs = out.pairs[:limit]
    seen: set[str] = set()
    for p in out.pairs:
        if p.id in seen:
            raise DiffalignError(f"two pairs share the id '{p.id}' (ids must be unique)")
        seen.add(p.id)
    return out


def _holds_images(folder: Path) -> bool:
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def _load_folder(folder: Path) -> PairSet:
    """Every image under `folder` (sorted relative paths) with the caption in `<stem>.txt`."""
    files = sorted(
        Path(root) / f
        for root, _, names in os.walk(folder)
        for f in names
        if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
    )
    pairs, skipped = [], 0
    for f in files:
        txt = f.with_suffix(".txt")
        caption = None
        if txt.is_file():
            try:
                caption = txt.read_text(encoding=TEXT_ENCODING).strip() or None
            except UnicodeDecodeError:
                raise DiffalignError(f"{txt}: not UTF-8 text") from None
        if caption is None:
            skipped += 1
            continue
        rel = f.relative_to(folder).with_suffix("").as_posix()
        pairs.append(ImageCaption(id=rel, image=f, caption=caption))
    return PairSet(pairs, skipped)
