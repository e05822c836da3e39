"""FLUX.1-Fill transformer + peft LoRA + the semantic cross-attention branch (spec F: Model).

`SemanticFillTransformer` is the seed's forward (seed 004, sections 4-5): the semantic module
enhances the noisy latent tokens `x_t` (Q) from the semantic tokens (K/V) *before* they are
concatenated with the 320-channel fill condition, then the transformer runs with `timestep =
t` in [0, 1] (the pipeline's `timestep / 1000`) and the guidance embedding (FLUX.1-Fill-dev: 30).
With the module's residual scale at 0 and fresh LoRA (B = 0) the output is bit-identical to the
unmodified transformer's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffalign.engine.errors import DiffalignError

# diffusers' examples/dreambooth/train_dreambooth_lora_flux.py default `--lora_layers`
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
ADAPTER_NAME = "default"


def _matches(name: str, target: str) -> bool:
    """peft's rule for a plain target name: the module name equals it or ends with `.target`."""
    return name == target or name.endswith("." + target)


def lora_target_modules(transformer: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Resolve `targets` to peft `target_modules`: "default" (diffusers' FLUX LoRA list),
    "all-linear" (every nn.Linear of the transformer, as ai-toolkit does) or a comma list of
    module-name suffixes; a suffix that matches no Linear is a DiffalignError."""
    linear = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(targets, str):
        key = targets.strip().lower()
        if key == "default":
            names = list(DEFAULT_LORA_TARGETS)
        elif key in ("all-linear", "all_linear"):
            return linear
        else:
            names = [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = [str(t) for t in targets]
    if not names:
        raise DiffalignError("lora_targets is empty")
    unknown = [t for t in names if not any(_matches(n, t) for n in linear)]
    if unknown and isinstance(targets, str) and targets.strip().lower() == "default":
        names = [t for t in names if t not in unknown]  # a transformer without some of them
    elif unknown:
        raise DiffalignError(
            f"lora_targets: '{unknown[0]}' matches no Linear layer of the transformer "
            f"(e.g. {', '.join(linear[:4])})"
        )
    return names


def add_lora(
    transformer: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    targets: str | Sequence[str] = "default",
    dropout: float = 0.0,
):
    """Freeze `transformer` and add a peft LoRA adapter (diffusers' `add_adapter`, gaussian A,
    zero B as diffusers' trainers); returns the LoraConfig. Trainable LoRA weights are fp32."""
    from peft import LoraConfig

    if rank < 1:
        raise DiffalignError(f"lora_rank must be >= 1, got {rank}")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=float(dropout),
        init_lora_weights="gaussian",
        target_modules=lora_target_modules(transformer, targets),
    )
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return config


def lora_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The adapter's trainable parameters."""
    return [p for n, p in transformer.named_parameters() if "lora_" in n and p.requires_grad]


def count_parameters(params) -> int:
    return int(sum(p.numel() for p in params))


def check_semantic_tokens(x_t: torch.Tensor, semantic_tokens: torch.Tensor) -> None:
    """Semantic tokens fit the latent tokens `[B, L, C]`: `[B, L, C]` (grid layouts) or
    `[B, L/2, C]` (the `panel` layout); else one DiffalignError."""
    b, n, c = x_t.shape
    if (
        semantic_tokens.ndim != 3
        or semantic_tokens.shape[0] != b
        or (tuple(semantic_tokens.shape[1:]) not in ((n, c), (n // 2, c)))
    ):
        raise DiffalignError(
            f"semantic tokens {list(semantic_tokens.shape)} do not match the latent tokens "
            f"{list(x_t.shape)} (the semantic panel must be the visible panel's size)"
        )


class SemanticFillTransformer(nn.Module):
    """FluxTransformer2DModel (with or without LoRA) fed `[semantic(x_t) | cond]` (seed 004, 4)."""

    def __init__(
        self,
        transformer: nn.Module,
        semantic: nn.Module | None = None,
        guidance: float | None = 30.0,
    ):
        super().__init__()
        self.transformer = transformer
        self.semantic = semantic
        self.guidance = guidance

    @property
    def uses_guidance(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    def enhance(self, x_t: torch.Tensor, semantic_tokens: torch.Tensor | None) -> torch.Tensor:
        """The noisy latent tokens after the semantic module (unchanged without one)."""
        if self.semantic is None or semantic_tokens is None:
            return x_t
        check_semantic_tokens(x_t, semantic_tokens)
        return self.semantic(x_t, semantic_tokens.to(x_t.dtype))

    def forward(
        self,
        x_t: torch.Tensor,
        cond: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        text_ids: torch.Tensor,
        img_ids: torch.Tensor,
        semantic_tokens: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Velocity prediction [B, L, C] for noisy tokens `x_t` at `timestep` (t in [0, 1])."""
        hidden = torch.cat([self.enhance(x_t, semantic_tokens), cond.to(x_t.dtype)], dim=2)
        g = None
        if self.uses_guidance:
            value = guidance if guidance is not None else self.guidance
            g = torch.full([1], float(value), device=x_t.device, dtype=torch.float32)
            g = g.expand(x_t.shape[0])
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
        return self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=g,
            pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
