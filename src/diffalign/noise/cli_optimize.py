"""`diffalign noise optimize` (spec N: test-time optimisation; the seed's `cli_sdxl_reward`,
`cli_pickscore`, `cli_imagereward` and `cli_hpsv2` in one verb). Parsing only."""

from __future__ import annotations


def add_optimize_options(
    p, *, steps: int = 30, lr: float = 5e-4, patch_size: int = 2, images_per_prompt: int = 1
) -> None:
    """The optimisation options shared by `noise optimize` and `noise toy optimize`."""
    from diffalign.engine.cliutils import (
        nonneg_float,
        nonneg_int,
        positive_float,
        positive_int,
        seed_int,
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--steps",
        type=positive_int,
        default=steps,
        help="optimiser steps; the reward is evaluated steps + 1 times, step 0 being the base "
        "noise (default: %(default)s)",
    )
    g.add_argument(
        "--lr", type=positive_float, default=lr, help="learning rate (default: %(default)s)"
    )
    g.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="adam: the seed's AdamW; sgd: ReNO's SGD with Nesterov momentum 0.9 and a "
        "per-prompt gradient-norm clip of 0.1 (default: %(default)s)",
    )
    g.add_argument(
        "--patch-size",
        type=positive_int,
        default=patch_size,
        help="side p of the latent patches Q acts on; D = C p^2 (default: %(default)s)",
    )
    g.add_argument(
        "--parametrization",
        choices=("matrix_exp", "cayley"),
        default="matrix_exp",
        help="map from a skew-symmetric matrix to Q (default: %(default)s)",
    )
    g.add_argument(
        "--noise-l2-weight",
        type=nonneg_float,
        default=1e-3,
        help="weight of the seed's drift regulariser mean((Q z - z)^2) (default: %(default)s)",
    )
    g.add_argument(
        "--weight-decay",
        type=nonneg_float,
        default=0.0,
        help="optimizer weight decay on the free parameter of Q (default: %(default)s)",
    )
    g.add_argument(
        "--grad-clip",
        type=positive_float,
        default=None,
        help="per-prompt gradient-norm clip (default: 0.1 with sgd, none with adam)",
    )
    g.add_argument(
        "--images-per-prompt",
        type=positive_int,
        default=images_per_prompt,
        help="noises per prompt sharing the prompt's Q (the seed's per-prompt batch; "
        "default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=seed_int,
        default=42 if images_per_prompt == 1 else 0,
        help="seed of the base noise (the same noise for every prompt, as the seed; "
        "default: %(default)s)",
    )
    g.add_argument(
        "--save-every",
        type=nonneg_int,
        default=1,
        help="write step_NNN.png every N steps (0: none; default: %(default)s)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --output-dir that already holds a run",
    )


def settings_from_args(args):
    from diffalign.noise.optimize import OptimizeSettings

    return OptimizeSettings(
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        patch_size=args.patch_size,
        parametrization=args.parametrization,
        noise_l2_weight=args.noise_l2_weight,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        images_per_prompt=args.images_per_prompt,
    )
