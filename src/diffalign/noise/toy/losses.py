"""The toy branch's losses as pure tensor functions (spec N: Toy branch; seed 001).

- GAN: hinge losses for the discriminator and the generator.
- Assignment / SFT: per-item reconstruction ``mean (G - x)^2 + l1_weight * mean |G - x|``.
- Preserve: ``mean (G(eps, y) - G_base(eps, y))^2`` on fresh random noise, which keeps the
  fine-tuned generator's random-noise behaviour close to the frozen base (seed: "preserve loss
  against the frozen teacher generator").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``E relu(1 - D(x)) + E relu(1 + D(G(z)))``."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: ``-E D(G(z))``."""
    return -fake_logits.mean()


def per_item_reconstruction(
    output: torch.Tensor, target: torch.Tensor, l1_weight: float = 0.0
) -> torch.Tensor:
    """``[B]``: per-item mean squared error plus ``l1_weight`` times mean absolute error (the
    generic :func:`diffalign.noise.assign.assign_loss` with the output as latent and image)."""
    from diffalign.noise.assign import assign_loss

    return assign_loss(output, target, output, target, 1.0, l1_weight)


def reconstruction_loss(
    output: torch.Tensor, target: torch.Tensor, l1_weight: float = 0.0
) -> torch.Tensor:
    """Batch mean of :func:`per_item_reconstruction`."""
    return per_item_reconstruction(output, target, l1_weight).mean()


def preserve_loss(output: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
    """Mean squared distance to the frozen base generator's output on the same noise/labels
    (the preserve term of `diffalign.noise.sft.MatchedSftTask` with the latent weight only)."""
    from diffalign.noise.assign import assign_loss

    return assign_loss(output, base_output.detach()).mean()
