"""Published model releases and the marks that identify a folder of one (issue 13 item 7).

A folder is recognised only by what the release itself ships or what we recorded when fetching
it, never by its pipeline type (an SDXL folder is not SDXL-Turbo because it is SDXL):

- a Hub id (``stabilityai/sdxl-turbo``), also as a preset or inside a Hugging Face cache path
  (``.../models--stabilityai--sdxl-turbo/snapshots/<rev>``);
- the ``diffalign download`` marker of ``models/<asset>/`` (the Hub repos it was fetched from);
- the release's model card: the first ``# `` heading of its ``README.md`` (after the YAML front
  matter), e.g. ``# SDXL-Turbo Model Card``.

`make-tiny` writes the card of the release each tiny kind stands for (:func:`write_model_card`),
so tiny folders go through the same recognition as real ones. A new release registers its marks
here (:func:`register_release`); capabilities map releases to what they run them as.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RELEASES",
    "Release",
    "identify_release",
    "model_card_title",
    "pipeline_class_of",
    "register_release",
    "write_model_card",
]


@dataclass(frozen=True)
class Release:
    """A published model: its Hub ids (the first is the current one), its model card's title,
    the diffusers pipeline class of its ``model_index.json`` (None: not a pipeline, e.g. a
    folder of LoRA files) and the card's front matter lines (written by `make-tiny`)."""

    name: str
    hub_ids: tuple[str, ...]
    card_title: str
    pipeline_class: str | None
    front_matter: tuple[str, ...] = ()

    @property
    def hub_id(self) -> str:
        return self.hub_ids[0]


RELEASES: dict[str, Release] = {}  # current Hub id -> release


def register_release(release: Release) -> Release:
    """Add a release to the registry (its Hub ids and card title must be its own)."""
    RELEASES[release.hub_id] = release
    return release


SDXL_TURBO = register_release(
    Release(
        "SDXL-Turbo",
        ("stabilityai/sdxl-turbo",),
        "SDXL-Turbo Model Card",
        "StableDiffusionXLPipeline",
        (
            "pipeline_tag: text-to-image",
            "inference: false",
            "license: other",
            "license_name: sai-nc-community",
            "license_link: https://huggingface.co/stabilityai/sdxl-turbo/blob/main/LICENSE.md",
        ),
    )
)
SD_TURBO = register_release(
    Release(
        "SD-Turbo",
        ("stabilityai/sd-turbo",),
        "SD-Turbo Model Card",
        "StableDiffusionPipeline",
        ("pipeline_tag: text-to-image", "inference: false"),
    )
)
SD15 = register_release(
    Release(
        "Stable Diffusion v1-5",
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
        "Stable Diffusion v1-5 Model Card",
        "StableDiffusionPipeline",
        ("license: creativeml-openrail-m", "tags:", "- stable-diffusion", "- text-to-image"),
    )
)
SDXL_BASE = register_release(
    Release(
        "SD-XL 1.0-base",
        ("stabilityai/stable-diffusion-xl-base-1.0",),
        "SD-XL 1.0-base Model Card",
        "StableDiffusionXLPipeline",
        ("license: openrail++", "tags:", "- text-to-image", "- stable-diffusion"),
    )
)
HYPER_SD = register_release(
    Release(
        "Hyper-SD",
        ("ByteDance/Hyper-SD",),
        "Hyper-SD",
        None,
        ("library_name: diffusers", "inference: false", "tags:", "- lora", "- text-to-image"),
    )
)


# the few-step transformer generators' releases (issue 17); titles as `make-tiny` writes them
FLUX1_SCHNELL = register_release(
    Release(
        "FLUX.1 [schnell]",
        ("black-forest-labs/FLUX.1-schnell",),
        "FLUX.1 [schnell]",
        "FluxPipeline",
    )
)
# not a few-step model: registered so that a FLUX.1-dev folder is told from FLUX.1-schnell
FLUX1_DEV = register_release(
    Release(
        "FLUX.1 [dev]",
        ("black-forest-labs/FLUX.1-dev",),
        "FLUX.1 [dev]",
        "FluxPipeline",
    )
)
SD35_LARGE_TURBO = register_release(
    Release(
        "Stable Diffusion 3.5 Large Turbo",
        ("stabilityai/stable-diffusion-3.5-large-turbo",),
        "Stable Diffusion 3.5 Large Turbo",
        "StableDiffusion3Pipeline",
    )
)
# not few-step models: registered so that their folders are not run with the 4-step Turbo recipe
SD3_MEDIUM = register_release(
    Release(
        "Stable Diffusion 3 Medium",
        (
            "stabilityai/stable-diffusion-3-medium-diffusers",
            "stabilityai/stable-diffusion-3-medium",
        ),
        "Stable Diffusion 3 Medium",
        "StableDiffusion3Pipeline",
    )
)
SD35_LARGE = register_release(
    Release(
        "Stable Diffusion 3.5 Large",
        ("stabilityai/stable-diffusion-3.5-large",),
        "Stable Diffusion 3.5 Large",
        "StableDiffusion3Pipeline",
    )
)
SD35_MEDIUM = register_release(
    Release(
        "Stable Diffusion 3.5 Medium",
        ("stabilityai/stable-diffusion-3.5-medium",),
        "Stable Diffusion 3.5 Medium",
        "StableDiffusion3Pipeline",
    )
)
SANA_SPRINT = register_release(
    Release(
        "SANA-Sprint 1.6B 1024px",
        (
            "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
            "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers",
        ),
        "SANA-Sprint 1.6B 1024px",
        "SanaSprintPipeline",
    )
)
PIXART_DMD = register_release(
    Release(
        "PixArt-alpha DMD 512px",
        ("PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",),
        "PixArt-Alpha-DMD-XL-2-512x512",
        "PixArtAlphaPipeline",
    )
)


def release_by_hub_id(hub_id: str) -> Release | None:
    text = str(hub_id).strip().lower()
    for release in RELEASES.values():
        if text in (h.lower() for h in release.hub_ids):
            return release
    return None


def model_card_title(folder: str | os.PathLike) -> str | None:
    """The first ``# `` heading of ``folder/README.md`` after its YAML front matter, else None."""
    try:
        text = (Path(folder) / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    lines = text[:65536].splitlines()
    start = 0
    if lines and lines[0].strip() == "---":  # YAML front matter
        ends = [i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"]
        start = ends[0] + 1 if ends else len(lines)
    for line in lines[start:]:
        if line.startswith("# "):
            return line[2:].strip()
    return None


def write_model_card(folder: str | os.PathLike, release: Release, note: str) -> None:
    """Write ``README.md`` with the release's front matter and title (`make-tiny`: the folder
    then identifies itself as the release does), and ``note`` as its body."""
    head = ["---", *release.front_matter, "---", ""] if release.front_matter else []
    text = "\n".join([*head, f"# {release.card_title}", "", note, ""])
    (Path(folder) / "README.md").write_text(text, encoding="utf-8")


_CACHE_DIR = re.compile(r"^models--([^/]+?)--(.+)$")


def _hub_id_in_cache_path(folder: Path) -> str | None:
    """``org/name`` of a Hugging Face cache snapshot path (``models--org--name``)."""
    for part in reversed(folder.absolute().parts):
        m = _CACHE_DIR.match(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def _download_marker_repos(folder: Path) -> list[str]:
    from diffalign.engine.download import _read_marker

    marker = _read_marker(folder)  # None (none or unreadable), {} (damaged) or the record
    repos = (marker.get("repos") or []) if isinstance(marker, dict) else []
    return [str(r) for r in repos] if isinstance(repos, list) else []


def identify_release(model: str) -> tuple[Release, str] | None:
    """The release ``model`` (a Hub id, preset or local folder) is, with the mark that says so
    (module doc), else None."""
    from diffalign.engine.loading import PRESETS, resolve_model

    resolved = resolve_model(model)
    if resolved.preset is not None:
        release = release_by_hub_id(PRESETS[resolved.preset].repo_id)
        if release is not None:
            return release, f"the preset {resolved.preset}"
    if resolved.kind == "hub":
        release = release_by_hub_id(resolved.source)
        return (release, "its Hub id") if release is not None else None
    if resolved.kind != "folder":
        return None
    folder = Path(resolved.source)
    for repo in _download_marker_repos(folder):
        release = release_by_hub_id(repo)
        if release is not None:
            return release, "its `diffalign download` record"
    cached = _hub_id_in_cache_path(folder)
    release = release_by_hub_id(cached) if cached is not None else None
    if release is not None:
        return release, "its Hugging Face cache path"
    title = model_card_title(folder)
    if title:
        for release in RELEASES.values():
            if title.lower() == release.card_title.lower():
                return release, "its model card (README.md)"
    return None


def pipeline_class_of(model: str) -> str | None:
    """``_class_name`` of the pipeline ``model`` names (a folder's ``model_index.json``, or a Hub
    model's cached one), else None (not known without downloading)."""
    from diffalign.engine.loading import resolve_model

    resolved = resolve_model(model)
    index: Path | None = None
    if resolved.kind == "folder":
        index = Path(resolved.source) / "model_index.json"
    elif resolved.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(resolved.source, "model_index.json")
        except (ImportError, ValueError):
            found = None
        index = Path(found) if isinstance(found, str) else None
    if index is None:
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return str(name) if name else None
