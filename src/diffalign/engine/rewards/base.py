"""One interface for every differentiable reward (issue 7 "Rewards", seed 001 `rewards_*.py`).

A `Reward` maps decoded images in [0, 1] and their prompts to one score per image (higher is
better). `loss` is ReNO's loss for that reward, always `loss_offset - reward`:
CLIP `100 - 100 cos`, PickScore `30 - logit_scale.exp() cos`, HPS `1 - cos`,
ImageReward `2 - score`, aesthetic `10 - mlp`. Preprocessing (resize, centre crop, normalise)
runs in torch, so gradients reach the images and, through the generator, the initial noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.engine.errors import DiffalignError

# OpenAI CLIP normalisation: CLIP, the LAION aesthetic head, PickScore, HPSv2 and ImageReward
# (its `_transform`) all use it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's `Resize(size, BICUBIC)` then `CenterCrop(size)`, differentiable.

    The shorter side becomes `size` (bicubic, antialiased as torchvision does on tensors), the
    longer one `int(size * long / short)`; the crop offsets round as torchvision's do. An image
    already `size` x `size` passes unchanged (as torchvision's resize returns it as is).
    """
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
        if (new_h, new_w) != (h, w):
            images = F.interpolate(
                images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
            )
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        images = images[..., top : top + size, left : left + size]
    return images


def resize_max_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's `ResizeMaxSize(size, fill=0)` (the official HPSv2 `img_score.py` geometry),
    differentiable.

    The longer side becomes `size` (bicubic, antialiased like PIL), the shorter one
    `round(short * size / long)`; the rest is padded with 0 (black, before normalisation),
    `pad // 2` before and the remainder after. open_clip skips the padding when the longer side
    is already `size`; the model needs a square input, so we pad then too.
    """
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return images


# how an image becomes the reward model's square input: ReNO's (and our default) resize of the
# shorter side + centre crop, or open_clip's resize of the longer side + zero padding (official
# HPSv2 scoring). Square images give the same input either way.
GEOMETRIES = {"reno": resize_center_crop, "official": resize_max_pad}


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    geometry: str = "reno",
) -> torch.Tensor:
    """ReNO's reward preprocessing: resize `size` bicubic, centre crop `size`, normalise
    (`geometry="official"`: resize the longer side, pad to square, normalise)."""
    if geometry not in GEOMETRIES:
        raise DiffalignError(
            f"image geometry must be one of {', '.join(GEOMETRIES)}, got '{geometry}'"
        )
    x = GEOMETRIES[geometry](images, size)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and `requires_grad=False` on every parameter (reward models stay frozen)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoint every transformer layer of a frozen (eval-mode) transformers model.

    transformers checkpoints a `GradientCheckpointingLayer` only while that layer is in
    training mode; the layers themselves hold no dropout (their sub-modules do, and stay in
    eval), so flagging just the layer modules turns checkpointing on without changing outputs.
    Done per layer (not `gradient_checkpointing_enable`), which also covers models that do not
    declare support, such as `BlipTextModel`. ReNO checkpoints its reward models to fit
    SDXL-Turbo at 512 px. Returns the number of checkpointed layers.
    """
    import functools

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            m.training = True
            n += 1
    return n


def no_init_weights():
    """transformers' context that skips random initialisation (the weights are loaded next)."""
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights as ctx
    return ctx()


def _check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> list[str]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DiffalignError(f"reward: images must be a [B, 3, H, W] tensor in [0, 1], got {shape}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p) for p in prompts]
    if len(prompts) == 1 and images.shape[0] > 1:
        prompts = prompts * images.shape[0]
    if len(prompts) != images.shape[0]:
        raise DiffalignError(
            f"reward: {images.shape[0]} images but {len(prompts)} prompts (need one per image)"
        )
    return prompts


class Reward(nn.Module):
    """A frozen, differentiable reward: `forward(images [B,3,H,W] in [0,1], prompts) -> [B]`.

    Subclasses set `name`, `loss_offset` and implement `score(images, prompts)` on the raw
    [0, 1] images (they preprocess with `clip_preprocess`). The returned tensor is float32; a
    NaN or infinite reward is a DiffalignError (the optimiser must not silently walk off).
    """

    name: str = "reward"
    loss_offset: float = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.training = False  # frozen from the start; `train()` below keeps it so
        # name -> detached reward of the latest call (one entry; CombinedReward: one per term)
        self.last_terms: dict[str, torch.Tensor] = {}

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        prompts = _check_inputs(images, prompts)
        out = self.score(images, prompts).float().reshape(-1)
        if not torch.isfinite(out).all():
            raise DiffalignError(
                f"reward '{self.name}' is not finite (NaN or inf) for "
                f"{int((~torch.isfinite(out)).sum())} of {out.numel()} images"
            )
        self.last_terms = {self.name: out.detach()}
        return out

    def loss(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        """ReNO's per-image loss: `loss_offset - reward` (lower is better)."""
        return self.loss_offset - self(images, prompts)

    def train(self, mode: bool = True) -> Reward:  # noqa: ARG002 - rewards stay frozen
        """Rewards are always in eval mode; `.train()` keeps them so (no dropout at reward time)."""
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, loss_offset={self.loss_offset}"


class CombinedReward(Reward):
    """Weighted sum of named rewards (ReNO's `--reward hpsv2:5,imagereward:1,...`).

    `forward` = sum_i w_i reward_i, `loss` = sum_i w_i loss_i (ReNO's total loss), and
    `last_terms` holds each term's unweighted reward of the latest call (for per-term curves;
    a single reward's `last_terms` is `{name: reward}`).
    """

    def __init__(self, terms: Sequence[tuple[str, float, Reward]], name: str | None = None):
        super().__init__()
        if not terms:
            raise DiffalignError("reward: a combined reward needs at least one term")
        self.names = [t[0] for t in terms]
        self.weights = [float(t[1]) for t in terms]
        self.rewards = nn.ModuleList([t[2] for t in terms])
        self.name = name or ",".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights))
        self.loss_offset = sum(w * r.loss_offset for w, r in zip(self.weights, self.rewards))

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        prompts = _check_inputs(images, prompts)
        total = None
        terms: dict[str, torch.Tensor] = {}
        # terms that share a model (hybrid's clip + aesthetic) embed the images once
        shared = {id(b): b for r in self.rewards if (b := getattr(r, "bundle", None)) is not None}
        for bundle in shared.values():
            bundle.memo = {}
        try:
            for name, weight, reward in zip(self.names, self.weights, self.rewards):
                value = reward(images, prompts)
                terms[name] = value.detach()
                total = weight * value if total is None else total + weight * value
        finally:
            for bundle in shared.values():
                bundle.memo = None
        self.last_terms = terms
        return total

    def extra_repr(self) -> str:
        return f"terms={list(zip(self.names, self.weights))}"
