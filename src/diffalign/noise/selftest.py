"""`diffalign selftest` checks of the one-step and few-step generators: each generator kind
against its own diffusers pipeline for the same noise and settings
(`tests/test_noise_generators.py`, `tests/test_noise_flow_generators.py` on the real files).

One check per entry of `noise.generators.GENERATORS`; `FAMILIES` says, per kind (or per
`GeneratorSpec.pipeline` family), which pipeline folders (model_index `_class_name`) it runs on
and how its images are compared with the pipeline's (a new kind adds its line there; a kind
without a line is not checked). The U-Net kinds' one step runs on every folder of their class;
a few-step transformer kind's sampling is its release's, so it runs only on folders recognised
as that kind (`generator_recipe`: the release's marks or a recorded recipe, whatever the folder
is called). Kinds with extra weights (Hyper-SD) are checked on their weights file, with the
first pipeline folder it fits, folders of the base release it is published for (Hyper-SD15:
SD 1.5, by `engine.releases.identify_release`) tried first. Each row's detail names the
folder's release, and says when a check ran a kind's recipe on another release (the U-Net
kinds' one step on an SD 1.5 folder: the same comparison, not that release's own recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
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


def generator_difference(
    gen,
    size: int,
    kwargs: dict[str, Any] | None = None,
    pipe_latents: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Max |our generate(z) - the pipeline's image for latents z| for two prompts. ``kwargs``:
    the pipeline settings of the generator's own path (default ``gen.pipeline_kwargs()``);
    ``pipe_latents(pipe, z)``: the pipeline's own latent input for z (default z itself)."""
    z = gen.sample_noise(2, generator=torch.Generator().manual_seed(0))
    settings = {"height": size, "width": size}
    settings.update(gen.pipeline_kwargs() if kwargs is None else kwargs)
    latents = z.clone().to(gen.device)
    with torch.no_grad():
        ours = gen.generate(z, gen.encode_prompts(PROMPTS))
        ref = gen.pipe(
            prompt=PROMPTS,
            latents=latents if pipe_latents is None else pipe_latents(gen.pipe, latents),
            output_type="pt",
            **settings,
        ).images
    return float((ours.float().cpu() - ref.float().cpu()).abs().max())


def fewstep_difference(
    gen, size: int, pipe_latents: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
) -> float:
    """`generator_difference` of a few-step transformer kind: the pipeline call that takes its
    path (`flow_generators.pipeline_kwargs`: steps, guidance, sequence length, ...)."""
    from diffalign.noise.flow_generators import pipeline_kwargs

    return generator_difference(gen, size, pipeline_kwargs(gen), pipe_latents)


def flux_packed(pipe, z: torch.Tensor) -> torch.Tensor:
    """FluxPipeline's latent input: z packed into 2x2 patches, as the generator packs it."""
    return pipe._pack_latents(z, *z.shape)


# a kind's name or its GeneratorSpec.pipeline -> (the model_index `_class_name`s it runs on,
# the comparison)
FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[Any, int], float]]] = {
    "sdxl": (("StableDiffusionXLPipeline",), generator_difference),
    "sd": (("StableDiffusionPipeline",), generator_difference),
    "flux-schnell": (("FluxPipeline",), partial(fewstep_difference, pipe_latents=flux_packed)),
    "sd3.5-large-turbo": (("StableDiffusion3Pipeline",), fewstep_difference),
    "sana-sprint": (("SanaSprintPipeline",), fewstep_difference),
    "pixart-dmd": (("PixArtAlphaPipeline",), fewstep_difference),
}


def recognised_as(spec: GeneratorSpec, classes: tuple[str, ...]) -> Callable[[Asset], bool]:
    """`applies` for pipeline folders of `classes` that run as `spec` by their own marks
    (`generator_recipe` without --generator), whatever their name."""
    from diffalign.noise.recipes import generator_recipe

    of_class = pipeline_of(*classes)

    def applies(asset: Asset) -> bool:
        if not of_class(asset):
            return False
        try:
            return generator_recipe(str(asset.path)).spec.name == spec.name
        except DiffalignError:  # no release mark, or another release's
            return False

    return applies


def folder_release(asset: Asset):
    """The `engine.releases.Release` a pipeline folder is by its own marks, else None."""
    from diffalign.engine.releases import identify_release

    try:
        found = identify_release(str(asset.path))
    except DiffalignError:
        return None
    return found[0] if found is not None else None


def intended_release(spec: GeneratorSpec):
    """The release `spec` is published for: its own (`spec.release`: SD-Turbo), else that of
    its base preset (Hyper-SD15: SD 1.5); None when neither is registered."""
    from diffalign.engine.loading import PRESETS
    from diffalign.engine.releases import release_by_hub_id

    if spec.release is not None:
        return release_by_hub_id(spec.release)
    preset = PRESETS.get(spec.default_model)
    return release_by_hub_id(preset.repo_id) if preset is not None else None


def ran_on(spec: GeneratorSpec, asset: Asset, label: bool = False) -> str:
    """The detail of a generator row: the folder's release (and, with `label`, the folder),
    and whether that is the release `spec` is meant for."""
    return _ran_on(spec, asset, folder_release(asset), intended_release(spec), label)


def _ran_on(spec: GeneratorSpec, asset: Asset, release, meant, label: bool) -> str:
    """`ran_on` for the folder's `release` and the `meant` one, already looked up."""
    where = f"{asset.label}, " if label else ""
    name = release.name if release is not None else "no recognised release"
    text = f"on {where}{name}"
    if meant is not None and (release is None or release.hub_id != meant.hub_id):
        text += f" (the {spec.name} recipe, which is meant for {meant.name})"
    return text


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
    family = spec.name if spec.name in FAMILIES else spec.pipeline
    classes, compare = FAMILIES.get(family, ((), generator_difference))
    name = f"generator {spec.name} vs {'/'.join(classes) or spec.pipeline + ' pipeline'}"
    if spec.weights_file is None:
        # few-step kinds: only their own release's folders (FLUX.1-dev is no schnell)
        applies = (
            recognised_as(spec, classes)
            if spec.pipeline == "transformer"
            else pipeline_of(*classes)
        )

        @register_check(name, applies, TOLERANCE)
        def _check(asset: Asset, ctx: SelftestContext) -> tuple[float, str]:
            return compare(_load(str(asset.path), spec, ctx), ctx.size), ran_on(spec, asset)

        return
    kind = f"{spec.name} weights"
    register_file_kind(spec.weights_file, kind)

    @register_check(name, file_of(kind), TOLERANCE)
    def _check_weights(asset: Asset, ctx: SelftestContext) -> tuple[float, str]:
        tried = []
        meant = intended_release(spec)
        bases = ctx.find(pipeline_of(*classes))
        # each folder's release, looked up once (for the order, then for the row's detail)
        releases = {} if meant is None else {b.path: folder_release(b) for b in bases}
        # folders of the release the weights are published for first (stable: then by name)
        bases.sort(key=lambda b: meant is None or releases[b.path] != meant)
        for base in bases:
            try:
                gen = _load(str(base.path), spec, ctx, weights=str(asset.path))
            except DiffalignError:  # weights of another base model: try the next folder
                tried.append(base.label)
                continue
            difference = compare(gen, ctx.size)
            release = releases[base.path] if base.path in releases else folder_release(base)
            return difference, _ran_on(spec, base, release, meant, label=True)
        raise SelftestSkip(
            f"no {'/'.join(classes)} folder it fits (its base: {spec.default_model}"
            + (f"; tried {', '.join(tried)}" if tried else "")
            + ")"
        )


for _spec in GENERATORS.values():
    _register(_spec)
