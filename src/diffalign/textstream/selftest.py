"""`diffalign selftest` check of the text-stream residual: switched off (no targets, or every
target at weight 0) it registers nothing and the pipeline's latents are bit-identical to the
plain pipeline's (`tests/test_textstream_residual.py`, `tests/test_textstream_families.py` on the
real files). `PIPELINES` lists the pipeline classes the residual runs on (SD3/SD3.5, FLUX.1
dev/schnell, Qwen-Image): a new family adds its class there."""

from __future__ import annotations

import torch

from diffalign.engine.selftest import Asset, SelftestContext, pipeline_of, register_check

PIPELINES: tuple[str, ...] = ("StableDiffusion3Pipeline", "FluxPipeline", "QwenImagePipeline")
# two steps: with one, Qwen-Image's terminal-shift stretch divides 0 by 0 (all-NaN latents)
STEPS = 2


def _latents(pipe, size: int, device) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            prompt="a photo of a cat",
            num_inference_steps=STEPS,
            height=size,
            width=size,
            output_type="latent",
            generator=torch.Generator(device=device).manual_seed(0),
        ).images


@register_check("text-stream residual off = plain pipeline", pipeline_of(*PIPELINES), 0.0)
def _check_off(asset: Asset, ctx: SelftestContext) -> float:
    from diffalign.engine.errors import DiffalignError
    from diffalign.engine.selftest import plain_pipeline
    from diffalign.textstream.adapters import stream_adapter
    from diffalign.textstream.attach import TextStreamResidual

    pipe = plain_pipeline(asset.path, ctx.device)  # whichever family model_index.json names
    plain = _latents(pipe, ctx.size, ctx.device)
    if not torch.isfinite(plain).all():  # NaN - NaN would hide any difference
        raise DiffalignError("the plain pipeline's latents are not finite: nothing to compare")
    n = stream_adapter(pipe.transformer).num_blocks  # FLUX: double + single-stream blocks
    diffs = []
    for res in (
        TextStreamResidual(0, [], mode="plain"),
        TextStreamResidual(0, list(range(1, n)), [0.0], mode="plain"),
    ):
        with res.attach(pipe.transformer) as handle:
            if handle.attached:
                raise DiffalignError("an off residual registered hooks")
            diffs.append((_latents(pipe, ctx.size, ctx.device) - plain).abs().max())
    return float(torch.stack(diffs).max())  # NaN stays NaN (a FAIL)
