"""Flow-matching math of the FLUX Fill trainer (spec F; seed 004 section 2.4 and 6).

Pure tensor functions, no I/O: the interpolation `x_t = (1 - t) x_0 + t x_1` between the clean
latents `x_0` and the noise `x_1`, the velocity target `x_1 - x_0`, the MSE over all tokens or
only the masked (target) tokens, timestep sampling (uniform as in the seed, logit-normal and mode
as in diffusers' SD3/FLUX trainers) and FLUX's resolution-dependent time shift.
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLING = ("uniform", "logit-normal", "mode")
LOSS_REGIONS = ("all", "target")


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`x_t = (1 - t) x_0 + t x_1` with one `t` per sample (seed 004, 2.4)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - t) * x0 + t * x1


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The flow-matching target `x_1 - x_0` (seed 004, 6)."""
    return x1 - x0


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between `pred` and `target` ([B, L, C]); with `token_weight` [B, L] (1 on the tokens
    that count, e.g. the masked target half) the mean runs over the weighted tokens only."""
    err = (pred.float() - target.float()) ** 2
    if token_weight is None:
        return err.mean()
    w = token_weight.float().unsqueeze(-1).expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1e-12)


def target_token_weight(cond: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """1 on tokens whose fill mask is set (mean of the mask channels of the fill condition
    `[masked-image latents | packed mask]` > 0.5), else 0: the `--loss-region target` tokens."""
    mask = cond[..., latent_channels:].float().mean(-1)
    return (mask > 0.5).to(cond.dtype)


def time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's resolution-dependent shift `e^mu / (e^mu + (1/t - 1))` (diffusers'
    FlowMatchEulerDiscreteScheduler, exponential type, sigma = 1); t = 0 stays 0."""
    t = t.clamp(0.0, 1.0)
    e = math.exp(mu)
    return torch.where(t > 0, e * t / (e * t + (1.0 - t)), torch.zeros_like(t))


def shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """`mu` of the shift for `image_seq_len` tokens: the pipeline's own `calculate_shift`."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

    return float(calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift))


def sample_timesteps(
    scheme: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    mu: float | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`t` in [0, 1] per sample: `uniform` (the seed), `logit-normal` or `mode` through diffusers'
    `compute_density_for_timestep_sampling`, then `time_shift(t, mu)` when `mu` is given.

    `t` is the drawn `u` itself (the SD3 paper's logit-normal over the noise level). diffusers'
    FLUX trainers index their scheduler with `u` and get `sigma = 1 - u` (to 1/1000): the same
    distribution at `logit_mean` 0 and for `mode`, mirrored for another mean."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"unknown timestep sampling '{scheme}'")
    names = {"uniform": "none", "logit-normal": "logit_normal", "mode": "mode"}
    t = compute_density_for_timestep_sampling(
        names[scheme],
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    if mu is not None:
        t = time_shift(t, mu)
    return t
