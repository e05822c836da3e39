"""`diffalign repa train | extract | probe` (spec R: Train, Use); parsing only."""

from __future__ import annotations

import argparse

from diffalign.engine.cliutils import nonneg_int, positive_int, seed_int, unit_float


def register(verbs) -> None:
    """Add the train / extract / probe verbs to the `repa` group's subparsers."""
    _register_train(verbs)
    _register_extract(verbs)
    _register_probe(verbs)


def _register_train(verbs) -> None:
    from diffalign.repa.config import FIELDS

    p = verbs.add_parser(
        "train",
        help="LoRA + AlignHead training with token and manifold losses (the reference SD 1.5 recipe)",
        description=(
            "Train U-REPA on SD 1.5 from preprocessed data. Settings come from --config (YAML, "
            "see configs/repa_track_a.yaml); every key can be overridden as --key value."
        ),
    )
    p.add_argument("--config", default=None, help="YAML configuration (keys as below)")
    p.add_argument(
        "--resume",
        default=None,
        help="'latest' (the newest checkpoint in output_dir) or a checkpoint folder",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start over in an output_dir that holds a run"
    )
    p.add_argument(
        "--no-progress", dest="no_progress", action="store_true", help="hide the progress bar"
    )
    group = p.add_argument_group("configuration overrides (each replaces the config's value)")
    for name, f in FIELDS.items():
        default = f.default_factory() if callable(f.default_factory) else f.default
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"cfg__{name}",
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"{f.metadata['help']} (default: {default})".replace("%", "%%"),
        )
    p.set_defaults(func=_train)


def _train(args) -> int:
    from diffalign.repa.config import load_config
    from diffalign.repa.train import train_repa

    overrides = {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__")}
    cfg = load_config(args.config, overrides)
    result = train_repa(
        cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    if result.summary:  # the main process
        final = result.summary.get("final_val") or result.summary.get("final_train") or {}
        shown = {k: round(v, 5) for k, v in final.items() if isinstance(v, float)}
        print(f"trained {result.step} steps -> {result.final_dir} {shown}")
    return 0


def _register_extract(verbs) -> None:
    p = verbs.add_parser(
        "extract",
        help="pooled aligned / un-aligned U-Net / teacher features of a dataset split",
        description=(
            "Run a trained U-REPA model (EMA weights) on each sample's latent noised to one "
            "timestep, with the empty prompt, and save pooled features for `repa probe`. Shards "
            "over processes under `accelerate launch`."
        ),
    )
    p.add_argument(
        "--weights",
        required=True,
        help="run folder, its checkpoint-final/ export, or a checkpoints/checkpoint-N folder",
    )
    p.add_argument("--data-dir", required=True, help="preprocessed data folder")
    p.add_argument(
        "--output-dir",
        "--out",  # the earlier spelling
        dest="out",
        metavar="DIR",
        required=True,
        help="output folder: features.safetensors, summary.json (--out: the earlier spelling)",
    )
    p.add_argument("--split", default="val", help="manifest split to extract (default val)")
    p.add_argument(
        "--timestep",
        type=nonneg_int,
        default=500,
        help="diffusion timestep (default: 500, the reference SD 1.5 recipe's)",
    )
    p.add_argument(
        "--pool",
        choices=("mean", "first"),
        default="mean",
        help="mean over tokens, or the first token (the reference SD 1.5 recipe's [CLS] equivalent; default: mean)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="samples per forward (default: 32)"
    )
    p.add_argument(
        "--max-samples", type=positive_int, default=None, help="cap on samples (default: all)"
    )
    p.add_argument("--model", default=None, help="SD 1.5 model (default: the one trained on)")
    p.add_argument(
        "--no-ema",
        dest="no_ema",
        action="store_true",
        help="use a checkpoint's live weights instead of its EMA (exports are always EMA)",
    )
    p.add_argument(
        "--teacher-model",
        default=None,
        help="DINOv2 for data without dino_tokens.lmdb (default: the run's teacher_model)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_extract)


def _extract(args) -> int:
    from diffalign.repa.probe import extract_features

    s = extract_features(
        args.weights,
        args.data_dir,
        args.out,
        split=args.split,
        timestep=args.timestep,
        pool=args.pool,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        model=args.model,
        use_ema=not args.no_ema,
        teacher_model=args.teacher_model,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    if s:  # the main process
        print(f"extracted {s['samples']} samples ({', '.join(s['sets'])}) -> {args.out}")
    return 0


def _register_probe(verbs) -> None:
    p = verbs.add_parser(
        "probe",
        help="linear-probe and kNN accuracy of extracted features (one table + PNG)",
        description=(
            "Fit a logistic-regression linear probe and a cosine kNN classifier on a seeded "
            "stratified train/test split of every feature set from `repa extract`."
        ),
    )
    p.add_argument("--features", required=True, help="`repa extract` output folder")
    p.add_argument(
        "--output-dir",
        "--out",  # the earlier spelling
        dest="out",
        metavar="DIR",
        required=True,
        help="output folder: summary.json, probe.png (--out: the earlier spelling)",
    )
    p.add_argument(
        "--test-fraction", type=unit_float, default=0.25, help="held-out fraction (default 0.25)"
    )
    p.add_argument(
        "--knn-k", type=positive_int, default=5, help="neighbours of the kNN probe (default: 5)"
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the split and the probe (default: 0)"
    )
    p.set_defaults(func=_probe)


def _probe(args) -> int:
    from diffalign.repa.probe import probe_features

    s = probe_features(args.features, args.out, args.test_fraction, args.seed, args.knn_k)
    for r in s["table"]:
        print(
            f"{r['features']:<22} dim {r['dim']:>5}  linear {r['linear_probe_acc']:.3f}  "
            f"kNN {r['knn_acc']:.3f}"
        )
    return 0
