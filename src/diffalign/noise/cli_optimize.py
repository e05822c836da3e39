"""`diffalign noise optimize` (spec N: test-time optimisation; the seed's `cli_sdxl_reward`,
`cli_pickscore`, `cli_imagereward` and `cli_hpsv2` in one verb). Parsing only."""

from __future__ import annotations


def add_optimize_options(
    p,
    *,
    steps: int = 30,
    lr: float = 5e-4,
    patch_size: int = 2,
    images_per_prompt: int = 1,
    seed: int = 42,
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
        default=seed,
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


def register(verbs) -> None:
    """Add `diffalign noise optimize`."""
    from diffalign.engine.cliutils import positive_int
    from diffalign.engine.rewards import add_reward_arguments
    from diffalign.noise.cli_data import add_generator_options

    p = verbs.add_parser(
        "optimize",
        help="test-time optimisation of the orthogonal noise transform against a reward",
        description="For each prompt, optimise one patch-wise orthogonal Q on a fixed Gaussian "
        "base noise z so that the one-step generator's image G(Q z, prompt) maximises the "
        "reward (minus the seed's small drift term). Several prompts are optimised as one batch "
        "with one Q each (--batch-size). One prompt writes into --output-dir; several write "
        "--output-dir/prompt_{i}/. Per prompt: init.png, step_NNN.png, best.png, final_best.png, "
        "best_noise.safetensors, adapter_final.safetensors, reward_history.{png,json}, "
        "orthogonal_gaussian_{init,final}.{png,json}, summary.json.",
    )
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt (repeat the option for several)",
    )
    g.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="prompt file: .txt (one a line), .jsonl (a 'prompt' field), COCO captions or "
        "GenEval metadata",
    )
    add_generator_options(p)
    add_reward_arguments(p, default="clip")
    p.add_argument(
        "--output-dir",
        default="outputs/test_time_oft_noise",
        help="output folder (default: %(default)s, the seed's)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="prompts optimised together in one batch, one Q each (default: %(default)s)",
    )
    add_optimize_options(p)
    p.add_argument(
        "--final-steps",
        type=positive_int,
        default=None,
        help="after optimising, re-render each best noise with this many steps of the same "
        "model, saved as best_{K}step.png beside best.png (ReNO: 4 for flux-schnell; needs a "
        "generator with multi-step sampling)",
    )
    p.set_defaults(func=_run)


def _prompts_from_args(args) -> list[str]:
    from diffalign.engine.errors import DiffalignError
    from diffalign.noise.optimize import read_prompts_file

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts_file(args.prompts)
    if not prompts:
        raise DiffalignError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _run(args) -> int:
    from diffalign.engine.distributed import check_device
    from diffalign.engine.errors import DiffalignError
    from diffalign.engine.rewards import (
        REWARD_NAMES,
        parse_reward_spec,
        reward_from_args,
        reward_spec_from_args,
    )
    from diffalign.noise.cli_data import check_speed_options, speed_up
    from diffalign.noise.generators import load_generator
    from diffalign.noise.optimize import check_final_steps, run_optimize

    prompts = _prompts_from_args(args)
    check_device(args.device)  # before minutes of model loading
    settings = settings_from_args(args)
    settings.validate()
    spec = reward_spec_from_args(args)
    for name, _ in parse_reward_spec(spec):  # before minutes of model loading
        if name not in REWARD_NAMES:
            raise DiffalignError(f"unknown reward '{name}'; valid names: {', '.join(REWARD_NAMES)}")
    check_speed_options(args, args.device)
    generator = load_generator(
        args.model,
        args.generator,
        weights=args.weights,
        dtype=args.dtype,
        device=args.device,
        vae=args.vae,
        height=args.height,
        width=args.width,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        num_steps=args.num_steps,
    )
    check_final_steps(generator, args.final_steps)  # before the reward model loads
    reward = reward_from_args(args, device=generator.device, dtype="float32")
    speed_up(args, generator, reward)
    report = run_optimize(
        generator,
        reward,
        prompts,
        args.output_dir,
        settings,
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        seed=args.seed,
        save_every=args.save_every,
        overwrite=args.overwrite,
        final_steps=args.final_steps,
        run_info={
            "command": "noise optimize",
            "model": args.model,
            "generator": generator.name,
            "reward": spec,
            "dtype": args.dtype,
            "vae": args.vae,
            "num_steps": getattr(generator, "num_steps", 1),
            "height": generator.height if args.height is None else args.height,
            "width": generator.width if args.width is None else args.width,
        },
    )
    s = report.summary
    print(
        f"{s['num_ok']}/{s['num_prompts']} prompts optimised; mean reward "
        f"{s.get('mean_init_reward', float('nan')):.4f} -> best "
        f"{s.get('mean_best_reward', float('nan')):.4f} ({args.output_dir}/summary.json)"
    )
    return 0 if s["num_failed"] == 0 else 1
