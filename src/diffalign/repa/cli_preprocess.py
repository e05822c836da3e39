"""`diffalign repa preprocess images|vae|dino|clip` (seed 003 §3): parsing only."""

from __future__ import annotations

from diffalign.engine.cliutils import make_subparsers, positive_int, seed_int

_LAYOUT = (
    "Data folder (--data-dir): images.zip, manifest.csv (id,wnid,label,split), classes.csv, "
    "vae_latents.lmdb/, dino_tokens.lmdb/ (keys {id}_mid), clip_embeddings.safetensors, "
    "summary_<step>.json. Every step resumes (present records are skipped, corrupt ones redone) "
    "and shards over the processes of `accelerate launch`; a store made by another model or "
    "with other settings is refused (--overwrite rebuilds it)."
)


def register_preprocess(verbs) -> None:
    parser = verbs.add_parser(
        "preprocess",
        help="build the data folder: images, vae latents, dino tokens, clip embeddings",
        description="Seed 003 §3 preprocessing. " + _LAYOUT,
    )
    steps = make_subparsers(parser, title="steps")
    _images(steps)
    _vae(steps)
    _dino(steps)
    _clip(steps)


def _data_dir(p) -> None:
    p.add_argument("--data-dir", required=True, help="the preprocessed data folder")


def _device(p, what: str, unit: str = "images") -> None:
    p.add_argument(
        "--device",
        default=None,
        help=f"device for the {what} (default: the process's accelerator, else cpu)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="model dtype: float32, float16 or bfloat16 (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help=f"{unit} per batch (default: %(default)s)",
    )


def _workers(p) -> None:
    p.add_argument(
        "--num-workers",
        type=positive_int,
        default=4,
        help="threads decoding the next batch's images while the model runs (default: 4)",
    )


def _overwrite(p, what: str) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"rebuild {what} when it was made by another model or with other settings "
        "(refused otherwise)",
    )


def _split(p) -> None:
    p.add_argument(
        "--split",
        default=None,
        help="only the manifest rows of this split (default: every row)",
    )


def _images(steps) -> None:
    p = steps.add_parser(
        "images",
        help="source images -> 512 px centre crops in images.zip + manifest.csv",
        description=(
            "Seed §3.1: shorter side to --resolution, centre crop, RGB, JPEG q95, stored in "
            "images.zip with manifest.csv. Sources: an ImageNet root (train/<wnid>/*.JPEG; val/ "
            "sorted into folders or flat with LOC_val_solution.csv or Caffe val.txt) or any "
            "class-folder tree. Run once per split into the same --data-dir."
        ),
    )
    p.add_argument("--source", required=True, help="ImageNet root, split folder or class tree")
    _data_dir(p)
    p.add_argument(
        "--split", default="train", help="split to read and record (default: %(default)s)"
    )
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=None,
        help="deterministic class-balanced subset of this size (Track A: 200000; default: all)",
    )
    p.add_argument(
        "--resolution",
        type=positive_int,
        default=512,
        help="output side in px, a multiple of 8 up to 4096 (default: 512)",
    )
    p.add_argument("--quality", type=positive_int, default=95, help="JPEG quality (default: 95)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the subset draw (default: 0)")
    p.add_argument(
        "--val-labels",
        default=None,
        help="labels of a flat val folder: LOC_val_solution.csv or Caffe val.txt "
        "(default: searched beside the source and up to 3 folders above)",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="LOC_synset_mapping.txt / synset_words.txt: class order and names "
        "(default: searched beside the source and up to 3 folders above, else the folder names)",
    )
    p.set_defaults(func=_run_images)


def _run_images(args) -> int:
    from diffalign.repa.preprocess import preprocess_images

    s = preprocess_images(
        args.source,
        args.data_dir,
        split=args.split,
        num_samples=args.num_samples,
        resolution=args.resolution,
        quality=args.quality,
        seed=args.seed,
        val_labels=args.val_labels,
        class_names=args.class_names,
    )
    if s:
        print(
            f"images: {s['written']} written, {s['already_present']} already there, "
            f"{s['failed']} unreadable; {s['manifest_rows']} rows in {args.data_dir}/manifest.csv"
        )
    return 0


def _vae(steps) -> None:
    p = steps.add_parser(
        "vae",
        help="VAE latents (posterior mode x scaling factor) -> vae_latents.lmdb",
        description=(
            "Seed §3.2: the SD 1.5 VAE's posterior mode times its scaling factor (0.18215), "
            "fp16, key = sample id."
        ),
    )
    _data_dir(p)
    p.add_argument(
        "--model",
        default="sd15",
        help="SD 1.5 pipeline folder, preset or Hub id; only its VAE is loaded (default: sd15)",
    )
    p.add_argument(
        "--unet-model",
        default=None,
        help="the model `repa train` will train on these latents: its VAE's scaling factor and "
        "channels must match (default: an SD 1.5 U-Net, 0.18215 and 4)",
    )
    _split(p)
    _device(p, "VAE")
    _workers(p)
    _overwrite(p, "vae_latents.lmdb")
    p.set_defaults(func=_run_vae)


def _run_vae(args) -> int:
    from diffalign.repa.preprocess import preprocess_vae

    s = preprocess_vae(
        args.data_dir,
        args.model,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        num_workers=args.num_workers,
        unet_model=args.unet_model,
        overwrite=args.overwrite,
    )
    if s:
        print(f"vae: {s['written']} written, {s['already_present']} already there -> {s['store']}")
    return 0


def _dino(steps) -> None:
    p = steps.add_parser(
        "dino",
        help="DINOv2 teacher tokens (16x16, L2-normalised) -> dino_tokens.lmdb",
        description=(
            "Seed §3.3: DINOv2 at 518 px, patch tokens pooled to a 16x16 grid, L2-normalised, "
            "fp16, key {id}_mid. --token-layout grid (default) pools the real 37x37 patch "
            "grid; seed reproduces the reference SD 1.5 code's caches (first 1296 tokens viewed as 36x36, which "
            "shifts every row)."
        ),
    )
    _data_dir(p)
    p.add_argument(
        "--dino-model",
        default="dinov2-large",
        help="DINOv2 folder or Hub id, register variants too (default: dinov2-large)",
    )
    p.add_argument(
        "--token-layout",
        choices=("grid", "seed"),
        default="grid",
        help="grid: spatially correct (default); seed: the reference SD 1.5 code's shifted 36x36 slice",
    )
    p.add_argument("--grid", type=positive_int, default=16, help="output grid side (default: 16)")
    _split(p)
    _device(p, "DINOv2 model")
    _workers(p)
    _overwrite(p, "dino_tokens.lmdb")
    p.set_defaults(func=_run_dino)


def _run_dino(args) -> int:
    from diffalign.repa.preprocess import preprocess_dino

    s = preprocess_dino(
        args.data_dir,
        args.dino_model,
        token_layout=args.token_layout,
        grid=args.grid,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
    )
    if s:
        print(f"dino: {s['written']} written, {s['already_present']} already there -> {s['store']}")
    return 0


def _clip(steps) -> None:
    p = steps.add_parser(
        "clip",
        help="CLIP text embeddings of 'a photo of a {class}' + '' -> clip_embeddings.safetensors",
        description=(
            "Seed §3.4: one prompt per class plus the empty prompt through SD 1.5's tokenizer "
            "and text encoder (77 tokens) -> embeddings [classes + 1, 77, 768], fp16."
        ),
    )
    _data_dir(p)
    p.add_argument(
        "--model",
        default="sd15",
        help="SD 1.5 pipeline folder, preset or Hub id (tokenizer + text encoder; default: sd15)",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="LOC_synset_mapping.txt / synset_words.txt (default: the data folder's classes.csv)",
    )
    p.add_argument(
        "--prompt-template",
        default="a photo of a {name}",
        help="prompt per class; {name} is the class name (default: %(default)s)",
    )
    _device(p, "text encoder", "prompts")
    _overwrite(p, "clip_embeddings.safetensors")
    p.set_defaults(func=_run_clip)


def _run_clip(args) -> int:
    from diffalign.repa.preprocess import preprocess_clip

    s = preprocess_clip(
        args.data_dir,
        args.model,
        class_names=args.class_names,
        prompt_template=args.prompt_template,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    if s and "shape" in s:
        print(f"clip: embeddings {s['shape']} -> {s['file']}")
    return 0
