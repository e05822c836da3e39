"""Which one-step recipe a `--model` runs as: the one place every noise verb asks (issue 13
items 6-7).

A generator kind (:class:`GeneratorSpec`) is a recipe: pipeline class, scheduler, timestep, image
size and any extra weights (the Hyper-SD LoRA / U-Net). :func:`generator_recipe` finds the
recipe of a `--model`:

1. a kind's name (``--model hyper-sdxl``): that kind on its default base model (a local path
   of that name is a folder: it loads, so its own recipe counts);
2. a recipe we recorded: a `noise sft` export (a full pipeline or a LoRA) carries
   ``diffalign_generator.json`` (:data:`RECIPE_FILE`) with its kind, scheduler, timesteps,
   whether the Hyper-SD weights are already in it and the base model a LoRA applies to; loading
   it never applies those weights again;
3. a release that runs one-step as published (SDXL-Turbo, SD-Turbo), recognised by its own marks
   (:func:`diffalign.engine.releases.identify_release`: Hub id, download record, model card);
4. else ``--generator`` must say it: a base release such as SD 1.5 is not a one-step model.

``--generator`` that contradicts a recorded recipe, or names a pipeline class the folder does not
hold, is one error line. A new kind registers itself with :func:`register_generator` (its release,
if it has one, with :func:`diffalign.engine.releases.register_release`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError

__all__ = [
    "GENERATORS",
    "RECIPE_FILE",
    "GeneratorSpec",
    "Recipe",
    "generator_recipe",
    "read_recorded_recipe",
    "register_generator",
]

RECIPE_FILE = "diffalign_generator.json"  # written into every `noise sft` export
LEGACY_RECIPE_FILE = "onestep_generator.json"  # pipeline exports before this file existed
RECIPE_FORMAT = 1


@dataclass(frozen=True)
class GeneratorSpec:
    """One generator kind: its pipeline family, default model, scheduler and extra weights."""

    name: str
    pipeline: str  # "sdxl" | "sd" | "transformer" (the few-step kinds of flow_generators)
    family: str  # the `load_pipeline` family of its base model
    default_model: str  # preset of the base pipeline
    scheduler: str  # "euler_ancestral" | "euler" | "tcd" | "lcm"
    size: int  # default image height = width
    timesteps: tuple[int, ...] | None = None  # explicit timesteps (LCM at 800)
    eta: float | None = None  # TCD's eta
    weights: str | None = None  # "lora" | "unet": extra weights applied to the base model
    weights_file: str | None = None  # file name in the release (models/hyper-sd/<file>)
    weights_asset: str | None = None  # `diffalign download --only` name of that file
    pipeline_class: str = ""  # the diffusers pipeline class its model folders hold
    release: str | None = None  # Hub id of the release that runs as this kind as published
    refuses: tuple[str, ...] = ()  # Hub ids of releases of its pipeline class it cannot run


GENERATORS: dict[str, GeneratorSpec] = {}


def register_generator(spec: GeneratorSpec) -> GeneratorSpec:
    """Add a kind (its release, if any, must be registered in `engine.releases`)."""
    if not spec.pipeline_class:
        raise ValueError(f"generator {spec.name}: pipeline_class is required")
    GENERATORS[spec.name] = spec
    return spec


register_generator(
    GeneratorSpec(
        "sdxl-turbo",
        "sdxl",
        "sdxl",
        "sdxl-turbo",
        "euler_ancestral",
        512,
        pipeline_class="StableDiffusionXLPipeline",
        release="stabilityai/sdxl-turbo",
    )
)
register_generator(
    GeneratorSpec(
        "sd-turbo",
        "sd",
        "sd21",
        "sd-turbo",
        "euler",
        512,
        pipeline_class="StableDiffusionPipeline",
        release="stabilityai/sd-turbo",
    )
)
register_generator(
    GeneratorSpec(
        "hyper-sd15",
        "sd",
        "sd15",
        "sd15",
        "tcd",
        512,
        eta=1.0,
        weights="lora",
        weights_file="Hyper-SD15-1step-lora.safetensors",
        weights_asset="hyper-sd",
        pipeline_class="StableDiffusionPipeline",
    )
)
register_generator(
    GeneratorSpec(
        "hyper-sdxl",
        "sdxl",
        "sdxl",
        "sdxl-base",
        "lcm",
        1024,
        timesteps=(800,),
        weights="unet",
        weights_file="Hyper-SDXL-1step-Unet.safetensors",
        weights_asset="hyper-sd",
        pipeline_class="StableDiffusionXLPipeline",
    )
)


# The few-step transformer generators (issue 17; `diffalign.noise.flow_generators` runs them,
# with their step counts): pipeline "transformer", their presets, the releases they run as.
register_generator(
    GeneratorSpec(
        "flux-schnell",
        "transformer",
        "flux",
        "flux-schnell",
        "flow_match",
        1024,
        pipeline_class="FluxPipeline",
        release="black-forest-labs/FLUX.1-schnell",
        refuses=("black-forest-labs/FLUX.1-dev",),  # guidance-distilled, 28-50 steps
    )
)
register_generator(
    GeneratorSpec(
        "sd3.5-large-turbo",
        "transformer",
        "sd3.5-large-turbo",
        "sd3.5-large-turbo",
        "flow_match",
        1024,
        pipeline_class="StableDiffusion3Pipeline",
        release="stabilityai/stable-diffusion-3.5-large-turbo",
        refuses=(  # 28-40 step models with classifier-free guidance
            "stabilityai/stable-diffusion-3-medium-diffusers",
            "stabilityai/stable-diffusion-3.5-large",
            "stabilityai/stable-diffusion-3.5-medium",
        ),
    )
)
register_generator(
    GeneratorSpec(
        "sana-sprint",
        "transformer",
        "sana-sprint",
        "sana-sprint",
        "scm",
        1024,
        pipeline_class="SanaSprintPipeline",
        release="Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
    )
)
register_generator(
    GeneratorSpec(
        "pixart-dmd",
        "transformer",
        "pixart-dmd",
        "pixart-dmd",
        "ddpm",
        512,
        timesteps=(400,),
        pipeline_class="PixArtAlphaPipeline",
        release="PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512",
    )
)


@dataclass(frozen=True)
class Recipe:
    """How to load a `--model` as a one-step generator.

    ``model``: the pipeline to load (preset, folder or Hub id); ``weights``: the Hyper-SD file
    recorded for it (None: the default file, or none needed); ``weights_in_model``: the kind's
    extra weights are already in ``model`` (a `noise sft` pipeline export), never applied again;
    ``loras``: fine-tuned LoRA exports fused on top, in order; ``found_by``: how it was told.
    """

    spec: GeneratorSpec
    model: str
    weights: str | None = None
    weights_in_model: bool = False
    loras: tuple[str, ...] = ()
    found_by: str = ""


def _choices(pipeline_class: str | None = None, release: str | None = None) -> str:
    names = [
        n
        for n, s in GENERATORS.items()
        if (pipeline_class is None or s.pipeline_class == pipeline_class)
        and (release is None or release not in s.refuses)
    ]
    return ", ".join(names or GENERATORS)


def check_generator_name(generator: str | None) -> None:
    if generator is not None and generator not in GENERATORS:
        raise DiffalignError(f"unknown generator '{generator}'; choose one of {_choices()}")


def read_recorded_recipe(model: str | None) -> dict | None:
    """The recipe a `noise sft` export recorded (``RECIPE_FILE``; the older pipeline-only
    ``onestep_generator.json`` reads as a pipeline export), else None."""
    if model is None:
        return None
    folder = Path(str(model)).expanduser()
    if not folder.is_dir():
        return None
    path = folder / RECIPE_FILE
    legacy = not path.is_file()
    if legacy:
        path = folder / LEGACY_RECIPE_FILE
        if not path.is_file():
            return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffalignError(f"{path}: not a valid recipe record ({e})") from None
    kind = record.get("generator") if isinstance(record, dict) else None
    if not isinstance(kind, str) or kind not in GENERATORS:
        raise DiffalignError(f"{path}: records generator {kind!r}, not one of {_choices()}")
    if legacy:
        return {"generator": record["generator"], "export": "pipeline", "weights_in_export": True}
    if record.get("export") not in ("pipeline", "lora"):
        raise DiffalignError(f"{path}: 'export' must be pipeline or lora")
    for key in ("base_model", "weights_file"):
        if not isinstance(record.get(key), str | None):
            raise DiffalignError(f"{path}: '{key}' must be a path")
    return record


def recipe_record(
    spec: GeneratorSpec, export: str, recipe: Recipe | None, weights: str | None
) -> dict[str, Any]:
    """What an export records (``RECIPE_FILE``) for a generator loaded by ``recipe`` with the
    kind's extra weights from ``weights`` (None: none applied at load). ``export`` is "pipeline"
    (the whole pipeline: the kind's weights and fused LoRAs are in it) or "lora" (applies to
    ``base_model``, loaded as that model's own recipe says, plus ``weights_file`` if it is not
    in the base)."""
    base = None
    if recipe is not None:  # a LoRA export's base: the last fused LoRA export, else the model
        base = recipe.loras[-1] if recipe.loras else _absolute(recipe.model)
    return {
        "format": RECIPE_FORMAT,
        "generator": spec.name,
        "pipeline_class": spec.pipeline_class,
        "scheduler": spec.scheduler,
        "timesteps": list(spec.timesteps) if spec.timesteps else None,
        "eta": spec.eta,
        "size": spec.size,
        "export": export,
        "extra_weights": spec.weights,  # "lora" | "unet" | None
        # a pipeline export holds the Hyper-SD weights; a LoRA export never does (its base may)
        "weights_in_export": export == "pipeline" and spec.weights is not None,
        "weights_file": _absolute(weights) if weights else None,
        "base_model": base,
    }


def _absolute(model: str) -> str:
    """A local path made absolute (a LoRA export's base must load from anywhere), else as is."""
    path = Path(str(model)).expanduser()
    return str(path.absolute()) if path.exists() else str(model)


def _check_pipeline_class(model: str, spec: GeneratorSpec) -> None:
    from diffalign.engine.releases import pipeline_class_of

    held = pipeline_class_of(model)
    if held is not None and held != spec.pipeline_class:
        fits = [n for n, s in GENERATORS.items() if s.pipeline_class == held]
        raise DiffalignError(
            f"--model {model} holds a {held}, but generator {spec.name} runs a "
            f"{spec.pipeline_class}; "
            + (f"generators for this model: {', '.join(fits)}" if fits else "no generator runs it")
        )


def generator_recipe(
    model: str | None = None, generator: str | None = None, _depth: int = 0
) -> Recipe:
    """The recipe ``model`` runs as (module doc); ``generator`` is ``--generator``."""
    check_generator_name(generator)
    if model is None:
        model = generator or "sdxl-turbo"
    model = str(model)
    # a kind's name, unless a folder or file of that name is here: `load_pipeline` would load
    # that path (spec E: a local path first), so it runs as its own recorded recipe or marks
    named = model in GENERATORS and not Path(model).expanduser().exists()
    if named and generator in (None, model):
        spec = GENERATORS[model]
        return Recipe(spec, spec.default_model, found_by="its name")
    from diffalign.engine.loading import PRESETS

    if named and model not in PRESETS:
        raise DiffalignError(
            f"--model {model} names the generator {model}; --generator {generator} "
            "contradicts it (pass a model folder to run it with another recipe)"
        )
    # else a preset of that name (`--model sdxl-turbo`, the default) run as --generator says

    record = read_recorded_recipe(model)
    if record is not None:
        return _recorded(model, record, generator, _depth)

    from diffalign.engine.releases import identify_release

    found = identify_release(model)
    if generator is not None:
        spec = GENERATORS[generator]
        _check_pipeline_class(model, spec)
        if found is not None and found[0].hub_id in spec.refuses:
            raise DiffalignError(
                f"--model {model} is {found[0].name} ({found[0].hub_id}, by {found[1]}), which "
                f"generator {generator} does not run"
            )
        return Recipe(spec, model, found_by="--generator")
    if found is not None:
        release, mark = found
        kinds = [s for s in GENERATORS.values() if s.release == release.hub_id]
        if kinds:
            _check_pipeline_class(model, kinds[0])
            return Recipe(kinds[0], model, found_by=f"{release.name}, by {mark}")
        if release.pipeline_class is None:
            raise DiffalignError(
                f"--model {model} is {release.name} ({release.hub_id}, by {mark}), not a "
                "diffusers pipeline to run"
            )
        if all(
            release.hub_id in s.refuses
            for s in GENERATORS.values()
            if s.pipeline_class == release.pipeline_class
        ):
            raise DiffalignError(
                f"--model {model} is {release.name} ({release.hub_id}, by {mark}), which is not "
                "a one-step model, and no generator kind runs it"
            )
        raise DiffalignError(
            f"--model {model} is {release.name} ({release.hub_id}, by {mark}), which is not a "
            f"one-step model; pass --generator to run it with a one-step recipe "
            f"({_choices(release.pipeline_class, release.hub_id)})"
        )
    from diffalign.engine.releases import pipeline_class_of

    raise DiffalignError(
        f"cannot tell which one-step generator --model {model} is (no release Hub id, download "
        f"record or model card, and no {RECIPE_FILE}); pass --generator "
        f"{_choices(pipeline_class_of(model)).replace(', ', '|')}"
    )


def _recorded(model: str, record: dict, generator: str | None, depth: int) -> Recipe:
    kind = str(record["generator"])
    if generator is not None and generator != kind:
        raise DiffalignError(
            f"--model {model} is a {kind} fine-tune ({RECIPE_FILE}); --generator {generator} "
            f"contradicts it: drop --generator or pass --generator {kind}"
        )
    spec = GENERATORS[kind]
    found_by = f"the recipe recorded in {RECIPE_FILE}"
    if record["export"] == "pipeline":
        _check_pipeline_class(model, spec)
        return Recipe(spec, model, weights_in_model=True, found_by=found_by)
    base = record.get("base_model")
    if not isinstance(base, str) or not base:
        raise DiffalignError(f"{Path(model) / RECIPE_FILE}: a LoRA export without its base_model")
    if depth >= 32:
        raise DiffalignError(f"{Path(model) / RECIPE_FILE}: its chain of LoRA bases is a loop")
    inner = generator_recipe(base, kind, depth + 1)
    weights = inner.weights
    if spec.weights is not None and not inner.weights_in_model and weights is None:
        weights = record.get("weights_file") or None
    return Recipe(
        spec,
        inner.model,
        weights=weights,
        weights_in_model=inner.weights_in_model,
        loras=(*inner.loras, _absolute(model)),
        found_by=found_by,
    )
