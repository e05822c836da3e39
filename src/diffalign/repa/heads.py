"""AlignHead, the U-Net feature hooks and the LoRA set-up of U-REPA (seed 003, sections 2.2-2.4).

- `AlignHead`: `Conv1x1(C -> hidden, bias) -> GELU -> Conv1x1(hidden -> D, no bias)`, bilinear
  upsampling to `grid x grid`, flatten to `[B, grid^2, D]`, L2 normalisation (seed 2.2 and
  appendix B). `kind="linear"` is the single-conv ablation of seed 12.1 (original U-REPA).
- `FeatureHooks`: forward hooks that keep the output of the aligned U-Net blocks: `mid`
  (`mid_block`, the seed's choice), `enc_last` (last down block, before the mid block) and
  `dec_first` (first up block). Hooks only store the latest output, so they are idempotent
  under gradient checkpointing (a recomputed forward overwrites the same entry).
- `lora_config` / `add_lora`: peft LoRA on the attention projections `to_q/to_k/to_v/to_out.0`
  of the chosen U-Net blocks (the mid block by default, seed 2.3), optionally also on the
  ResNet convolutions (`conv1/conv2`, the "conv LoRA" ablation), through `unet.add_adapter`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.engine.errors import DiffalignError

LAYERS = ("mid", "enc_last", "dec_first")
HEAD_KINDS = ("mlp", "linear")
LORA_BLOCKS = ("mid", "down", "up", "all")
ADAPTER_NAME = "repa"


class AlignHead(nn.Module):
    """Project a U-Net feature map `[B, C, h, w]` to L2-normalised tokens `[B, grid^2, D]`."""

    def __init__(
        self,
        in_channels: int,
        out_dim: int,
        hidden_dim: int = 1024,
        grid: int = 16,
        kind: str = "mlp",
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise DiffalignError(f"unknown head '{kind}' (choose from {', '.join(HEAD_KINDS)})")
        self.grid = int(grid)
        self.kind = kind
        if kind == "mlp":
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, hidden_dim, kernel_size=1, bias=True),
                nn.GELU(),
                nn.Conv2d(hidden_dim, out_dim, kernel_size=1, bias=False),
            )
        else:
            self.proj = nn.Sequential(nn.Conv2d(in_channels, out_dim, kernel_size=1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # project, then upsample (seed 2.2: cheaper than the reverse)
        if tuple(x.shape[-2:]) != (self.grid, self.grid):
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        tokens = x.flatten(2).transpose(1, 2)
        return F.normalize(tokens, dim=-1, eps=1e-6)


def layer_module(unet: nn.Module, layer: str) -> nn.Module:
    """The U-Net block whose output is the `layer` feature."""
    if layer == "mid":
        if getattr(unet, "mid_block", None) is None:
            raise DiffalignError("this U-Net has no mid block to align")
        return unet.mid_block
    if layer == "enc_last":
        return unet.down_blocks[-1]
    if layer == "dec_first":
        return unet.up_blocks[0]
    raise DiffalignError(f"unknown align layer '{layer}' (choose from {', '.join(LAYERS)})")


def layer_channels(unet: nn.Module, layer: str) -> int:
    """Channels of the `layer` feature from the U-Net config (all three are the widest level)."""
    layer_module(unet, layer)  # validates the name
    return int(unet.config.block_out_channels[-1])


def _first_tensor(output) -> torch.Tensor:
    # down blocks return (hidden_states, residuals); mid and up blocks a tensor
    return output[0] if isinstance(output, tuple | list) else output


class FeatureHooks:
    """Forward hooks on the aligned blocks; `features[layer]` is the latest output."""

    def __init__(self, unet: nn.Module, layers: Sequence[str]) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for layer in layers:
            module = layer_module(unet, layer)
            self._handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: str):
        def fn(module, args, output):
            self.features[layer] = _first_tensor(output)

        return fn

    def pop(self) -> dict[str, torch.Tensor]:
        """Return and clear the stored features (a stale feature is never reused)."""
        out, self.features = self.features, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def make_heads(
    unet: nn.Module,
    layers: Sequence[str],
    teacher_dim: int,
    hidden_dim: int = 1024,
    grid: int = 16,
    kind: str = "mlp",
) -> nn.ModuleDict:
    """One AlignHead per aligned layer, sized from the U-Net config and the teacher's width."""
    if not layers:
        raise DiffalignError("align_layers is empty: name at least one of " + ", ".join(LAYERS))
    if len(set(layers)) != len(layers):
        raise DiffalignError(f"align_layers repeats a layer: {list(layers)}")
    return nn.ModuleDict(
        {
            layer: AlignHead(layer_channels(unet, layer), teacher_dim, hidden_dim, grid, kind)
            for layer in layers
        }
    )


def lora_target_regex(blocks: Sequence[str] = ("mid",), conv: bool = False) -> str:
    """Full-match regex over U-Net module names for peft's `target_modules` (seed 2.3)."""
    parts = []
    for b in blocks:
        if b == "mid":
            parts.append(r"mid_block")
        elif b == "down":
            parts.append(r"down_blocks\.\d+")
        elif b == "up":
            parts.append(r"up_blocks\.\d+")
        elif b == "all":
            parts += [r"down_blocks\.\d+", r"mid_block", r"up_blocks\.\d+"]
        elif re.fullmatch(r"(down|up)_blocks\.\d+", b):
            parts.append(re.escape(b))
        else:
            raise DiffalignError(
                f"unknown LoRA block '{b}' (choose from {', '.join(LORA_BLOCKS)} or "
                "down_blocks.N / up_blocks.N)"
            )
    if not parts:
        raise DiffalignError("lora_blocks is empty")
    where = "|".join(dict.fromkeys(parts))
    targets = r"attentions\.\d+\..*\.(?:to_q|to_k|to_v|to_out\.0)"
    if conv:
        targets = rf"(?:{targets}|resnets\.\d+\.(?:conv1|conv2))"
    return rf"(?:{where})\.{targets}"


def lora_config(
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    blocks: Sequence[str] = ("mid",),
    conv: bool = False,
):
    """peft `LoraConfig` of the seed: rank 8, alpha 8, dropout 0, no bias, mid-block attention."""
    from peft import LoraConfig

    if rank < 1:
        raise DiffalignError(f"lora_rank must be >= 1, got {rank}")
    return LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        bias="none",
        init_lora_weights="gaussian",
        target_modules=lora_target_regex(blocks, conv),
    )


def add_lora(unet: nn.Module, config) -> list[str]:
    """Freeze the U-Net, add the LoRA adapter; returns the names of the adapted modules."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as e:
        raise DiffalignError(f"LoRA: {str(e).splitlines()[0]}") from None
    names = sorted(
        n[: -len(".lora_A." + ADAPTER_NAME)]
        for n, _ in unet.named_modules()
        if n.endswith(".lora_A." + ADAPTER_NAME)
    )
    if not names:
        raise DiffalignError("LoRA matched no U-Net module")
    return names


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (requires_grad after `add_lora`)."""
    return [p for n, p in unet.named_parameters() if p.requires_grad and "lora_" in n]
