"""`diffalign textstream calibrate` (spec T: Calibration). Heavy imports stay inside handlers."""

from __future__ import annotations

from diffalign.engine.cliutils import nonneg_float, nonneg_int, positive_int, seed_int


def register(verbs) -> None:
    p = verbs.add_parser(
        "calibrate",
        help="compute per-layer Procrustes rotations for the LN residual (seed 000)",
        description=(
            "Run the model on the first N prompts of a dataset (one random timestep index per "
            "sample), stream the token-wise standardised text tokens entering the origin and "
            "each target block into float64 X^T Y sums, and solve the orthogonal Procrustes "
            "problem per target layer. Writes the rotation file (safetensors) and, beside it, "
            "summary.json (alignment error before/after per layer) and procrustes_errors.png. "
            "Runs sharded under `accelerate launch`."
        ),
    )
    p.add_argument(
        "--model",
        default="sd3",
        help="sd3 | sd3.5 | sd3.5-medium | flux-dev | flux-schnell | qwen-image | diffusers "
        "folder | Hub id | .safetensors (default: %(default)s)",
    )
    p.add_argument(
        "--single-file-config",
        default=None,
        help="diffusers folder or Hub id whose config a single-file --model uses (default: "
        "inferred from the file)",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="prompt set(s), comma-combined: a .txt/.jsonl/COCO json/GenEval jsonl/DPG folder, "
        "or coco, geneval, dpg under --datadir; re-runs compare its content (prompts, and with "
        "--xt-source image the images' bytes, whose digests are cached by path, size and mtime: "
        "a re-run reads only the images that changed), not how its path is spelled",
    )
    p.add_argument("--datadir", default=None, help="folder holding the named datasets")
    p.add_argument(
        "--prompt-field",
        default="prompt",
        help="prompt key in .jsonl files (default: %(default)s)",
    )
    p.add_argument(
        "--image-field",
        default="image",
        help="image key in a pairs .jsonl, relative to its folder (default: %(default)s)",
    )
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=200,
        help="first N prompts used (default: %(default)s)",
    )
    p.add_argument(
        "--origin-layer",
        type=nonneg_int,
        default=0,
        help="origin block (global index: on FLUX.1 double blocks 0-18, then single blocks "
        "19+j); 0 = text after the context embedder (default: %(default)s)",
    )
    p.add_argument(
        "--target-layer-start",
        type=nonneg_int,
        default=2,
        help="targets are this block to the last (default: %(default)s)",
    )
    p.add_argument(
        "--target-layers",
        default=None,
        help="explicit target blocks, e.g. '3,5,7' (overrides --target-layer-start)",
    )
    p.add_argument(
        "--output",
        default="procrustes_rotations.safetensors",
        help="rotation file to write (safetensors content whatever the suffix; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output made with other settings (or by an older diffalign, which "
        "recorded none) and a summary.json / procrustes_errors.png beside it that report "
        "another rotation file; without it such a run is refused before the model loads (an "
        "identical re-run needs no flag)",
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of timesteps and noise (default: 0)"
    )
    p.add_argument(
        "--token-strategy",
        choices=("all", "valid"),
        default="valid",
        help="valid = CLIP and T5 tokens through EOS, padding dropped (the method authors' "
        "default), or all text tokens (the padding then outnumbers the prompt's tokens in "
        "X^T Y); on Qwen-Image both keep the prompt's own tokens (default: %(default)s)",
    )
    p.add_argument(
        "--xt-source",
        choices=("trajectory", "noise", "image"),
        default="trajectory",
        help="trajectory = sample from noise up to the drawn step (what generation sees); "
        "noise = pure Gaussian latents at the drawn timestep, one forward; image = the sample's "
        "paired image latent noised as in training, (1-s) x0 + s eps at an integer timestep "
        "drawn uniformly in 0..999, s = t/1000 (the method authors' SD3/FLUX.1 calibration; "
        "needs image-caption pairs and a square size) (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="sampling steps of the schedule the timestep index is drawn from (default: the "
        "model card's: SD3 28, FLUX.1-dev 28, FLUX.1-schnell 4, Qwen-Image 50)",
    )
    p.add_argument(
        "--guidance",
        type=nonneg_float,
        default=None,
        help="FLUX.1 distilled guidance of the trajectory (default: dev 3.5, schnell 0)",
    )
    p.add_argument(
        "--timestep-buckets",
        type=positive_int,
        default=1,
        help="split the 0..1000 schedule into N buckets of equal integer-timestep count "
        "(N = 3: edges 0, 334, 667, 1000, as the method's authors) and calibrate one rotation "
        "per bucket and target from the samples whose drawn timestep falls in it; generation "
        "picks the current timestep's. Both take the timestep as the transformer receives it "
        "(FLUX.1 / Qwen-Image pipelines round it to the model dtype: in bf16 499 is 500) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--timestep-draw",
        choices=("sample", "bucket"),
        default="sample",
        help="sample = one step index per sample (each bucket gets the samples whose step fell "
        "in it); bucket = one step per sample and bucket, drawn among the schedule's steps in "
        "that bucket, so every sample reaches every bucket, as the method's authors calibrate "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--col-center",
        action="store_true",
        help="centre each feature column over the calibration tokens after the per-token "
        "standardisation, before the Procrustes solve (strategy row_ln_then_col_center)",
    )
    p.add_argument(
        "--cfg",
        type=nonneg_float,
        default=1.0,
        help="guidance scale; > 1 adds the unconditional branch (empty prompt) to the "
        "trajectory; the tokens are collected from the conditional rows only, as the method's "
        "authors fit them (default: %(default)s)",
    )
    p.add_argument(
        "--height", type=positive_int, default=None, help="image height (default: model's)"
    )
    p.add_argument(
        "--width", type=positive_int, default=None, help="image width (default: model's)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="prompts per forward (default: %(default)s)",
    )
    p.add_argument(
        "--max-sequence-length",
        type=positive_int,
        default=None,
        help="text-encoder tokens, as in generation (default: SD3 256, FLUX.1-dev 512, "
        "FLUX.1-schnell 256, Qwen-Image 512)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="model dtype; auto = bfloat16 on GPU, float32 on CPU (default: %(default)s)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: accelerate's device)"
    )
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args) -> int:
    from diffalign.engine.cliutils import parse_int_list
    from diffalign.textstream.calibrate import calibrate

    targets = None
    if args.target_layers is not None:
        targets = parse_int_list(args.target_layers, "--target-layers")
        if not targets:
            from diffalign.engine.errors import DiffalignError

            raise DiffalignError("--target-layers is empty")
    summary = calibrate(
        model=args.model,
        single_file_config=args.single_file_config,
        dataset=args.dataset,
        datadir=args.datadir,
        prompt_field=args.prompt_field,
        image_field=args.image_field,
        num_samples=args.num_samples,
        origin_layer=args.origin_layer,
        target_layer_start=args.target_layer_start,
        target_layers=targets,
        output=args.output,
        seed=args.seed,
        token_strategy=args.token_strategy,
        xt_source=args.xt_source,
        steps=args.steps,
        cfg=args.cfg,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        max_sequence_length=args.max_sequence_length,
        timestep_buckets=args.timestep_buckets,
        col_center=args.col_center,
        guidance=args.guidance,
        timestep_draw=args.timestep_draw,
        overwrite=args.overwrite,
    )
    from diffalign.engine.progress import is_main_process

    if is_main_process():
        print(
            f"wrote {summary['output']}: {_count_rotations(summary)}, "
            f"{summary['num_valid_tokens']} tokens, mean error "
            f"{summary['mean_error_before']:.4f} -> {summary['mean_error_after']:.4f}"
        )
        if summary["num_samples"] < args.num_samples:
            print(
                f"note: the dataset holds {summary['num_samples']} samples, fewer than "
                f"--num-samples {args.num_samples}: all {summary['num_samples']} were used"
            )
    return 0


def _count_rotations(summary: dict) -> str:
    """The count printed: 22 rotations, or 88 (22 layers x 4 timestep buckets) with buckets."""
    layers, buckets = len(summary["target_layers"]), int(summary.get("timestep_buckets") or 1)
    if buckets == 1:
        return f"{layers} rotations"
    return f"{layers * buckets} rotations ({layers} layers x {buckets} timestep buckets)"
