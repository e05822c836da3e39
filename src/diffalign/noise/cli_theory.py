"""`diffalign noise theory` (spec N: Noise diagnostics; seed 001 `cli_noise_theory`)."""

from __future__ import annotations

from diffalign.engine.cliutils import nonneg_int, positive_float, positive_int, seed_int


def register(verbs) -> None:
    p = verbs.add_parser(
        "theory",
        help="verify over many samples that Q z stays standard Gaussian (and what is not exact)",
        description=(
            "Stream many fresh Gaussian latents through (1) a fixed Haar-random orthogonal Q and "
            "(2) a Q optimised on a fixed batch, and check Q z against N(0, I); then (3) optimise "
            "one Q_i per sample after seeing it and show that patch norms are kept exactly while "
            "the collection is no longer i.i.d. N(0, I). Writes <case>.png/.json, summary.json "
            "and theory.md."
        ),
    )
    p.add_argument("--output-dir", required=True, help="folder for the plots, JSON and theory.md")
    p.add_argument(
        "--channels", type=positive_int, default=4, help="latent channels C (default: %(default)s)"
    )
    p.add_argument(
        "--patch-size",
        type=positive_int,
        default=2,
        help="patch side p; D = C p^2 (default: %(default)s)",
    )
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=65536,
        help="fresh latents streamed per fixed-Q case (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=4096,
        help="latents per streamed batch (default: %(default)s)",
    )
    p.add_argument(
        "--latent-size",
        type=positive_int,
        default=None,
        help="latent height = width; must be a multiple of the patch size (default: 4 * patch size)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--opt-steps",
        type=nonneg_int,
        default=200,
        help="Adam steps for the optimised Q's (default: %(default)s)",
    )
    p.add_argument(
        "--per-sample-count",
        type=positive_int,
        default=512,
        help="latents that get their own optimised Q_i (capped at --num-samples; default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=0.05, help="Adam learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--parametrization",
        choices=("cayley", "matrix_exp"),
        default="cayley",
        help="map from skew-symmetric matrices to Q (default: %(default)s)",
    )
    p.set_defaults(func=_run_theory)


def _run_theory(args) -> int:
    from diffalign.noise.theory import run_noise_theory

    summary = run_noise_theory(
        args.output_dir,
        channels=args.channels,
        patch_size=args.patch_size,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        latent_size=args.latent_size,
        seed=args.seed,
        opt_steps=args.opt_steps,
        per_sample_count=args.per_sample_count,
        lr=args.lr,
        parametrization=args.parametrization,
    )
    for name, case in summary["cases"].items():
        print(
            f"{name:24s} KS(Qz vs N(0,1)) {case['qz_ks_statistic']:.2e}  "
            f"cov err {case['qz_patch_cov_error_fro_over_d']:.2e}  "
            f"max patch-norm diff {case['patch_norm_max_abs_diff']:.1e}"
        )
    status = "all checks passed" if summary["all_checks_passed"] else "SOME CHECKS FAILED"
    print(f"{status}; wrote {args.output_dir}/summary.json and theory.md")
    return 0
