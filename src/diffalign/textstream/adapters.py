"""Where the text stream enters each block, per model family (spec T; issue 15).

The residual math (`residual.py`) and the hooks (`attach.py`) are model-agnostic; a family plugs
in through one `StreamAdapter`: its blocks in execution order (global indices, so block k is the
k-th block that runs) and where each block takes the text tokens and the timestep embedding
when called positionally (gradient checkpointing). Keyword calls use `encoder_hidden_states`
and the adapter's `temb_name`.

- SD3 / SD3.5 (`SD3Transformer2DModel`): `transformer_blocks`, block(hidden, text, temb, ...).
- FLUX.1 (`FluxTransformer2DModel`): the double-stream `transformer_blocks` (global 0..D-1),
  then the single-stream `single_transformer_blocks` (global D + j); in diffusers >= 0.35 both
  take `encoder_hidden_states` separately and return `(text, image)`.
- Qwen-Image (`QwenImageTransformer2DModel`): `transformer_blocks`,
  block(hidden, text, text_mask, temb, ...).

FLUX.2 (`Flux2Transformer2DModel`) is not supported: its single-stream blocks receive text and
image already concatenated in `hidden_states` (`encoder_hidden_states=None`), so the text does
not enter them as a separate stream, and its double blocks take two modulation tensors instead
of one `temb`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.textstream.residual import bucket_index

FAMILIES = ("sd3", "flux", "qwen-image")


@dataclass(frozen=True)
class StreamAdapter:
    """The text-stream layout of one transformer: blocks in execution order and call layout."""

    family: str
    blocks: tuple[torch.nn.Module, ...]
    feature_dim: int
    text_arg: int = 1  # positional index of encoder_hidden_states
    temb_arg: int = 2  # positional index of the timestep embedding
    temb_name: str = "temb"
    # the transformer's `timestep` argument times this = the scheduler's timestep (0..1000)
    timestep_scale: float = 1.0
    num_double_blocks: int | None = None  # FLUX: blocks before the single-stream ones
    mask_arg: int | None = None  # Qwen-Image: positional index of the text attention mask

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_name(self, k: int) -> str:
        """`transformer_blocks.k` / `single_transformer_blocks.j` for global index k."""
        if self.num_double_blocks is not None and k >= self.num_double_blocks:
            return f"single_transformer_blocks.{k - self.num_double_blocks}"
        return f"transformer_blocks.{k}"

    def get_text(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if kwargs.get("encoder_hidden_states") is not None:
            return kwargs["encoder_hidden_states"]
        if len(args) > self.text_arg and args[self.text_arg] is not None:
            return args[self.text_arg]
        raise DiffalignError("text-stream residual: block called without encoder_hidden_states")

    def set_text(self, args: tuple, kwargs: dict, text: torch.Tensor) -> tuple[tuple, dict]:
        if "encoder_hidden_states" in kwargs:
            return args, {**kwargs, "encoder_hidden_states": text}
        i = self.text_arg
        return (*args[:i], text, *args[i + 1 :]), kwargs

    def get_text_mask(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The text attention mask the block gets (Qwen-Image), else None."""
        if self.mask_arg is None:
            return None
        if "encoder_hidden_states_mask" in kwargs:
            return kwargs["encoder_hidden_states_mask"]
        return args[self.mask_arg] if len(args) > self.mask_arg else None

    def get_temb(self, args: tuple, kwargs: dict) -> Any:
        if self.temb_name in kwargs:
            return kwargs[self.temb_name]
        return args[self.temb_arg] if len(args) > self.temb_arg else None

    def timestep_bucket(self, timestep: Any, edges) -> torch.Tensor:
        """Timestep bucket per row (`residual.bucket_index` of increasing `edges` on the 0..1000
        schedule) of the transformer's `timestep` argument, as the transformer receives it: on
        FLUX.1 / Qwen-Image after the pipeline's rounding to the model dtype
        (`flow.transformer_timestep`). The one rule of both generation (which rotation a step
        uses) and calibration (which bucket a step's tokens are fitted in, and which steps a
        bucket can get), so a bucket's statistics come from exactly the timesteps that look it
        up. The argument is compared with the edges as the transformer would receive them in
        its dtype (`received_edges`), so a timestep at an edge falls in the bucket above it
        (`edges[b] <= t < edges[b + 1]`, as the method's authors bucket) even where the edge's
        t / 1000 rounds down (float32 0.7 = 0.69999999)."""
        t = torch.as_tensor(timestep).detach().cpu().flatten()
        if not t.is_floating_point():
            t = t.to(torch.float64)
        return bucket_index(t.to(torch.float64), self.received_edges(edges, t.dtype))

    def received_edges(self, edges, dtype: torch.dtype) -> torch.Tensor:
        """The bucket edges (float32 schedule timesteps, or float64 for a float64 argument) as
        the family's pipeline hands a timestep to the transformer in `dtype`
        (`flow.transformer_timestep`: SD3 as is, FLUX.1 / Qwen-Image `t.to(dtype) / 1000`);
        float64. Monotone, so a timestep >= an edge never lands below it."""
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        e = torch.as_tensor(edges, dtype=torch.float64).to(wide)
        return self.received_timesteps(e, dtype).to(torch.float64)

    def received_timesteps(self, timesteps, dtype) -> torch.Tensor:
        """The `timestep` argument the family's pipeline gives the transformer for schedule
        timesteps (0..1000) in a model of `dtype` (`flow.transformer_timestep`: SD3 as they
        are, FLUX.1 and Qwen-Image rounded to the model dtype), flattened."""
        from diffalign.textstream.flow import family

        t = torch.as_tensor(timesteps).reshape(-1)
        return family(self.family).transformer_timestep(t, len(t), dtype)


def stream_adapter(transformer: torch.nn.Module) -> StreamAdapter:
    """The adapter of `transformer` (SD3/SD3.5, FLUX.1 or Qwen-Image); other models: one error."""
    name = type(transformer).__name__
    dim = transformer_feature_dim(transformer)
    if name.startswith("Flux2"):
        raise DiffalignError(
            f"{name} (FLUX.2) is not supported by the text-stream residual: its single-stream "
            "blocks get text and image concatenated, not a separate text stream"
        )
    single = getattr(transformer, "single_transformer_blocks", None)
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise DiffalignError(
            f"{name} has no transformer_blocks; the text-stream residual needs an SD3/SD3.5, "
            "FLUX.1 or Qwen-Image transformer"
        )
    if "Flux" in name and single is not None:
        return StreamAdapter(
            "flux",
            (*blocks, *single),
            dim,
            timestep_scale=1000.0,
            num_double_blocks=len(blocks),
        )
    if "QwenImage" in name:
        return StreamAdapter(
            "qwen-image", tuple(blocks), dim, temb_arg=3, timestep_scale=1000.0, mask_arg=2
        )
    if "SD3" in name:
        return StreamAdapter("sd3", tuple(blocks), dim)
    raise DiffalignError(
        f"{name}: the text-stream residual supports SD3/SD3.5, FLUX.1 and Qwen-Image transformers"
    )


def transformer_feature_dim(transformer: torch.nn.Module) -> int:
    """Width of the text stream: `num_attention_heads * attention_head_dim`."""
    cfg = getattr(transformer, "config", None)
    try:
        return int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    except AttributeError:
        return int(transformer.inner_dim)
