"""`diffalign make-tiny flux-dev | flux-schnell`: tiny random FLUX.1 text-to-image pipelines.

Each folder is what `FluxPipeline.save_pretrained` writes for black-forest-labs/FLUX.1-dev or
FLUX.1-schnell: `model_index.json`, `transformer/` (FluxTransformer2DModel: double-stream
`transformer_blocks`, then `single_transformer_blocks`), `vae/` (AutoencoderKL, 16 latent
channels, 8x downsampling, FLUX's shift/scale factors), `text_encoder/` (CLIPTextModel),
`text_encoder_2/` (T5EncoderModel), `tokenizer/`, `tokenizer_2/`, `scheduler/`
(FlowMatchEulerDiscreteScheduler with the release's own config) and the model card `README.md`
naming the release, as the Hub repos carry.

The releases differ where the real ones do: dev is guidance-distilled (`guidance_embeds=True`)
with a dynamically shifted schedule; schnell has no guidance embedder and a plain schedule
(shift 1, no dynamic shifting). Channel counts are the real ones (16 latent channels packed 2x2
into 64), only widths and depths are tiny; `axes_dims_rope` sums to the head dim as in the real
[16, 56, 56] of 128.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError
from diffalign.engine.tiny import register_kind
from diffalign.engine.tiny_flux import (
    FLUX_FILL_SCHEDULER_CONFIG,
    FLUX_LATENT_CHANNELS,
    tiny_flux_components,
)

# scheduler/scheduler_config.json of each release (FLUX.1-dev's is the Fill-dev one).
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = dict(FLUX_FILL_SCHEDULER_CONFIG)
FLUX_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
# release name, Hub repo, guidance-distilled?, scheduler config
FLUX1_RELEASES: dict[str, tuple[str, str, bool, dict[str, Any]]] = {
    "flux-dev": ("FLUX.1 [dev]", "black-forest-labs/FLUX.1-dev", True, FLUX_DEV_SCHEDULER_CONFIG),
    "flux-schnell": (
        "FLUX.1 [schnell]",
        "black-forest-labs/FLUX.1-schnell",
        False,
        FLUX_SCHNELL_SCHEDULER_CONFIG,
    ),
}

_FLUX1_OVERRIDES: dict[str, Any] = {
    "num_layers": 2,
    "num_single_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "joint_attention_dim": 32,
    "clip_hidden_size": 32,
}


def build_tiny_flux1_pipeline(
    release: str = "flux-dev",
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    joint_attention_dim: int = 32,
    clip_hidden_size: int = 32,
):
    """A tiny random `FluxPipeline` in memory, wired like FLUX.1-dev or FLUX.1-schnell.

    `joint_attention_dim` is the T5 width, `clip_hidden_size` the CLIP width (= the pooled
    projection width, as CLIP-L's 768 in the real model).
    """
    from diffusers import FluxPipeline

    if release not in FLUX1_RELEASES:
        raise DiffalignError(f"unknown FLUX.1 release '{release}' ({', '.join(FLUX1_RELEASES)})")
    _, _, guidance_embeds, scheduler_config = FLUX1_RELEASES[release]
    packed = 4 * FLUX_LATENT_CHANNELS  # 2x2 patches of 16 latent channels: 64, as the real model
    return FluxPipeline(
        **tiny_flux_components(
            seed,
            in_channels=packed,
            out_channels=None,
            guidance_embeds=guidance_embeds,
            scheduler_config=scheduler_config,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            joint_attention_dim=joint_attention_dim,
            clip_hidden_size=clip_hidden_size,
        )
    )


def release_model_card(title: str, repo_id: str, pipeline_class: str, note: str) -> str:
    """A model card `README.md` naming the release as the Hub repo's card does (title and the
    `from_pretrained("<repo id>")` line), marked as tiny random weights."""
    return (
        "---\nlibrary_name: diffusers\npipeline_tag: text-to-image\ntags:\n- text-to-image\n"
        "- diffalign-tiny\n---\n\n"
        f"# {title}\n\n"
        f"Tiny randomly initialised stand-in for `{repo_id}`, written by `diffalign make-tiny` "
        f"in the release's folder layout ({note}). It generates noise, not images.\n\n"
        "```python\n"
        f"from diffusers import {pipeline_class}\n\n"
        f'pipe = {pipeline_class}.from_pretrained("{repo_id}")\n'
        "```\n"
    )


def _write_flux1(release: str, out: Path, seed: int, **overrides: Any) -> None:
    title, repo_id, guided, _ = FLUX1_RELEASES[release]
    build_tiny_flux1_pipeline(release, seed, **overrides).save_pretrained(out)
    note = "guidance-distilled, dynamic shift" if guided else "timestep-distilled, no guidance"
    (Path(out) / "README.md").write_text(
        release_model_card(title, repo_id, "FluxPipeline", note), encoding="utf-8"
    )


@register_kind(
    "flux-dev",
    "FluxPipeline shaped like FLUX.1-dev (double + single stream blocks, guidance embedder, "
    "CLIP + T5, 16-channel VAE packed 2x2, dynamic-shift scheduler)",
    _FLUX1_OVERRIDES,
)
def _build_flux_dev(out: Path, seed: int, **overrides: Any) -> None:
    _write_flux1("flux-dev", out, seed, **overrides)


@register_kind(
    "flux-schnell",
    "FluxPipeline shaped like FLUX.1-schnell (as flux-dev without the guidance embedder; "
    "shift-1 scheduler)",
    _FLUX1_OVERRIDES,
)
def _build_flux_schnell(out: Path, seed: int, **overrides: Any) -> None:
    _write_flux1("flux-schnell", out, seed, **overrides)
