"""U-REPA's losses as pure tensor functions (seed 003, section 4).

    L_total = L_diff + lambda(step) * (L_token + w * L_manifold)

Every function takes `[B, N, D]` token tensors (AlignHead output, teacher tokens) and returns a
scalar computed in fp32 (seed 8.1: "loss computation in FP32" even under bf16 autocast): the
alignment losses switch autocast off for their own device, since autocast would otherwise run
their matrix products (`einsum`) in bf16 whatever the inputs' dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from diffalign.engine.errors import DiffalignError

_EPS = 1e-6  # seed 8.1 safe_normalize


def _check_pair(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.dim() != 3 or target.dim() != 3:
        raise DiffalignError(
            f"{what}: expected [B, N, D] tokens, got {list(pred.shape)} and {list(target.shape)}"
        )
    if pred.shape != target.shape:
        raise DiffalignError(
            f"{what}: prediction {list(pred.shape)} and target {list(target.shape)} differ"
        )


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=_EPS)


def _fp32(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on `x`'s device (CPU, CUDA, ...): the products inside run in the inputs'
    dtype (fp32 after `.float()`), not in the autocast dtype."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def token_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of `1 - cos(pred_i, target_i)` (seed 4.3), fp32 scalar."""
    _check_pair(pred, target, "token_loss")
    with _fp32(pred):
        p = _normalize(pred.float())
        t = _normalize(target.float())
        return (1.0 - (p * t).sum(dim=-1)).mean()


def manifold_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask_diag: bool = True,
    upper_only: bool = True,
) -> torch.Tensor:
    """MSE between the Gram matrices of mean-pooled, L2-normalised samples (seed 4.4), fp32.

    `G = norm(mean_N(x)) norm(mean_N(x))^T` for prediction and target; `diff = G_p - G_t` with
    the diagonal zeroed when `mask_diag`; with `upper_only` the loss is the mean of `diff^2`
    over the strict upper triangle (`i < j`), otherwise the mean over all `B x B` entries. A
    batch of one sample has no pair: the loss is 0 (not NaN).
    """
    _check_pair(pred, target, "manifold_loss")
    with _fp32(pred):
        p = _normalize(pred.float().mean(dim=1))
        t = _normalize(target.float().mean(dim=1))
        diff = torch.einsum("bd,cd->bc", p, p) - torch.einsum("bd,cd->bc", t, t)
        if mask_diag:
            diff = diff - torch.diag_embed(torch.diagonal(diff))
        if upper_only:
            b = diff.shape[0]
            if b < 2:
                return diff.sum() * 0.0
            mask = torch.triu(torch.ones_like(diff), diagonal=1)
            return ((diff * mask) ** 2).sum() / mask.sum()
        return (diff**2).mean()


def align_coeff(step: int, max_coeff: float = 0.5, warmup_steps: int = 3000) -> float:
    """Alignment weight lambda after `step` optimizer steps: `max * step / warmup`, then `max`
    (seed 4.5; `warmup_steps = 0` gives `max` from step 0, the "no warm-up" ablation)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(max_coeff)
    return float(max_coeff) * max(step, 0) / warmup_steps


def cap_loss(loss: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly guard of seed 10.3: a loss above `cap` is scaled down to `cap` (its gradient keeps
    its direction, scaled by `cap / loss`); returns (loss used, 1.0 if capped else 0.0). A hard
    clamp would instead drop the gradient on exactly the batches that spike. No host sync."""
    if cap is None:
        return loss, torch.zeros((), device=loss.device)
    over = loss.detach() > cap
    scale = torch.where(over, cap / loss.detach().clamp_min(1e-12), torch.ones_like(loss))
    return loss * scale, over.float()


def total_loss(
    diffusion: torch.Tensor,
    token: torch.Tensor,
    manifold: torch.Tensor,
    coeff: float,
    manifold_weight: float = 3.0,
) -> torch.Tensor:
    """`L_diff + lambda * (L_token + w * L_manifold)` (seed 4.1), fp32."""
    return diffusion.float() + coeff * (token.float() + manifold_weight * manifold.float())


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion `z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` (seed 4.2)."""
    a = _per_sample(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def diffusion_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """What the U-Net regresses (seed 4.2): `v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0` for
    v-prediction (the seed), `eps` for epsilon (SD 1.5's own pretraining objective)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type != "v_prediction":
        raise DiffalignError(
            f"unknown prediction_type '{prediction_type}' (choose v_prediction or epsilon)"
        )
    a = _per_sample(alphas_cumprod, t, x0)
    return a.sqrt() * noise - (1.0 - a).sqrt() * x0


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`L_diff`: mean squared error over every element, in fp32 (seed 4.2)."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _per_sample(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.long().to(like.device)]
    return a.view(-1, *([1] * (like.dim() - 1)))
