"""The text-to-image pipelines the T verbs run, per model family (spec T; issue 15).

What differs between SD3/SD3.5, FLUX.1 and Qwen-Image outside the transformer blocks
(those are in `adapters`): which pipeline class loads the folder, the sampling defaults of each
model card, and the pipeline-call arguments (SD3: classifier-free guidance `guidance_scale`;
FLUX.1: distilled guidance `guidance_scale` plus optional true CFG; Qwen-Image: true CFG).

Model cards: SD3 28 steps, CFG 7, 256 T5 tokens (seed 002); FLUX.1-dev 28 steps (28-50),
guidance 3.5, 512 tokens; FLUX.1-schnell 4 steps, guidance 0, 256 tokens; Qwen-Image 50 steps,
true CFG 4.0, 512 tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError

FAMILIES = ("sd3", "flux", "qwen-image")


@dataclass(frozen=True)
class SamplingDefaults:
    """A model card's sampling settings. `guidance` is FLUX's distilled guidance (None: none)."""

    steps: int
    cfg: float
    guidance: float | None
    max_sequence_length: int


# variant -> defaults; a variant is a family, or a FLUX.1 release
DEFAULTS: dict[str, SamplingDefaults] = {
    "sd3": SamplingDefaults(28, 7.0, None, 256),
    "flux-dev": SamplingDefaults(28, 1.0, 3.5, 512),
    "flux-schnell": SamplingDefaults(4, 1.0, 0.0, 256),
    "qwen-image": SamplingDefaults(50, 4.0, None, 512),
}
_PIPELINE_FAMILY = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwen-image",
}


def family_of_variant(variant: str) -> str:
    return "flux" if variant.startswith("flux") else variant


def loaded_variant(family: str, transformer) -> str:
    """The `DEFAULTS` key of a loaded transformer of `family` (FLUX.1-dev has the guidance
    embedder, FLUX.1-schnell not); what `model_variant` reads from the files before loading."""
    if family != "flux":
        return family
    return "flux-dev" if transformer.config.guidance_embeds else "flux-schnell"


def model_variant(model: str, single_file_config: str | None = None) -> str:
    """`sd3`, `flux-dev`, `flux-schnell` or `qwen-image` for a `--model` value, read without
    loading weights: a preset's family, a folder's `model_index.json` (FLUX: dev when its
    transformer has the guidance embedder), a single file's config (`single_file_config`, else
    the release diffusers recognises in its tensor names), or a Hub id's name. Anything else is
    SD3 (unknown files and ids), as before; another supported pipeline is one clear error."""
    from diffalign.engine.loading import PRESETS, SINGLE_FILE_SUFFIXES, single_file_preset

    text = str(model).strip()
    path = Path(text).expanduser()
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file():
        if single_file_config:
            return model_variant(single_file_config)
        found = single_file_preset(text)
        if found is not None:
            return model_variant(found.name)
    preset = PRESETS.get(text.lower())
    if preset is not None:
        if preset.family not in FAMILIES:
            raise DiffalignError(
                f"--model {text} is a {preset.family} model; the text-stream verbs need an "
                f"SD3/SD3.5, FLUX.1 or Qwen-Image model"
            )
        if preset.family == "flux":
            return "flux-schnell" if "schnell" in preset.repo_id.lower() else "flux-dev"
        return preset.family
    folder = Path(text).expanduser()
    index_file = folder / "model_index.json"
    if folder.is_dir() and index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return "sd3"  # the loader reports the broken file
        family = _PIPELINE_FAMILY.get(str(index.get("_class_name")))
        if family == "flux":
            return "flux-dev" if _flux_guided(folder) else "flux-schnell"
        return family or "sd3"
    lowered = text.lower()
    if "qwen-image" in lowered:
        return "qwen-image"
    if "flux.1" in lowered or "flux1" in lowered:
        return "flux-schnell" if "schnell" in lowered else "flux-dev"
    return "sd3"


def config_block_count(model: str) -> int | None:
    """Blocks of a local pipeline folder's transformer in execution order (FLUX.1: double +
    single), read from `transformer/config.json`; None when unknown (presets, Hub ids)."""
    path = Path(str(model)).expanduser() / "transformer" / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return int(config.get("num_layers", 0)) + int(config.get("num_single_layers", 0)) or None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
        return None


def _flux_guided(folder: Path) -> bool:
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True
    return bool(config.get("guidance_embeds", True))


def load_text_to_image(
    model: str,
    variant: str,
    *,
    dtype: Any = "float32",
    device: str | None = "cpu",
    vae: str | None = None,
    single_file_config: str | None = None,
):
    """Load the pipeline of `variant` for `model` through the engine's loader (spec E)."""
    from diffalign.engine.loading import load_pipeline, load_sd3_pipeline, load_vae

    family = family_of_variant(variant)
    if family == "sd3":
        return load_sd3_pipeline(
            model, dtype=dtype, device=device, vae=vae, single_file_config=single_file_config
        )
    if family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel

        cls, expect = FluxPipeline, {"transformer": FluxTransformer2DModel}
    else:
        from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

        cls, expect = QwenImagePipeline, {"transformer": QwenImageTransformer2DModel}
    components: dict[str, Any] = {}
    if vae is not None:
        if family != "flux":
            raise DiffalignError(f"--vae is supported for SD3 and FLUX.1 models, not {family}")
        config = single_file_config or model  # a single-file model: its release's
        components["vae"] = load_vae(vae, config=config, dtype=dtype, family=None)
    return load_pipeline(
        model,
        cls,
        family,
        dtype=dtype,
        device=device,
        single_file_config=single_file_config,
        expect=expect,
        **components,
    )


def pipeline_kwargs(
    family: str,
    *,
    steps: int,
    cfg: float,
    guidance: float | None,
    negative_prompt: str | None,
    max_sequence_length: int,
) -> dict[str, Any]:
    """The sampling arguments of one pipeline call for `family` (prompt, size, generator and
    image count are added by the caller)."""
    common = {"num_inference_steps": steps, "max_sequence_length": max_sequence_length}
    if family == "sd3":
        return {**common, "guidance_scale": cfg, "negative_prompt": negative_prompt}
    out = {**common, "true_cfg_scale": cfg}
    if family == "flux":
        out["guidance_scale"] = 0.0 if guidance is None else guidance
        if cfg > 1.0:  # FLUX's true CFG runs only with a negative prompt
            out["negative_prompt"] = negative_prompt or ""
        return out
    # Qwen-Image: true CFG needs a negative prompt; its model card uses " "
    out["negative_prompt"] = negative_prompt if negative_prompt is not None else " "
    return out


def check_schedule(pipe, steps: int) -> None:
    """Refuse step counts the pipeline's scheduler cannot make: with `shift_terminal` (Qwen-Image)
    one step gives a NaN sigma (diffusers stretches the schedule by `1 - sigma_last` = 0)."""
    config = getattr(getattr(pipe, "scheduler", None), "config", {}) or {}
    if int(steps) < 2 and config.get("shift_terminal"):
        raise DiffalignError(
            f"--steps {steps}: this model's scheduler (shift_terminal "
            f"{config.get('shift_terminal')}) needs at least 2 steps (1 step gives NaN images)"
        )
