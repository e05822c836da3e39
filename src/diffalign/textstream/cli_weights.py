"""`diffalign textstream cache | train-weights` (spec T: learned weights). Parsing only; the
work is in `textstream.cache` and `textstream.train_weights`. Heavy imports stay in handlers."""

from __future__ import annotations

from diffalign.engine.cliutils import (
    finite_float,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    seed_int,
)


def _time_shift(text: str) -> float | None:
    """`--time-shift`: a number > 0, or `scheduler` (None: the scheduler's own shift)."""
    return None if text.strip().lower() == "scheduler" else positive_float(text)


def register(verbs) -> None:
    """Add `cache` and `train-weights` to `diffalign textstream`."""
    p = verbs.add_parser(
        "cache",
        help="VAE latents + text embeddings of image-caption pairs (for train-weights)",
        description="Encode image-caption pairs (COCO captions json, pairs.jsonl + images, or a "
        "folder of images with <stem>.txt captions) into CACHE: latents.lmdb, "
        "prompt_embeds.lmdb, pooled_prompt_embeds.lmdb (Qwen-Image: its text mask) (fp16, key = "
        "pair id; the text stores "
        "also hold __empty__), pairs.jsonl, job.json (model identity, resolution) and "
        "summary.json. Images are resized and centre-cropped to --resolution. Resumable (a "
        "re-run finishes the missing records; one with another model or resolution is "
        "refused); shard with `accelerate launch`.",
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
        help="diffusers folder or Hub id whose config a single-file --model uses",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="COCO captions json, pairs.jsonl, an image folder with .txt captions, or coco "
        "under --datadir; comma-separated to combine",
    )
    p.add_argument("--datadir", default=None, help="folder holding the named datasets")
    p.add_argument("--output-dir", required=True, help="cache folder")
    p.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="square image side after resize + centre crop, a size the model can make "
        "(default: the model's own sample size, 1024 on SD3/SD3.5, FLUX.1 and Qwen-Image)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N pairs")
    p.add_argument(
        "--caption-field",
        "--prompt-field",
        default="prompt",
        help="caption key in pairs.jsonl (--prompt-field: the seed's and `generate`'s spelling; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--image-field", default="image", help="image key in pairs.jsonl (default: %(default)s)"
    )
    p.add_argument(
        "--max-sequence-length",
        type=positive_int,
        default=None,
        help="text-encoder tokens, as in generation (default: the model card's: SD3 256, "
        "FLUX.1-dev 512, FLUX.1-schnell 256, Qwen-Image 512)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="pairs per batch (default: 8)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="encoder dtype; auto = bfloat16 on GPU, float32 on CPU (default: %(default)s)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: accelerate's)")
    p.add_argument(
        "--overwrite", action="store_true", help="start the cache over (default: resume it)"
    )
    p.add_argument(
        "--latent-memory-mb",
        type=nonneg_float,
        default=1024,
        help="memory per process for the latents of images that later captions need again "
        "(each image is VAE-encoded once while it fits; 0: once per batch) (default: "
        "%(default)s)",
    )
    p.set_defaults(func=_run_cache)

    p = verbs.add_parser(
        "train-weights",
        help="learn one residual weight per target layer on a cache (frozen transformer)",
        description="Learn the residual weights w = softplus(raw), one per target layer, with "
        "the transformer frozen, by the rectified-flow velocity loss on a `textstream cache` "
        "(x_s = (1-s) x0 + s eps, target eps - x0) plus an optional smoothness penalty between "
        "neighbouring layers' weights. Writes OUTPUT_DIR/residual_weights.safetensors (give it "
        "to sample/generate/geneval/dpg with --residual-weights-file), residual_weights.png, "
        "validation/step-*/ images, checkpoints/, logs/ (TensorBoard), summary.json. Resume "
        "with --resume latest; runs under `accelerate launch`.",
    )
    p.add_argument("--cache", required=True, help="cache folder from `textstream cache`")
    p.add_argument(
        "--model",
        default=None,
        help="the model the cache was made with, checked against it (default: that model)",
    )
    p.add_argument("--output-dir", required=True, help="run folder")
    p.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="must equal the cache's resolution when given",
    )
    r = p.add_argument_group("residual")
    r.add_argument(
        "--residual-origin-layer",
        type=nonneg_int,
        default=None,
        metavar="INT",
        help="origin layer (default: 0, or the rotation file's)",
    )
    r.add_argument(
        "--residual-target-layers",
        nargs="*",
        default=None,
        metavar="LAYERS",
        help='target blocks, "3,5,7" or "3 5 7" (default: the rotation file\'s)',
    )
    r.add_argument(
        "--residual-procrustes-path",
        default=None,
        metavar="FILE",
        help="rotation file from `textstream calibrate` (implies --residual-mode ln)",
    )
    r.add_argument(
        "--residual-mode",
        choices=["plain", "ln"],
        default=None,
        help="plain or ln (default: plain, or ln with a rotation file)",
    )
    r.add_argument(
        "--residual-layernorm",
        action="store_true",
        help="parameter-free LayerNorm on the mix before rescaling (ln mode)",
    )
    r.add_argument(
        "--init",
        default="1.0",
        help="initial weights: a number > 0 for all, a residual_weights.safetensors or a JSON "
        "list (default: %(default)s)",
    )
    t = p.add_argument_group("time sampling")
    t.add_argument(
        "--time-mode",
        choices=["uniform", "gaussian", "beta", "logitnorm"],
        default="logitnorm",
        help="distribution of u in [0, 1] (default: %(default)s, as the authors)",
    )
    t.add_argument(
        "--time-mean",
        type=finite_float,
        default=None,
        help="gaussian: mean of u (default 0.6); logitnorm: mean of the logit (default 0; the "
        "authors' --time_shift)",
    )
    t.add_argument(
        "--time-std",
        type=positive_float,
        default=None,
        help="gaussian: std of u (default 0.1); logitnorm: std of the logit (default 1)",
    )
    t.add_argument(
        "--time-alpha", type=positive_float, default=None, help="beta: alpha (default 5)"
    )
    t.add_argument("--time-beta", type=positive_float, default=None, help="beta: beta (default 2)")
    t.add_argument(
        "--time-shift",
        type=_time_shift,
        default=1.0,
        help="s = shift*u / (1 + (shift-1)*u); default 1 = none, as the authors; 'scheduler': "
        "the scheduler's shift (SD3: 3; FLUX.1-dev, Qwen-Image: dynamic by the cached resolution)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--smoothness-weight",
        type=nonneg_float,
        default=0.0,
        help="weight of mean (w[k+1] - w[k])^2 (default: 0)",
    )
    o.add_argument(
        "--max-steps", type=positive_int, default=1000, help="optimizer steps (default: 1000)"
    )
    o.add_argument("--batch-size", type=positive_int, default=4, help="pairs per step (default: 4)")
    o.add_argument(
        "--gradient-accumulation-steps", type=positive_int, default=1, help="(default: 1)"
    )
    o.add_argument(
        "--lr", type=positive_float, default=1e-3, help="AdamW lr (default: 0.001, the authors')"
    )
    o.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="(default: 0)")
    o.add_argument(
        "--warmup-steps", type=nonneg_int, default=0, help="linear warm-up steps (default: 0)"
    )
    o.add_argument(
        "--lr-scheduler",
        choices=["cosine", "constant", "linear"],
        default="cosine",
        help="after the warm-up (default: %(default)s)",
    )
    o.add_argument(
        "--max-grad-norm",
        type=nonneg_float,
        default=1.0,
        help="global-norm clipping, 0 = off (default: %(default)s)",
    )
    o.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast; the frozen model is held in that dtype (default: no = fp32)",
    )
    o.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute blocks in backward"
    )
    o.add_argument("--seed", type=seed_int, default=0, help="(default: 0)")
    v = p.add_argument_group("validation, checkpoints, logs")
    v.add_argument(
        "--num-val",
        type=nonneg_int,
        default=0,
        help="hold out the last N cached pairs for a validation loss (default: 0)",
    )
    v.add_argument(
        "--eval-every",
        type=nonneg_int,
        default=0,
        help="validation (loss + images with the current weights) every N steps; 0 = at the "
        "end only (default: 0)",
    )
    v.add_argument(
        "--eval-samples", type=positive_int, default=2, help="validation images (default: 2)"
    )
    v.add_argument(
        "--eval-steps",
        type=positive_int,
        default=None,
        help="sampling steps (default: the model card's: SD3 28, FLUX.1-dev 28, "
        "FLUX.1-schnell 4, Qwen-Image 50)",
    )
    v.add_argument(
        "--eval-cfg",
        type=nonneg_float,
        default=None,
        help="classifier-free guidance scale (default: the model card's: SD3 7, Qwen-Image "
        "4; unused on FLUX.1, which gets its distilled guidance)",
    )
    v.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=250,
        help="resumable checkpoint every N steps (a killed run resumes from the last one with "
        "--resume latest); 0 = only the final one (default: %(default)s)",
    )
    v.add_argument(
        "--keep-checkpoints", type=nonneg_int, default=2, help="resumable ones kept (0 = all)"
    )
    v.add_argument("--log-every", type=nonneg_int, default=10, help="(default: 10)")
    v.add_argument(
        "--tracker",
        choices=["tensorboard", "wandb", "none"],
        default="tensorboard",
        help="(default: %(default)s)",
    )
    v.add_argument("--num-workers", type=nonneg_int, default=0, help="DataLoader workers")
    v.add_argument("--resume", default=None, help="latest, or a checkpoint folder")
    v.add_argument("--overwrite", action="store_true", help="start over in a used run folder")
    p.set_defaults(func=_run_train_weights)


def _run_cache(args) -> int:
    from diffalign.engine.progress import is_main_process
    from diffalign.textstream.cache import build_cache

    summary = build_cache(
        args.model,
        args.dataset,
        args.output_dir,
        resolution=args.resolution,
        datadir=args.datadir,
        limit=args.limit,
        caption_field=args.caption_field,
        image_field=args.image_field,
        max_sequence_length=args.max_sequence_length,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        single_file_config=args.single_file_config,
        latent_memory_mb=args.latent_memory_mb,
    )
    if is_main_process():
        print(
            f"cache {args.output_dir}: {summary['pairs']} pairs, {summary['written']} encoded "
            f"({summary['images_encoded']} images), {summary['already_present']} already there, "
            f"{summary['failed']} failed"
        )
    return 0


def _run_train_weights(args) -> int:
    from diffalign.engine.cliutils import parse_int_list
    from diffalign.textstream.train_weights import WeightsTrainConfig, run_train_weights

    cfg = WeightsTrainConfig(
        cache=args.cache,
        model=args.model,
        output_dir=args.output_dir,
        resolution=args.resolution,
        origin_layer=args.residual_origin_layer,
        target_layers=None
        if args.residual_target_layers is None
        else parse_int_list(args.residual_target_layers, "--residual-target-layers"),
        procrustes_path=args.residual_procrustes_path,
        mode=args.residual_mode,
        layernorm=args.residual_layernorm,
        init=args.init,
        time_mode=args.time_mode,
        time_mean=args.time_mean,
        time_std=args.time_std,
        time_alpha=args.time_alpha,
        time_beta=args.time_beta,
        time_shift=args.time_shift,
        smoothness_weight=args.smoothness_weight,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler=args.lr_scheduler,
        max_grad_norm=args.max_grad_norm or None,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        num_val=args.num_val,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        eval_steps=args.eval_steps,
        eval_cfg=args.eval_cfg,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        tracker=args.tracker,
        num_workers=args.num_workers,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    run_train_weights(cfg)
    return 0
