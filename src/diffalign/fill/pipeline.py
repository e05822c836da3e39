"""Loading FLUX.1-Fill for `diffalign fill` (spec F) and checking its shapes: shared by
training (`fill.train`), inference (`fill.infer`), the semantic module's attachment
(`fill.attach`) and the self-test.
"""

from __future__ import annotations

from typing import Any

from diffalign.engine.errors import DiffalignError


def load_fill_pipeline(model: str, dtype: str = "float32"):
    """FLUX.1-Fill through the shared loader (preset `flux-fill`, folder, Hub id)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    from diffalign.engine.loading import load_pipeline

    # the per-component loading bars are noise next to our own one-line reports; afterwards
    # each library's switch is put back as it was (DIFFALIGN_NO_PROGRESS may have turned it off)
    was_on = dlogging.is_progress_bar_enabled(), tlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        pipe = load_pipeline(
            model,
            FluxFillPipeline,
            "flux-fill",
            dtype=dtype,
            device="cpu",
            expect={"transformer": FluxTransformer2DModel},
        )
    finally:
        if was_on[0]:
            dlogging.enable_progress_bar()
        if was_on[1]:
            tlogging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    check_fill_channels(pipe, model)
    return pipe


def check_fill_channels(pipe, model: str) -> None:
    """The transformer must take `[latents | masked-image latents | packed mask]` tokens (FLUX.1-
    Fill: 64 + 64 + 256 = 384) and predict latent-width tokens; a FLUX.1-dev transformer (64
    inputs) or a VAE of another width is one error line."""
    from diffalign.fill.encode import FillEncoder

    enc = FillEncoder(pipe)
    cfg = pipe.transformer.config
    want_in = enc.latent_dim + enc.cond_dim
    out = cfg.get("out_channels") or cfg.get("in_channels")
    if cfg.get("in_channels") != want_in or out != enc.latent_dim:
        raise DiffalignError(
            f"--model {model}: its transformer takes {cfg.get('in_channels')} input and "
            f"{out} output channels; FLUX Fill with this VAE needs {want_in} = "
            f"{enc.latent_dim} latent + {enc.cond_dim} fill-condition inputs and "
            f"{enc.latent_dim} outputs (is it a FLUX.1-Fill model?)"
        )


def latent_width(pipe: Any) -> int:
    """Channels of a packed latent token: 4 x the VAE's latent channels (64 on FLUX)."""
    return int(pipe.vae.config.latent_channels) * 4
