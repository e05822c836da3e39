"""`diffalign noise toy optimize` (spec N: the test-time optimisation proof on real digits)."""

from __future__ import annotations


def register(sub) -> None:
    from diffalign.engine.cliutils import positive_int
    from diffalign.noise.cli_optimize import add_optimize_options

    p = sub.add_parser(
        "optimize",
        help="test-time optimisation of one orthogonal Q per class against the toy classifier "
        "reward, with the proof that it works",
        description="Optimise one patch-wise orthogonal Q per class (the classes are the "
        "prompts) so that the generator's images score higher under the classifier trained on "
        "the real train split (reward = log p(class | image)). Writes the `noise optimize` "
        "layout (prompt_{i}/ with best.png, step images, reward_history.{png,json}, "
        "orthogonal_gaussian_{init,final}.{png,json}, summary.json) and summary.json['proof']: "
        "the reward rises, Q stays orthogonal, and Q z on fresh noise passes the KS test.",
    )
    p.add_argument(
        "--generator-ckpt",
        required=True,
        help="toy generator: a train-gan run folder or its generator.safetensors",
    )
    p.add_argument("--output-dir", required=True, help="run folder to write")
    p.add_argument(
        "--reward",
        default="classifier",
        help="toy reward: classifier (log p(class | image) under the evaluation classifier; "
        "the only toy reward; default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        choices=("digits", "mnist", "cifar10"),
        default=None,
        help="expected dataset (default: the generator's)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the MNIST / CIFAR-10 files (to train the classifier; not for digits)",
    )
    p.add_argument(
        "--classifier-ckpt",
        default=None,
        help="reuse a classifier run folder (e.g. from `noise toy evaluate`) instead of training",
    )
    p.add_argument(
        "--classifier-steps",
        type=positive_int,
        default=600,
        help="steps to train the classifier on the real train split (default: %(default)s)",
    )
    p.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="classes to optimise, e.g. 0 3 7 or 'digit 3' (default: every class)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="classes optimised together, one Q each (default: all at once)",
    )
    p.add_argument(
        "--heldout-noise",
        type=positive_int,
        default=4096,
        help="fresh latents for the KS check of Q z and the held-out reward (default: %(default)s)",
    )
    add_optimize_options(p, steps=60, lr=0.05, patch_size=2, images_per_prompt=16, seed=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from diffalign.noise.cli_optimize import settings_from_args
    from diffalign.noise.toy.models import limit_threads
    from diffalign.noise.toy.optimize import toy_optimize

    limit_threads()
    s = toy_optimize(
        args.generator_ckpt,
        args.output_dir,
        reward=args.reward,
        dataset=args.dataset,
        data_dir=args.data_dir,
        classifier_ckpt=args.classifier_ckpt,
        classifier_steps=args.classifier_steps,
        classes=args.classes,
        settings=settings_from_args(args),
        batch_size=args.batch_size,
        seed=args.seed,
        heldout_noise=args.heldout_noise,
        save_every=args.save_every,
        overwrite=args.overwrite,
    )
    from diffalign.noise.toy.optimize import format_proof_table

    proof = s["proof"]
    print(format_proof_table(proof["table"]))
    print(
        f"mean reward (log p) step 0 {proof['mean_reward_step0']:.3f} -> last "
        f"{proof['mean_reward_last']:.3f} (best {proof['mean_reward_best']:.3f}); rises for "
        f"{proof['fraction_classes_reward_rises']:.0%} of classes; max |Q^T Q - I| "
        f"{proof['max_orthogonality_error']:.1e}; min KS p of Q z on fresh noise "
        f"{proof['min_fresh_qz_ks_pvalue']:.3f}; held-out gain within "
        f"noise: {proof['checks']['heldout_gain_within_noise']}"
    )
    if proof["reward_saturated"]:
        p_class = proof["heldout_mean_p_class_identity"]
        print(
            f"note: the reward is saturated (mean p(class) {p_class:.4f} with Q = I): log p has "
            "no room to rise; for an informative run use a weaker generator, e.g. "
            "`noise toy train-gan --max-steps 300`"
        )
    status = "all checks passed" if proof["all_checks_passed"] else "SOME CHECKS FAILED"
    print(f"{status}; wrote {args.output_dir}/summary.json")
    return 0 if proof["all_checks_passed"] else 1
