"""`diffalign noise toy ...` and `diffalign demo` (spec N: Toy branch).

Parsing only; the work is in `diffalign.noise.toy` (`train_gan`, `assign`, `sft`, `direct_sft`,
`em`, `evaluate_runs`, `run_demo`). Heavy imports happen inside the handlers.
"""

from __future__ import annotations

from diffalign.engine.cliutils import (
    make_subparsers,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    seed_int,
    unit_float,
)

_DATASETS = ("digits", "mnist", "cifar10")


def _data_options(p, dataset_default: str | None = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=_DATASETS,
        default=dataset_default,
        help="digits (scikit-learn's bundled 8x8 digits, no download), mnist (official IDX "
        "files) or cifar10 (official python batches)"
        + (
            " (default: %(default)s)"
            if dataset_default
            else " (default: the dataset the generator was trained on)"
        ),
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with the MNIST IDX files or with cifar-10-batches-py/ (not needed for digits)",
    )


def _split_options(p) -> None:
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="which split to use (default: %(default)s; digits: fixed 1497/300 split, "
        "mnist/cifar10: the official train/test files)",
    )
    p.add_argument(
        "--test-split",
        dest="split",
        action="store_const",
        const="test",
        help="the seed's spelling of --split test",
    )


def _generator_option(p, required: bool = True) -> None:
    p.add_argument(
        "--generator-ckpt",
        required=required,
        help="generator to start from: a run folder (e.g. the train-gan --output-dir) or its "
        "generator.safetensors",
    )


def _train_options(p, epochs_default, lr_default: float, batch_default: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs",
        type=positive_int,
        default=epochs_default,
        help="passes over the training items"
        + (
            " (default: %(default)s)"
            if epochs_default
            else " (default: 250 digits, 10 mnist, 20 cifar10)"
        ),
    )
    g.add_argument(
        "--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)"
    )
    g.add_argument(
        "--lr", type=positive_float, default=lr_default, help="learning rate (default: %(default)s)"
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_default,
        help="batch size (default: %(default)s)",
    )
    g.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output-dir that already holds a training run",
    )
    g.add_argument(
        "--resume",
        default=None,
        help="resume a run: 'latest' or a checkpoint folder under OUTPUT_DIR/checkpoints",
    )
    _checkpoint_option(g)
    _tracker_option(g, "OUTPUT_DIR/logs")


def _tracker_option(g, logs: str) -> None:
    g.add_argument(
        "--tracker",
        choices=("none", "tensorboard", "wandb"),
        default="tensorboard",
        help=f"experiment tracker, logging to {logs} (default: %(default)s)",
    )


def _checkpoint_option(g) -> None:
    g.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=100,
        help="write a resumable checkpoint every N optimizer steps, besides the final one "
        "(default: %(default)s; 0 = only at the end)",
    )


def _sft_options(p) -> None:
    p.add_argument(
        "--preserve-weight",
        type=nonneg_float,
        default=0.25,
        help="weight of the preserve loss against the frozen base generator on fresh random "
        "noise (default: %(default)s; 0 turns it off)",
    )
    p.add_argument(
        "--l1-weight",
        type=nonneg_float,
        default=0.0,
        help="weight of the pixel L1 term added to the MSE (default: %(default)s)",
    )
    p.add_argument(
        "--base-ckpt",
        default=None,
        help="frozen generator of the preserve loss (default: --generator-ckpt)",
    )


def _assign_options(p, with_lr: bool = True) -> None:
    g = p.add_argument_group("assignment")
    g.add_argument(
        "--assign-steps",
        type=positive_int,
        default=100,
        help="Adam steps on each item's orthogonal Q, >= 1 (default: %(default)s)",
    )
    if with_lr:
        g.add_argument(
            "--lr",
            type=positive_float,
            default=0.05,
            help="assignment learning rate (default: %(default)s)",
        )
    else:
        g.add_argument(
            "--assign-lr",
            type=positive_float,
            default=0.05,
            help="assignment learning rate (default: %(default)s)",
        )
    g.add_argument(
        "--patch-size",
        type=positive_int,
        default=2,
        help="patch size of the orthogonal transform on the latent (default: %(default)s; "
        "2 gives D = 16 for the 4-channel latent)",
    )
    g.add_argument(
        "--parametrization",
        choices=("matrix_exp", "cayley"),
        default="matrix_exp",
        help="how Q is built from a skew matrix (default: %(default)s)",
    )
    g.add_argument(
        "--max-items",
        type=positive_int,
        default=None,
        help="assign only the first N items of the split (default: all)",
    )


def register(verbs) -> None:
    """Add `diffalign noise toy {train-gan,assign,sft,direct-sft,em,evaluate}`."""
    toy = verbs.add_parser(
        "toy",
        help="toy one-step generators on digits / MNIST / CIFAR-10",
        description="The orthogonal-noise pipeline on small real image data: train a one-step "
        "class-conditional GAN generator, assign matched noises, fine-tune (matched or direct), "
        "EM, and a held-out evaluation. `diffalign demo` runs all of it on digits.",
    )
    sub = make_subparsers(toy)

    p = sub.add_parser(
        "train-gan",
        help="train the base one-step class-conditional generator",
        description="Hinge GAN with a projection discriminator on the train split; writes "
        "OUTPUT_DIR/checkpoint-final/generator.safetensors, sample grids under validation/, "
        "train_history.png and train_summary.json.",
    )
    _data_options(p)
    p.add_argument("--output-dir", required=True, help="run folder to write")
    p.add_argument(
        "--max-items", type=positive_int, default=None, help="train on the first N items only"
    )
    p.add_argument(
        "--ema-decay",
        type=unit_float,
        default=0.999,
        help="EMA of the weights (default: %(default)s)",
    )
    _train_options(p, None, 2e-4, 128)
    p.set_defaults(func=_run_train_gan)

    p = sub.add_parser(
        "assign",
        help="assign a matched noise to every target image (orthogonal Q per item)",
        description="For each target, optimise an orthogonal Q on a fixed per-item base noise "
        "so G(Q eps, label) matches it. Writes manifest.jsonl, samples/NNNNNN/noise.safetensors "
        "+ meta.json, failures.jsonl, summary.json and noise diagnostics. Resumable: a re-run "
        "skips finished items. Shards items across processes under `accelerate launch`.",
    )
    _generator_option(p)
    _data_options(p, None)
    _split_options(p)
    p.add_argument("--output-dir", required=True, help="dataset folder to write (or resume)")
    _assign_options(p)
    p.add_argument(
        "--l1-weight",
        type=nonneg_float,
        default=0.0,
        help="pixel L1 weight added to the MSE (default: 0)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="items optimised together (default: %(default)s)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the base noises (default: 0)")
    p.set_defaults(func=_run_assign)

    p = sub.add_parser(
        "sft",
        help="latent-matched SFT on an assignment manifest",
        description="Fine-tune the generator on (assigned noise -> target) with an MSE loss plus "
        "--preserve-weight times the preserve loss against the frozen base on fresh noise.",
    )
    _generator_option(p)
    p.add_argument(
        "--manifest-path", required=True, help="manifest.jsonl written by `assign` (or its folder)"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=_DATASETS,
        default=None,
        help="expected dataset, checked against the generator and the manifest (default: the "
        "generator's)",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="not needed: the targets are read from the manifest's noise files (accepted so "
        "that every toy command takes the same data options)",
    )
    p.add_argument("--output-dir", required=True, help="run folder to write")
    _sft_options(p)
    _train_options(p, 5, 1e-4, 64)
    p.set_defaults(func=_run_sft)

    p = sub.add_parser(
        "direct-sft",
        help="baseline: SFT on the same targets with fresh random noise",
        description="Same loss, steps and learning rate as `sft`, but every step draws fresh "
        "N(0, I) noise instead of the assigned one. Targets: --manifest-path's items (the same "
        "targets as a matched run) or the first --max-items of the split.",
    )
    _generator_option(p)
    _data_options(p, None)
    _split_options(p)
    p.add_argument(
        "--manifest-path", default=None, help="take the targets of this assignment manifest"
    )
    p.add_argument(
        "--max-items", type=positive_int, default=None, help="first N items of the split"
    )
    p.add_argument("--output-dir", required=True, help="run folder to write")
    _sft_options(p)
    _train_options(p, 5, 1e-4, 64)
    p.set_defaults(func=_run_direct_sft)

    p = sub.add_parser(
        "em",
        help="EM loop: assign (E) with the current model, then matched SFT (M), repeated",
        description="Each cycle writes OUTPUT_DIR/cycle-NNN/{assign,sft}; the next cycle starts "
        "from the last checkpoint. Cycle k assigns fresh base noise with seed --seed + 1000 k "
        "(as `noise em`). Re-running resumes (finished cycles are kept).",
    )
    _generator_option(p)
    _data_options(p, None)
    _split_options(p)
    p.add_argument("--output-dir", required=True, help="work folder")
    p.add_argument(
        "--num-cycles",
        type=positive_int,
        default=2,
        help="number of E+M cycles (default: %(default)s)",
    )
    _assign_options(p, with_lr=False)
    _sft_options(p)
    g = p.add_argument_group("M-step")
    g.add_argument(
        "--epochs", type=positive_int, default=5, help="SFT epochs per cycle (default: 5)"
    )
    g.add_argument("--max-steps", type=positive_int, default=None, help="SFT steps per cycle")
    g.add_argument(
        "--lr", type=positive_float, default=1e-4, help="SFT learning rate (default: 1e-4)"
    )
    g.add_argument(
        "--batch-size", type=positive_int, default=64, help="SFT batch size (default: 64)"
    )
    g.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    _checkpoint_option(g)
    _tracker_option(g, "OUTPUT_DIR/cycle-NNN/sft/logs")
    g.add_argument(
        "--resume",
        choices=("latest", "restart"),
        default="latest",
        help="an unfinished M-step: latest = continue from its last checkpoint, restart = start "
        "it over (finished cycles are always kept; default: %(default)s)",
    )
    p.set_defaults(func=_run_em)

    p = sub.add_parser(
        "evaluate",
        help="held-out evaluation of one or more generators (the demo's metrics)",
        description="Held-out reconstruction MSE after assignment, and class accuracy / "
        "Frechet distance of random-noise samples under a classifier trained on the real train "
        "split (trained here, or loaded with --classifier-ckpt).",
    )
    p.add_argument(
        "--generator-ckpt",
        nargs="+",
        required=True,
        help="one or more generator run folders or weights files",
    )
    p.add_argument("--names", nargs="+", default=None, help="names for the table (default: paths)")
    _data_options(p, None)
    p.add_argument("--output-dir", required=True, help="folder for summary.json and the classifier")
    p.add_argument("--classifier-ckpt", default=None, help="reuse a classifier run folder")
    p.add_argument(
        "--classifier-steps", type=positive_int, default=600, help="classifier training steps"
    )
    p.add_argument(
        "--num-samples", type=positive_int, default=1000, help="random-noise samples per model"
    )
    p.add_argument("--recon-items", type=positive_int, default=300, help="held-out items to assign")
    p.add_argument("--assign-steps", type=nonneg_int, default=100, help="assignment steps")
    p.add_argument("--patch-size", type=positive_int, default=2, help="patch size (default: 2)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_run_evaluate)

    from diffalign.noise.toy import cli_optimize

    cli_optimize.register(sub)


def register_demo(sub) -> None:
    """Add `diffalign demo`."""
    p = sub.add_parser(
        "demo",
        help="run the whole orthogonal-noise toy pipeline on digits (the main job)",
        description="train-gan -> noise theory -> assign -> direct SFT -> matched SFT -> one EM "
        "cycle -> held-out evaluation, on scikit-learn's bundled digits (no download). Writes "
        "summary.json, report.md and PNG plots into --output-dir and prints the comparison "
        "table last. About 2-5 minutes on 2 CPU cores; --quick takes under a minute.",
    )
    p.add_argument(
        "--output-dir", default="demo-output", help="output folder (default: %(default)s)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a sub-minute smoke run")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo output in --output-dir (otherwise a non-empty folder is "
        "refused)",
    )
    p.set_defaults(func=_run_demo)


# ----------------------------------------------------------------------------- handlers


def _run_train_gan(args) -> int:
    from diffalign.noise.toy.gan import train_gan
    from diffalign.noise.toy.models import limit_threads

    limit_threads()
    r = train_gan(
        args.output_dir,
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_items=args.max_items,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        ema_decay=args.ema_decay,
        overwrite=args.overwrite,
        resume=args.resume,
        tracker=args.tracker,
        checkpoint_every=args.checkpoint_every,
    )
    print(f"generator: {r['generator']} ({r['steps']} steps)")
    return 0


def _run_assign(args) -> int:
    from diffalign.noise.toy.assignment import assign
    from diffalign.noise.toy.models import limit_threads

    limit_threads()
    s = assign(
        args.generator_ckpt,
        args.output_dir,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        max_items=args.max_items,
        assign_steps=args.assign_steps,
        lr=args.lr,
        patch_size=args.patch_size,
        parametrization=args.parametrization,
        l1_weight=args.l1_weight,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    if s:
        print(
            f"{s['finished']} items assigned, {s['failed']} failed; mean MSE "
            f"{s.get('mse_before_mean', float('nan')):.4f} -> {s.get('mse_after_mean', float('nan')):.4f}"
            f" ({args.output_dir}/manifest.jsonl)"
        )
    return 0


def _run_sft(args) -> int:
    from diffalign.noise.toy.finetune import sft
    from diffalign.noise.toy.models import limit_threads

    limit_threads()
    r = sft(
        args.generator_ckpt,
        args.manifest_path,
        args.output_dir,
        dataset=args.dataset,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        preserve_weight=args.preserve_weight,
        l1_weight=args.l1_weight,
        seed=args.seed,
        base_ckpt=args.base_ckpt,
        overwrite=args.overwrite,
        resume=args.resume,
        tracker=args.tracker,
        checkpoint_every=args.checkpoint_every,
    )
    print(f"generator: {r['generator']} ({r['steps']} steps)")
    return 0


def _run_direct_sft(args) -> int:
    from diffalign.noise.toy.finetune import direct_sft
    from diffalign.noise.toy.models import limit_threads

    limit_threads()
    r = direct_sft(
        args.generator_ckpt,
        args.output_dir,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        max_items=args.max_items,
        manifest_path=args.manifest_path,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        preserve_weight=args.preserve_weight,
        l1_weight=args.l1_weight,
        seed=args.seed,
        base_ckpt=args.base_ckpt,
        overwrite=args.overwrite,
        resume=args.resume,
        tracker=args.tracker,
        checkpoint_every=args.checkpoint_every,
    )
    print(f"generator: {r['generator']} ({r['steps']} steps)")
    return 0


def _run_em(args) -> int:
    from diffalign.noise.toy.em_loop import em
    from diffalign.noise.toy.models import limit_threads

    limit_threads()
    s = em(
        args.generator_ckpt,
        args.output_dir,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        num_cycles=args.num_cycles,
        max_items=args.max_items,
        assign_steps=args.assign_steps,
        assign_lr=args.assign_lr,
        patch_size=args.patch_size,
        parametrization=args.parametrization,
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        preserve_weight=args.preserve_weight,
        l1_weight=args.l1_weight,
        seed=args.seed,
        base_ckpt=args.base_ckpt,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        tracker=args.tracker,
    )
    print(f"final generator: {s['final_generator']} ({s['num_cycles']} cycles)")
    return 0


def _run_evaluate(args) -> int:
    from diffalign.noise.toy.evaluate import EvalSettings, evaluate_runs
    from diffalign.noise.toy.models import limit_threads

    limit_threads()
    settings = EvalSettings(
        num_samples=args.num_samples,
        recon_items=args.recon_items,
        assign_steps=args.assign_steps,
        patch_size=args.patch_size,
        seed=args.seed,
    )
    s = evaluate_runs(
        args.generator_ckpt,
        args.output_dir,
        names=args.names,
        dataset=args.dataset,
        data_dir=args.data_dir,
        classifier_ckpt=args.classifier_ckpt,
        classifier_steps=args.classifier_steps,
        settings=settings,
    )
    print(s["table"])
    return 0


def _run_demo(args) -> int:
    from diffalign.noise.toy.demo import run_demo
    from diffalign.noise.toy.models import limit_threads

    limit_threads()
    run_demo(args.output_dir, quick=args.quick, seed=args.seed, overwrite=args.overwrite)
    return 0
