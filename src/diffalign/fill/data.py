"""Triptych data for FLUX Fill training (spec F "Data", seed 004 section 1).

A triptych is one image `[visible | target | semantic]`: three square panels side by side
(width = 3 x height), the panel side divisible by 16 (the FLUX VAE factor 8 x 2x2 packing).
`TriptychDataset` reads a folder of them with captions from `captions.jsonl` or `.txt` side files;
bad triptychs are skipped, counted and listed with their reason (`.skipped`, `.summary()`).
`make_triptychs` builds such a folder from `(visible, target, semantic)` image triples.

Input triples for `make_triptychs` (and `diffalign fill make-triptychs --input`):

- a folder holding `NAME_visible.EXT`, `NAME_target.EXT`, `NAME_semantic.EXT` (EXT one of
  png/jpg/jpeg/webp/bmp) and the caption in `NAME.txt`; or
- a jsonl file, one `{"visible": PATH, "target": PATH, "semantic": PATH, "prompt": TEXT,
  "name": NAME}` per line (`name` optional; relative paths are relative to the jsonl's folder).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import TEXT_ENCODING, resolve_inside
from diffalign.engine.reports import pil_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PANEL_MULTIPLE = 16  # VAE factor 8 x FLUX 2x2 packing
# FLUX.1's resolution: its scheduler's shift is calibrated up to 4096 image tokens (1024 x
# 1024 px) and FluxFillPipeline defaults to 1024; a 1024 panel already makes a 1024 x 2048
# diptych (8192 tokens, 2 MP) and a 3072 x 1024 triptych. Larger panels only cost memory.
MAX_PANEL_SIZE = 1024
DEFAULT_CAPTIONS = "captions.jsonl"
ROLES = ("visible", "target", "semantic")


def split_triptych(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[..., H, 3H]` -> the three `[..., H, H]` panels (visible, target, semantic); seed 004 §1."""
    h, w = image.shape[-2], image.shape[-1]
    if w != 3 * h:
        raise DiffalignError(
            f"a triptych is three square panels side by side (width = 3 x height); got {w}x{h}"
        )
    return image[..., :h], image[..., h : 2 * h], image[..., 2 * h :]


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image fully decoded as RGB; an unreadable file is a DiffalignError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DiffalignError(f"{path}: cannot read image ({type(e).__name__})") from None


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, after checking the file's structure."""
    with Image.open(path) as im:
        size = im.size
        im.verify()  # PNG chunk CRCs etc.; cheap, no full decode
    return size


def _read_caption_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding=TEXT_ENCODING).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


@dataclass(frozen=True)
class TriptychRecord:
    """One usable triptych: its file, caption and name."""

    path: Path
    prompt: str
    name: str


class TriptychDataset(torch.utils.data.Dataset):
    """A folder of triptych images `[visible | target | semantic]` with captions.

    Captions come from `captions` (a jsonl in `root` or a path; `{image_field: relative path,
    prompt_field: text}` per line; a path outside `root` is a DiffalignError) or, with
    `captions=None` or when the default `captions.jsonl` is absent, from `NAME.txt` beside each
    image. `panel=None` keeps the native panel size (all
    triptychs must share it; the most common size wins); an int resizes every panel to it.
    A panel (given or native) above `max_panel_size` (default FLUX.1's 1024) is a DiffalignError.

    Bad triptychs (unreadable, wrong aspect, panel not divisible by 16, no caption, another panel
    size) are skipped: `.skipped` lists `{"name", "reason"}`; `.summary()` counts them.
    Items: `dict(visible, target, semantic)` float `[3, P, P]` in [0, 1], `prompt`, `name`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        captions: str | os.PathLike | None = DEFAULT_CAPTIONS,
        image_field: str = "image",
        prompt_field: str = "prompt",
        panel: int | None = None,
        max_panel_size: int = MAX_PANEL_SIZE,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DiffalignError(f"triptych folder not found: {self.root}")
        if panel is not None and (int(panel) < PANEL_MULTIPLE or int(panel) % PANEL_MULTIPLE):
            raise DiffalignError(f"panel size must be a multiple of {PANEL_MULTIPLE}, got {panel}")
        self.max_panel_size = int(max_panel_size)
        check_panel_bound(panel, self.max_panel_size)
        self.panel_arg = None if panel is None else int(panel)
        self.image_field, self.prompt_field = image_field, prompt_field
        self.skipped: list[dict[str, str]] = []
        candidates = self._candidates(captions)
        self.records, self.panel = self._validate(candidates)
        if self.panel is not None and self.panel > self.max_panel_size:
            raise DiffalignError(
                f"the triptychs in {self.root} have {self.panel}px panels, above max_panel_size "
                f"{self.max_panel_size}; set panel to resize them or raise max_panel_size"
            )
        if not self.records:
            reasons = Counter(s["reason"] for s in self.skipped)
            detail = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "no images"
            raise DiffalignError(f"no usable triptychs in {self.root} ({detail})")

    # -- discovery -------------------------------------------------------------------------
    def _skip(self, name: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"name": name, "reason": reason, "detail": detail})

    def _candidates(self, captions) -> list[tuple[Path, str | None, str]]:
        """(image path, caption or None, name) for every listed/found image."""
        caption_path = None
        if captions is not None:
            caption_path = Path(captions)
            if not caption_path.is_absolute():
                caption_path = self.root / caption_path
            if not caption_path.is_file():
                if str(captions) != DEFAULT_CAPTIONS:
                    raise DiffalignError(f"captions file not found: {caption_path}")
                caption_path = None
        self.caption_source = str(caption_path) if caption_path else "txt side files"
        if caption_path is None:
            images = sorted(
                p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            return [(p, _read_caption_file(p.with_suffix(".txt")), p.name) for p in images]
        out = []
        try:
            lines = caption_path.read_text(encoding=TEXT_ENCODING).splitlines()
        except UnicodeDecodeError:
            raise DiffalignError(f"{caption_path}: not UTF-8 text") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{caption_path.name}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                self._skip(where, "corrupt record", "not valid JSON")
                continue
            image = rec.get(self.image_field) if isinstance(rec, dict) else None
            if not isinstance(image, str) or not image.strip():
                self._skip(where, "corrupt record", f"no '{self.image_field}' field")
                continue
            # like every manifest: relative to the folder and inside it (no ../, no absolute path)
            path = resolve_inside(self.root, image, f"{where}: '{self.image_field}'")
            prompt = rec.get(self.prompt_field)
            prompt = prompt.strip() if isinstance(prompt, str) and prompt.strip() else None
            out.append((path, prompt, rec[self.image_field]))
        return out

    def _validate(self, candidates) -> tuple[list[TriptychRecord], int | None]:
        sized = []
        for path, prompt, name in candidates:
            if not path.is_file():
                self._skip(name, "unreadable", "file not found")
                continue
            try:
                w, h = _image_size(path)
            except Exception as e:  # any decoder error: a bad file, not a crash
                self._skip(name, "unreadable", type(e).__name__)
                continue
            if w != 3 * h:
                self._skip(name, "wrong aspect", f"{w}x{h}, expected width = 3 x height")
                continue
            if self.panel_arg is None and h % PANEL_MULTIPLE:
                self._skip(name, f"panel not divisible by {PANEL_MULTIPLE}", f"{h}x{h}")
                continue
            if prompt is None:
                self._skip(name, "no caption")
                continue
            sized.append((h, TriptychRecord(path, prompt, name)))
        if self.panel_arg is not None:
            return [r for _, r in sized], self.panel_arg
        if not sized:
            return [], None
        common = Counter(h for h, _ in sized).most_common(1)[0][0]
        records = []
        for h, rec in sized:
            if h != common:
                self._skip(rec.name, "other panel size", f"{h}, the dataset's is {common}")
            else:
                records.append(rec)
        return records, common

    # -- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image = load_rgb(rec.path)
        w, h = image.size
        panels = [image.crop((i * h, 0, (i + 1) * h, h)) for i in range(3)]
        if self.panel != h:
            panels = [p.resize((self.panel, self.panel), Image.Resampling.BICUBIC) for p in panels]
        visible, target, semantic = (pil_to_tensor(p) for p in panels)
        return {
            "visible": visible,
            "target": target,
            "semantic": semantic,
            "prompt": rec.prompt,
            "name": rec.name,
        }

    def summary(self, max_listed: int = 50) -> dict[str, Any]:
        """Counts for summary.json: used, skipped, reasons, and the first skipped names."""
        reasons = Counter(s["reason"] for s in self.skipped)
        return {
            "root": str(self.root),
            "captions": self.caption_source,
            "panel": self.panel,
            "used": len(self.records),
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(reasons),
            "skipped_items": self.skipped[:max_listed],
        }

    def report(self, max_lines: int = 20) -> str:
        """Human-readable lines: one per skipped triptych (capped) and a total."""
        lines = [
            f"skipped {s['name']}: {s['reason']}" + (f" ({s['detail']})" if s["detail"] else "")
            for s in self.skipped[:max_lines]
        ]
        if len(self.skipped) > max_lines:
            lines.append(f"... and {len(self.skipped) - max_lines} more")
        lines.append(
            f"{len(self.records)} triptychs of {self.panel}px panels, {len(self.skipped)} skipped"
        )
        return "\n".join(lines)


def collate_triptychs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: panels stacked to `[B, 3, P, P]`, prompts and names as lists."""
    return {
        **{k: torch.stack([it[k] for it in items]) for k in ROLES},
        "prompt": [it["prompt"] for it in items],
        "name": [it["name"] for it in items],
    }


# ---------------------------------------------------------------------------------------------
# Building triptychs from image triples.


@dataclass(frozen=True)
class PanelSet:
    """One example given as separate images: `paths[role]`, a caption (maybe None) and a name."""

    name: str
    paths: dict[str, Path]
    prompt: str | None


_ROLE_FILE = re.compile(r"^(?P<name>.+)_(?P<role>[a-z]+)$")


def find_panel_sets(
    source: str | os.PathLike, roles: Sequence[str] = ROLES, prompt_field: str = "prompt"
) -> list[PanelSet]:
    """Panel sets from a folder (`NAME_<role>.EXT` + `NAME.txt`) or a jsonl listing them.

    Every name must have all `roles`; a missing one is a DiffalignError naming it. Prompts may be
    None here (callers decide whether a caption is required).
    """
    source = Path(source)
    if source.is_dir():
        found: dict[str, dict[str, Path]] = {}
        for p in sorted(source.iterdir()):
            if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            m = _ROLE_FILE.match(p.stem)
            if not m or m["role"] not in roles:
                continue
            slot = found.setdefault(m["name"], {})
            if m["role"] in slot:
                raise DiffalignError(
                    f"{source}: two {m['role']} images for '{m['name']}': "
                    f"{slot[m['role']].name} and {p.name}"
                )
            slot[m["role"]] = p
        if not found:
            raise DiffalignError(
                f"{source}: no NAME_{'/'.join(roles)}.EXT images found "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        sets = []
        for name, paths in sorted(found.items()):
            missing = [r for r in roles if r not in paths]
            if missing:
                raise DiffalignError(f"{source}: '{name}' has no {' / '.join(missing)} image")
            sets.append(PanelSet(name, paths, _read_caption_file(source / f"{name}.txt")))
        return sets
    if source.is_file():
        from diffalign.engine.io import iter_jsonl

        sets, names = [], set()
        for lineno, rec in iter_jsonl(source):
            where = f"{source}:{lineno}"
            if not isinstance(rec, dict):
                raise DiffalignError(f"{where}: expected a JSON object")
            missing = [r for r in roles if not isinstance(rec.get(r), str) or not rec[r]]
            if missing:
                raise DiffalignError(f"{where}: missing {', '.join(missing)} path")
            paths = {}
            for r in roles:
                p = Path(rec[r])
                paths[r] = p if p.is_absolute() else source.parent / p
            name = str(rec.get("name") or Path(rec[roles[0]]).stem.removesuffix(f"_{roles[0]}"))
            if not re.fullmatch(r"[\w.-]+", name):
                raise DiffalignError(f"{where}: name {name!r} must be letters, digits, . _ -")
            if name in names:
                raise DiffalignError(f"{where}: duplicate name '{name}'")
            names.add(name)
            prompt = rec.get(prompt_field)
            prompt = prompt.strip() if isinstance(prompt, str) and prompt.strip() else None
            sets.append(PanelSet(name, paths, prompt))
        if not sets:
            raise DiffalignError(f"{source}: no records")
        return sets
    raise DiffalignError(f"input not found: {source}")


def _square(image: Image.Image) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def check_panel_bound(panel: int | None, max_panel_size: int) -> None:
    """The training bound (config keys `panel`, `max_panel_size`): `max_panel_size` a positive
    multiple of 16, `panel` (if any) not above it."""
    _check_panel_bound(panel, max_panel_size, ("panel", "max_panel_size"), "train larger panels")


def check_max_panel_size(panel_size: int | None, max_panel_size: int) -> None:
    """`max_panel_size` must be a positive multiple of 16 and `panel_size` (if any) within it."""
    names = ("--panel-size", "--max-panel-size")
    _check_panel_bound(panel_size, max_panel_size, names, "allow it")


def _check_panel_bound(panel: int | None, bound: int, names: tuple[str, str], aim: str) -> None:
    """One rule for both spellings: `names` = (the panel's, the bound's) option names."""
    panel_name, bound_name = names
    if bound < PANEL_MULTIPLE or bound % PANEL_MULTIPLE:
        raise DiffalignError(
            f"{bound_name} must be a positive multiple of {PANEL_MULTIPLE}, got {bound}"
        )
    if panel is not None and panel > bound:
        raise DiffalignError(
            f"{panel_name} {panel} is above {bound_name} {bound} (default {MAX_PANEL_SIZE}, "
            f"FLUX.1's resolution); raise {bound_name} to {aim}"
        )


def check_panel_sizes(
    sizes: Sequence[tuple[int, int]],
    panel_size: int | None,
    crop: bool = False,
    max_panel_size: int = MAX_PANEL_SIZE,
) -> int:
    """The output panel side for three input `(width, height)` sizes, or a DiffalignError.

    Unequal sizes, non-square panels without `crop`, a `panel_size` above `max_panel_size`, or
    (with `panel_size=None`, keeping the native size) a side not divisible by 16 are errors. A
    native side above `max_panel_size` gives `max_panel_size` (the panels are resized down).
    """
    check_max_panel_size(panel_size, max_panel_size)
    if len(set(sizes)) != 1:
        desc = ", ".join(f"{r} {w}x{h}" for r, (w, h) in zip(ROLES, sizes))
        raise DiffalignError(f"panels of unequal size ({desc})")
    w, h = sizes[0]
    if w != h:
        if not crop:
            raise DiffalignError(f"panels are {w}x{h}, not square (pass --center-crop to crop)")
        w = min(w, h)
    if panel_size is not None:
        return panel_size
    if w > max_panel_size:
        return max_panel_size
    if w % PANEL_MULTIPLE:
        raise DiffalignError(
            f"panel size {w} is not divisible by {PANEL_MULTIPLE} (pass --panel-size to resize)"
        )
    return w


def build_triptych(
    images: Sequence[Image.Image],
    panel_size: int | None,
    crop: bool = False,
    max_panel_size: int = MAX_PANEL_SIZE,
) -> Image.Image:
    """Three equally sized panels -> one `[visible | target | semantic]` image of
    `panel_size`-sided panels (`None`: the native size, at most `max_panel_size`); checks as
    `check_panel_sizes`."""
    side = check_panel_sizes([im.size for im in images], panel_size, crop, max_panel_size)
    out = Image.new("RGB", (3 * side, side))
    for i, im in enumerate(images):
        im = _square(im.convert("RGB"))
        if im.size != (side, side):
            im = im.resize((side, side), Image.Resampling.BICUBIC)
        out.paste(im, (i * side, 0))
    return out


def make_triptychs(
    source: str | os.PathLike,
    out: str | os.PathLike,
    panel_size: int | None = 512,
    *,
    crop: bool = False,
    default_prompt: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    prompt_field: str = "prompt",
    max_panel_size: int = MAX_PANEL_SIZE,
) -> dict[str, Any]:
    """Write `out/images/NAME.png` triptychs, `out/captions.jsonl` and `out/summary.json`.

    Everything is checked before anything is written unless `skip_bad` (then bad triples are
    reported and counted in the summary). The triptychs are made in a staging folder and moved
    into `images/` only once every one is made (a triple that fails to decode leaves the earlier
    output as it was); each file is written atomically; the output folder is locked for the
    run; an existing `captions.jsonl` is kept unless `overwrite`. A `panel_size`
    above `max_panel_size` is an error; with `panel_size=None` (native size) larger panels are
    resized down to `max_panel_size` and counted (`summary["resized_down"]`).
    """
    import tempfile

    from diffalign.engine.io import atomic_path, clean_stale_temporaries, output_lock, write_json
    from diffalign.engine.progress import progress
    from diffalign.engine.reports import save_image

    if panel_size is not None and (panel_size < PANEL_MULTIPLE or panel_size % PANEL_MULTIPLE):
        raise DiffalignError(
            f"--panel-size must be a positive multiple of {PANEL_MULTIPLE}, got {panel_size}"
        )
    check_max_panel_size(panel_size, max_panel_size)
    out = Path(out)
    sets = find_panel_sets(source, ROLES, prompt_field)
    with output_lock(out):
        captions_path = out / DEFAULT_CAPTIONS
        if captions_path.exists() and not overwrite:
            raise DiffalignError(
                f"{captions_path} exists; pass --overwrite to rebuild the triptychs in {out}"
            )
        # Check every triple first (headers only), so a bad input fails before any write.
        good, skipped, resized_down = [], [], 0  # resized_down: native panels above the max
        for s in sets:
            try:
                prompt = s.prompt or default_prompt
                if prompt is None:
                    raise DiffalignError(f"'{s.name}' has no caption (NAME.txt or prompt field)")
                sizes = []
                for role in ROLES:
                    path = s.paths[role]
                    if not path.is_file():
                        raise DiffalignError(f"'{s.name}': {role} image not found: {path}")
                    try:
                        sizes.append(_image_size(path))
                    except Exception as e:
                        raise DiffalignError(
                            f"'{s.name}': cannot read {role} image {path} ({type(e).__name__})"
                        ) from None
                side = check_panel_sizes(sizes, panel_size, crop, max_panel_size)
            except DiffalignError as e:
                if not skip_bad:
                    raise
                skipped.append({"name": s.name, "reason": str(e)})
                continue
            good.append((s, prompt, panel_size is None and min(sizes[0]) > side))
        if not good:
            raise DiffalignError(f"no usable triples in {source} ({len(skipped)} bad)")
        clean_stale_temporaries(out)  # a killed run's staging folder
        records = []
        with tempfile.TemporaryDirectory(prefix=".images.", suffix=".tmp", dir=out) as stage:
            for s, prompt, too_big in progress(good, desc="triptychs"):
                try:
                    images = [load_rgb(s.paths[r]) for r in ROLES]
                    image = build_triptych(images, panel_size, crop, max_panel_size)
                except DiffalignError as e:
                    if not skip_bad:
                        raise
                    skipped.append({"name": s.name, "reason": str(e)})
                    continue
                save_image(Path(stage) / f"{s.name}.png", image)
                resized_down += too_big
                records.append({"image": f"images/{s.name}.png", "prompt": prompt, "name": s.name})
            (out / "images").mkdir(parents=True, exist_ok=True)
            for r in records:
                os.replace(Path(stage) / f"{r['name']}.png", out / r["image"])
        with atomic_path(captions_path) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        summary = {
            "input": str(source),
            "out": str(out),
            "panel_size": panel_size if panel_size is not None else "native",
            "max_panel_size": max_panel_size,
            "resized_down": resized_down,
            "written": len(records),
            "skipped": len(skipped),
            "skipped_items": skipped,
            "captions": DEFAULT_CAPTIONS,
        }
        write_json(out / "summary.json", summary)
    return summary
