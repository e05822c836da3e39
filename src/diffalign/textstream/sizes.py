"""What image sizes a text-to-image transformer makes, read from its config files before it
loads (`model_image_size`) or from a loaded pipeline (`pipeline_image_size`), and the one rule
that fits a requested size to them (`fit_image_size`): shared by generation, calibration and
the text cache, so none of them imports another for it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffalign.engine.errors import DiffalignError


@dataclass(frozen=True)
class ImageSize:
    """What sizes a text-to-image transformer makes, read from its config files: its own
    sample size (`default`, the pipeline's default_sample_size x the VAE factor), the multiple
    a side must be and, for SD3's cropped position embedding, the largest side (else None)."""

    default: int = 1024
    multiple: int = 16
    largest: int | None = None


def _component_config(model: str, single_file_config: str | None, name: str) -> dict | None:
    """`<name>/config.json` of a model folder, a cached Hub snapshot or --single-file-config."""
    from diffalign.engine.loading import resolve_model

    try:
        src = resolve_model(model)
    except DiffalignError:
        return None
    rel = f"{name}/config.json"
    path: Path | None = None
    if src.kind == "folder":
        path = Path(src.source) / rel
    elif src.kind == "single_file" and single_file_config:
        path = Path(single_file_config) / rel
    elif src.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(src.source, rel)
        except Exception:  # noqa: BLE001 - an unreadable cache: the config is unknown
            hit = None
        path = Path(hit) if isinstance(hit, str) else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_image_size(model: str, single_file_config: str | None = None) -> ImageSize:
    """The `ImageSize` of `model` without loading it (SD3/SD3.5's 1024 when its config files
    cannot be read before the download)."""
    tcfg = _component_config(model, single_file_config, "transformer") or {}
    vcfg = _component_config(model, single_file_config, "vae") or {}
    if isinstance(vcfg.get("temperal_downsample"), list):  # Qwen-Image's VAE
        vsf = 2 ** len(vcfg["temperal_downsample"])
    else:
        vsf = 2 ** (len(vcfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    patch = max(int(tcfg.get("patch_size") or 1), 2)  # FLUX packs 2x2 latent patches
    sample = tcfg.get("sample_size")
    default = int(sample) * vsf if isinstance(sample, int) else 128 * vsf
    max_embed = tcfg.get("pos_embed_max_size")
    largest = int(max_embed) * patch * vsf if isinstance(max_embed, int) else None
    return ImageSize(default, vsf * patch, largest)


def pipeline_image_size(pipe) -> ImageSize:
    """The `ImageSize` of a loaded pipeline (what `model_image_size` reads from the files)."""
    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    config = pipe.transformer.config
    patch = max(int(getattr(config, "patch_size", 1) or 1), 2)  # FLUX packs 2x2 latent patches
    max_embed = getattr(config, "pos_embed_max_size", None)
    largest = int(max_embed) * patch * vsf if isinstance(max_embed, int) else None
    return ImageSize(int(getattr(pipe, "default_sample_size", 128)) * vsf, vsf * patch, largest)


def fit_image_size(
    size: ImageSize,
    height: int | None,
    width: int | None,
    model: str,
    *,
    option: str | None = None,
) -> tuple[int, int]:
    """(height, width): the given ones, or the model's own sample size where not given; a size
    the model cannot make is a one-line error (before anything is loaded or written). `option`
    names a square-size option (e.g. `--resolution`) in the errors instead of --height/--width."""
    h, w = height or size.default, width or size.default
    names = (option, option) if option else ("--height", "--width")
    for name, value in zip(names, (h, w)):
        if size.largest is not None and value > size.largest:
            raise DiffalignError(
                f"{name} {value} is more than {model} can make: at most {size.largest} "
                f"px (its transformer's pos_embed_max_size); leave "
                f"{option or '--height/--width'} out for its own size, {size.default} px"
            )
        if value % size.multiple:
            raise DiffalignError(
                f"{name} {value} must be a multiple of {size.multiple} for {model}"
            )
    return int(h), int(w)
