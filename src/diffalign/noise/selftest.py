"""`diffalign selftest` checks of the one-step generators: each generator kind against its own
diffusers pipeline for the same noise (`tests/test_noise_generators.py` on the real files).

One check per entry of `noise.generators.GENERATORS`; `FAMILIES` says, per `GeneratorSpec.pipeline`
family, which pipeline folders (model_index `_class_name`) it runs on and how its images are
compared with the pipeline's (a new family adds its line there; a family without a line is not
checked). Kinds with extra weights (Hyper-SD) are checked on their weights file, with the first
pipeline folder it fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.selftest import (
    PROMPTS,
    Asset,
    SelftestContext,
    SelftestSkip,
    file_of,
    pipeline_of,
    register_check,
    register_file_kind,
)
from diffalign.noise.generators import GENERATORS, GeneratorSpec

TOLERANCE = 1e-4  # images in [0, 1]; the tests see < 1e-5 on the tiny models


def generator_difference(gen, size: int) -> float:
    """Max |our generate(z) - the pipeline's image for latents z| for two prompts."""
    z = gen.sample_noise(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = gen.generate(z, gen.encode_prompts(PROMPTS))
        ref = gen.pipe(
            prompt=PROMPTS,
            latents=z.clone().to(gen.device),
            height=size,
            width=size,
            output_type="pt",
            **gen.pipeline_kwargs(),
        ).images
    return float((ours.float().cpu() - ref.float().cpu()).abs().max())


# GeneratorSpec.pipeline -> (the model_index `_class_name`s it runs on, the comparison)
FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[Any, int], float]]] = {
    "sdxl": (("StableDiffusionXLPipeline",), generator_difference),
    "sd": (("StableDiffusionPipeline",), generator_difference),
}


def _load(model: str, spec: GeneratorSpec, ctx: SelftestContext, weights: str | None = None):
    from diffalign.noise.generators import load_generator

    gen = load_generator(
        model,
        spec.name,
        weights=weights,
        height=ctx.size,
        width=ctx.size,
        device=str(ctx.device),
        gradient_checkpointing=False,
    )
    gen.pipe.set_progress_bar_config(disable=True)
    return gen


def _register(spec: GeneratorSpec) -> None:
    classes, compare = FAMILIES.get(spec.pipeline, ((), generator_difference))
    name = f"generator {spec.name} vs {'/'.join(classes) or spec.pipeline + ' pipeline'}"
    if spec.weights_file is None:

        @register_check(name, pipeline_of(*classes), TOLERANCE)
        def _check(asset: Asset, ctx: SelftestContext) -> float:
            return compare(_load(str(asset.path), spec, ctx), ctx.size)

        return
    kind = f"{spec.name} weights"
    register_file_kind(spec.weights_file, kind)

    @register_check(name, file_of(kind), TOLERANCE)
    def _check_weights(asset: Asset, ctx: SelftestContext) -> tuple[float, str]:
        tried = []
        for base in ctx.find(pipeline_of(*classes)):
            try:
                gen = _load(str(base.path), spec, ctx, weights=str(asset.path))
            except DiffalignError:  # weights of another base model: try the next folder
                tried.append(base.label)
                continue
            return compare(gen, ctx.size), f"on {base.label}"
        raise SelftestSkip(
            f"no {'/'.join(classes)} folder it fits (its base: {spec.default_model}"
            + (f"; tried {', '.join(tried)}" if tried else "")
            + ")"
        )


for _spec in GENERATORS.values():
    _register(_spec)
