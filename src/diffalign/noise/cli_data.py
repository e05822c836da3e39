"""`diffalign noise assign | build-dataset | sft | em` (spec N; the seed's `cli_assign_sdxl_sft`,
`cli_build_assigned_noise_dataset`, `cli_train_latent_matched_sft`,
`cli_em_latent_matched_sft`). Parsing only; the work is in `diffalign.noise.assign`,
`.dataset`, `.sft` and `.em`."""

from __future__ import annotations

from diffalign.engine.cliutils import (
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    seed_int,
    unit_float,
)


def add_generator_options(
    p,
    dtype_default: str = "fp32",
    with_device: bool = True,
    with_compile: bool = True,
    size_first: str = "",
    steps_first: str = "",
) -> None:
    """The generator options; `size_first` / `steps_first`: where the default image size /
    step count comes from before the generator's own (sft: the dataset's)."""
    from diffalign.noise.recipes import GENERATORS

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "--model-id",
        dest="model",
        default="sdxl-turbo",
        help=f"generator ({', '.join(GENERATORS)}), a preset, a diffusers pipeline folder, an "
        "earlier `noise sft` checkpoint-final (pipeline or LoRA: runs as its recorded recipe), "
        "a Hub id, or a single-file .safetensors of a release diffusers recognises (its config "
        "from models/<preset>/; with --generator) (default: %(default)s)",
    )
    g.add_argument(
        "--generator",
        choices=tuple(GENERATORS),
        default=None,
        help="which one-step recipe to run --model with (default: the recipe a `noise sft` "
        "export recorded, or the release --model is: SDXL-Turbo, SD-Turbo, FLUX.1-schnell, "
        "SD3.5-Large-Turbo, SANA-Sprint, PixArt-alpha DMD; required for any other model, e.g. "
        "an SD 1.5 or SDXL base with hyper-sd15 / hyper-sdxl)",
    )
    g.add_argument(
        "--num-steps",
        type=positive_int,
        default=None,
        help="sampling steps of a few-step generator, gradients through every one "
        f"({steps_first}flux-schnell 1-4, default 1; sd3.5-large-turbo 1-4, default 4; "
        "sana-sprint 1-2, default 2; pixart-dmd and the U-Net generators: 1)",
    )
    g.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="Hyper-SD file for hyper-sd15 (1-step LoRA) / hyper-sdxl (1-step U-Net) (default: "
        "models/hyper-sd/<release file>)",
    )
    g.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default=dtype_default,
        help="precision of the U-Net or transformer and the text encoders (default: %(default)s)",
    )
    g.add_argument(
        "--vae",
        default=None,
        help="another VAE (e.g. the fp16-fix SDXL VAE), run in --dtype (default: the model's, "
        "upcast to float32 under fp16/bf16)",
    )
    if with_device:
        g.add_argument(
            "--device",
            default=None,
            help="torch device (default: the accelerate process's device: cuda when available)",
        )
    g.add_argument(
        "--no-gradient-checkpointing",
        action="store_true",
        help="keep all U-Net / transformer and VAE activations instead of recomputing them",
    )
    size = (
        f"(default: {size_first}the generator's published size, not read from the model "
        "folder: 1024 for hyper-sdxl, flux-schnell, sd3.5-large-turbo and sana-sprint, else 512)"
    )
    g.add_argument("--height", type=positive_int, default=None, help=f"image height {size}")
    g.add_argument("--width", type=positive_int, default=None, help=f"image width {size}")
    if with_compile:
        g = p.add_argument_group("speed")
        g.add_argument(
            "--compile",
            dest="compile_forward",
            action="store_true",
            help="torch.compile the generator's forward (U-Net transformer blocks, VAE decoder) "
            "and the reward's layers: faster steps after a cold start, the same results to "
            "float rounding",
        )
        g.add_argument(
            "--cuda-graphs",
            action="store_true",
            help="--compile with whole modules replayed as CUDA graphs (static shapes; CUDA only)",
        )


def add_assign_options(p, prefix: str = "") -> None:
    """Assignment options (`--steps --lr ...`; with ``prefix="assign-"`` for `em`)."""
    g = p.add_argument_group("assignment")
    g.add_argument(
        f"--{prefix}steps",
        type=positive_int,
        default=40,
        help="Adam steps on each item's orthogonal Q, >= 1 (default: %(default)s, the seed's)",
    )
    g.add_argument(
        f"--{prefix}lr",
        type=positive_float,
        default=5e-4,
        help="assignment learning rate (default: %(default)s)",
    )
    g.add_argument(
        "--patch-size",
        type=positive_int,
        default=2,
        help="side p of the latent patches Q acts on; D = C p^2 (default: %(default)s)",
    )
    g.add_argument(
        "--parametrization",
        choices=("matrix_exp", "cayley"),
        default="matrix_exp",
        help="map from a skew-symmetric matrix to Q (default: %(default)s)",
    )
    g.add_argument(
        "--latent-loss-weight",
        type=nonneg_float,
        default=1.0,
        help="weight of the MSE between the one-step x0 latent and the VAE latent of the "
        "target (default: %(default)s)",
    )
    g.add_argument(
        "--pixel-l1-weight",
        type=nonneg_float,
        default=0.1,
        help="weight of the L1 between the decoded image and the target (default: %(default)s)",
    )
    g.add_argument(
        "--resize",
        action="store_true",
        help="resize and centre-crop targets of another size (default: a wrong size is an "
        "error / a failures.jsonl line)",
    )


def add_data_options(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-root", required=True, help="folder with pairs.jsonl (and, usually, the images)"
    )
    g.add_argument(
        "--prompt-field",
        default="prompt",
        help="pairs.jsonl field holding the prompt (default: %(default)s)",
    )
    g.add_argument(
        "--image-field",
        default="image",
        help="pairs.jsonl field holding the image path, relative to --data-root or absolute "
        "(default: %(default)s)",
    )
    g.add_argument("--max-items", type=positive_int, default=None, help="only the first N pairs")
    g.add_argument(
        "--num-intermediates",
        type=nonneg_int,
        default=3,
        help="intermediate images per sample in run_outputs/ (default: %(default)s)",
    )
    g.add_argument(
        "--no-plots",
        action="store_true",
        help="skip the per-sample loss-curve and intermediates PNGs (JSON still written)",
    )


def add_sft_options(p, prefix: str = "") -> None:
    """SFT options (`--epochs --lr ...`; with ``prefix="train-"`` for `em`)."""
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        f"--{prefix}epochs",
        type=positive_int,
        default=2 if not prefix else 1,
        help="passes over the dataset (default: %(default)s)",
    )
    g.add_argument(
        f"--{prefix}max-steps",
        type=positive_int,
        default=None,
        help="optimizer steps (overrides the epochs)",
    )
    g.add_argument(
        f"--{prefix}batch-size",
        type=positive_int,
        default=1,
        help="samples per step and process (default: %(default)s)",
    )
    g.add_argument(
        f"--{prefix}lr",
        type=positive_float,
        default=1e-5,
        help="learning rate (default: %(default)s)",
    )
    g.add_argument(
        "--preserve-latent-weight",
        type=nonneg_float,
        default=0.5,
        help="weight of the latent MSE to the frozen base on random noise (default: %(default)s)",
    )
    g.add_argument(
        "--preserve-pixel-weight",
        type=nonneg_float,
        default=0.05,
        help="weight of the pixel L1 to the frozen base on random noise (default: %(default)s)",
    )
    g.add_argument(
        "--lora-rank",
        type=positive_int,
        default=None,
        help="train a LoRA of this rank on the U-Net's attention projections instead of the "
        "whole U-Net (exports LoRA weights for pipe.load_lora_weights)",
    )
    g.add_argument(
        "--lora-alpha",
        type=positive_float,
        default=None,
        help="LoRA alpha (default: the rank)",
    )
    g.add_argument(
        "--ema-decay",
        type=unit_float,
        default=None,
        help="keep an EMA of the trained weights with this decay; exports use it (default: off)",
    )
    g.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="autocast precision of the training step (weights stay float32; default: %(default)s)",
    )
    g.add_argument(
        "--gradient-accumulation-steps",
        type=positive_int,
        default=1,
        help="batches per optimizer step (default: %(default)s)",
    )
    g.add_argument(
        "--weight-decay",
        type=nonneg_float,
        default=1e-4,
        help="AdamW weight decay (default: %(default)s, the seed's)",
    )
    g.add_argument(
        "--val-items",
        type=positive_int,
        default=4,
        help="items whose loss on fixed noises picks checkpoint-best (default: %(default)s)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=500,
        help="write a resumable checkpoint every N optimizer steps besides the final one "
        "(default: %(default)s; 0 = only at the end)",
    )
    g.add_argument(
        "--tracker",
        choices=("tensorboard", "wandb", "none"),
        default="tensorboard",
        help="experiment tracker (default: %(default)s)",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic CUDA kernels (slower): needed for a bit-exact resume on a GPU",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the trained U-Net's transformer blocks (faster steps after a "
        "cold start; the same losses to float rounding, the same checkpoints)",
    )


def register(verbs) -> None:
    """Add `diffalign noise {assign,build-dataset,sft,em}`."""
    p = verbs.add_parser(
        "assign",
        help="assigned-noise inversion: the orthogonal noise that makes one target image",
        description="Optimise a patch-wise orthogonal Q on a fixed Gaussian noise so that the "
        "one-step generator's output for (Q eps, prompt) matches --target-image (latent MSE + "
        "pixel L1). Writes best_input_noise.safetensors, target.png, best.png, step_NNNN.png "
        "and intermediates.png, loss_curve.{png,json}, orthogonal_gaussian_{init,final}."
        "{png,json} and summary.json.",
    )
    p.add_argument("--prompt", required=True, help="the target image's prompt")
    p.add_argument(
        "--target-image",
        "--target-image-path",
        dest="target_image",
        required=True,
        help="the target image (the generator's size, or pass --resize)",
    )
    p.add_argument(
        "--output-dir",
        default="outputs/run_assign_noise_sft",
        help="output folder (default: %(default)s, the seed's)",
    )
    add_generator_options(p)
    add_assign_options(p)
    p.add_argument(
        "--num-intermediates",
        type=nonneg_int,
        default=5,
        help="intermediate images step_NNNN.png (default: %(default)s)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the base noise (default: 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the assignment an --output-dir already holds (default: refuse)",
    )
    p.set_defaults(func=_run_assign)

    p = verbs.add_parser(
        "build-dataset",
        help="assign a matched noise to every (prompt, image) pair of pairs.jsonl",
        description="The matched-noise dataset: OUTPUT/manifest.jsonl, failures.jsonl, "
        "summary.json, samples/NNNNNN_slug/{best_input_noise.safetensors, meta.json, "
        "target.png, run_outputs/}. Several samples are optimised at once (--batch-size), one Q "
        "each. Resumable (a re-run skips finished samples and redoes damaged ones); shards "
        "the pairs across processes under `accelerate launch`.",
    )
    add_data_options(p)
    p.add_argument(
        "--output-dir",
        "--output-root",
        dest="output_dir",
        default="outputs/assigned_noise_dataset",
        help="dataset folder to write or resume (default: %(default)s)",
    )
    add_generator_options(p)
    add_assign_options(p)
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=4,
        help="samples optimised together, one Q each (default: %(default)s)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the base noises (default: 0)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a folder that holds a dataset: once the generator has loaded, its "
        "records and samples/ folders are removed and every pair is assigned again",
    )
    p.set_defaults(func=_run_build)

    p = verbs.add_parser(
        "sft",
        help="latent-matched SFT of the U-Net on a matched-noise dataset (--direct: baseline)",
        description="Fine-tune the one-step generator's U-Net (full, or LoRA with --lora-rank) "
        "on (assigned noise -> target) with latent + pixel losses, plus preserve losses against "
        "the frozen base on random noise. --direct trains on fresh random noise instead (the "
        "baseline). Writes checkpoint-best/, checkpoint-final/, checkpoint-epoch-NNN/ (diffusers "
        "pipelines, or LoRA weights), train_history.png, train_summary.json; resumable "
        "checkpoints under checkpoints/ (--resume latest).",
    )
    p.add_argument(
        "--manifest-path",
        required=True,
        help="manifest.jsonl written by build-dataset (or its folder)",
    )
    p.add_argument(
        "--output-dir",
        default="outputs/latent_matched_sft",
        help="run folder (default: %(default)s)",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="the random-noise baseline: the same targets, fresh N(0, I) noise every step",
    )
    add_generator_options(
        p,
        with_device=False,
        with_compile=False,
        size_first="the size the dataset's dataset_config.json records, else ",
        steps_first="default: the steps the dataset's dataset_config.json records; ",
    )
    add_sft_options(p)
    p.add_argument(
        "--latent-loss-weight",
        type=nonneg_float,
        default=1.0,
        help="weight of the latent MSE to the target's VAE latent (default: %(default)s)",
    )
    p.add_argument(
        "--pixel-l1-weight",
        type=nonneg_float,
        default=0.1,
        help="weight of the pixel L1 to the target image (default: %(default)s)",
    )
    p.add_argument(
        "--init-lora",
        default=None,
        help="continue training this LoRA (a folder or file pipe.load_lora_weights reads)",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--resume", default=None, help="'latest' or a checkpoint folder under checkpoints/"
    )
    p.add_argument("--overwrite", action="store_true", help="start over in a folder holding a run")
    p.add_argument(
        "--allow-other-generator",
        action="store_true",
        help="train on a dataset built with another generator or model (its dataset_config.json "
        "says which): a warning instead of the refusal",
    )
    p.set_defaults(func=_run_sft)

    p = verbs.add_parser(
        "em",
        help="EM loop: build-dataset with the current model (E), SFT from it (M), repeated",
        description="Cycle k writes OUTPUT_DIR/cycle-NNN/{dataset,sft}; the next cycle starts "
        "from the last cycle's checkpoint-final. Re-running resumes (finished cycles are kept, "
        "an unfinished one goes on where it stopped).",
    )
    add_data_options(p)
    p.add_argument(
        "--output-dir",
        "--work-dir",  # the seed's name
        dest="output_dir",
        default="outputs/em_latent_matched_sft",
        help="work folder, one cycle-NNN/ per cycle (default: %(default)s; --work-dir: the "
        "seed's name)",
    )
    p.add_argument(
        "--initial-model-id",
        dest="initial_model",
        default=None,
        help="the seed's name for --model",
    )
    p.add_argument(
        "--num-cycles", type=positive_int, default=2, help="E+M cycles (default: %(default)s)"
    )
    add_generator_options(
        p,
        with_device=False,
        with_compile=False,
        size_first="on a resumed loop the size its first dataset records, else ",
    )
    add_assign_options(p, prefix="assign-")
    p.add_argument(
        "--assign-batch-size",
        type=positive_int,
        default=4,
        help="samples optimised together in the E-step (default: %(default)s)",
    )
    add_sft_options(p, prefix="train-")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--resume",
        choices=("latest", "restart"),
        default="latest",
        help="an unfinished M-step: continue from its last checkpoint (latest) or start it "
        "over (restart); finished cycles are kept (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start the whole loop over in a folder that holds cycles (they are removed)",
    )
    p.set_defaults(func=_run_em)


# ----------------------------------------------------------------------------- handlers


def _device(args):
    from diffalign.engine.distributed import check_device
    from diffalign.noise.assign import dist_state

    if getattr(args, "device", None):
        return check_device(args.device)
    _, world, state = dist_state()
    if state is not None:
        return str(state.device)
    return None


def check_speed_options(args, device: str | None) -> None:
    """`--cuda-graphs` off CUDA is one error line, before any model loads."""
    if getattr(args, "cuda_graphs", False):
        from diffalign.engine.compile import check_cuda_graphs

        check_cuda_graphs(device)


def speed_up(args, generator, reward=None) -> None:
    """`--compile` / `--cuda-graphs`: compile the generator's (and the reward's) forward."""
    cuda_graphs = getattr(args, "cuda_graphs", False)
    if getattr(args, "compile_forward", False) or cuda_graphs:
        from diffalign.noise.onestep import compile_generator

        compile_generator(generator, cuda_graphs=cuda_graphs, reward=reward)


def _load(args, model: str | None = None, first: bool = True):
    """The generator of ``model`` (default ``--model``) as `generator_recipe` finds it; an
    earlier `noise sft` / `em` export runs as the recipe it recorded, its Hyper-SD weights not
    applied again. ``--weights`` goes to the initial model only (``first``). `--compile`
    compiles its forward (assign, build-dataset)."""
    from diffalign.noise.generators import load_generator

    check_speed_options(args, _device(args))
    gen = load_generator(
        model or args.model,
        args.generator,
        weights=args.weights if first else None,
        dtype=args.dtype,
        device=_device(args),
        vae=args.vae,
        height=args.height,
        width=args.width,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        num_steps=args.num_steps,
    )
    speed_up(args, gen)
    return gen


def _model_info(args, gen) -> dict:
    return {
        "model": args.model,
        "generator": gen.name,
        "dtype": args.dtype,
        "vae": args.vae,
        "weights": args.weights,
        "num_steps": getattr(gen, "num_steps", 1),
    }


def _run_assign(args) -> int:
    from diffalign.noise.assign import assign_image, check_assign_image_before_loading

    check_assign_image_before_loading(args.prompt, args.output_dir, args.overwrite)
    gen = _load(args)
    s = assign_image(
        gen,
        args.target_image,
        args.prompt,
        args.output_dir,
        steps=args.steps,
        lr=args.lr,
        patch_size=args.patch_size,
        parametrization=args.parametrization,
        latent_loss_weight=args.latent_loss_weight,
        pixel_l1_weight=args.pixel_l1_weight,
        seed=args.seed,
        resize=args.resize,
        num_intermediates=args.num_intermediates,
        overwrite=args.overwrite,
    )
    print(
        f"loss {s['loss_before']:.5f} -> {s['loss_after']:.5f} (best step {s['best_step']}); "
        f"{args.output_dir}/best_input_noise.safetensors"
    )
    return 0


def _settings(args, prefix: str = ""):
    from diffalign.noise.dataset import AssignSettings

    return AssignSettings(
        steps=getattr(args, f"{prefix}steps"),
        lr=getattr(args, f"{prefix}lr"),
        patch_size=args.patch_size,
        parametrization=args.parametrization,
        latent_loss_weight=args.latent_loss_weight,
        pixel_l1_weight=args.pixel_l1_weight,
        seed=args.seed,
        resize=args.resize,
    )


def _run_build(args) -> int:
    from diffalign.noise.dataset import build_dataset, check_dataset_before_loading

    options = dict(
        settings=_settings(args),
        prompt_field=args.prompt_field,
        image_field=args.image_field,
        batch_size=args.batch_size,
        max_items=args.max_items,
        num_intermediates=args.num_intermediates,
        plots=not args.no_plots,
        overwrite=args.overwrite,
    )
    check_dataset_before_loading(args.data_root, args.output_dir, **options)  # a used folder
    gen = _load(args)
    s = build_dataset(
        gen, args.data_root, args.output_dir, model_info=_model_info(args, gen), **options
    )
    if s:
        print(
            f"{s['finished']} samples assigned, {s['failed']} failed "
            f"({args.output_dir}/manifest.jsonl, failures.jsonl)"
        )
        if s["finished"] == 0:
            import sys

            print(
                f"diffalign: error: no sample could be assigned; reasons in "
                f"{args.output_dir}/failures.jsonl",
                file=sys.stderr,
            )
            return 2  # bad input, like every other one-line error (README)
    return 0


def _sft_kwargs(args, prefix: str = "") -> dict:
    return {
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "epochs": getattr(args, f"{prefix}epochs"),
        "max_steps": getattr(args, f"{prefix}max_steps"),
        "batch_size": getattr(args, f"{prefix}batch_size"),
        "lr": getattr(args, f"{prefix}lr"),
        "latent_loss_weight": args.latent_loss_weight,
        "pixel_l1_weight": args.pixel_l1_weight,
        "preserve_latent_weight": args.preserve_latent_weight,
        "preserve_pixel_weight": args.preserve_pixel_weight,
        "ema_decay": args.ema_decay,
        "mixed_precision": args.mixed_precision,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "weight_decay": args.weight_decay,
        "val_items": args.val_items,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "tracker": args.tracker,
        "deterministic": args.deterministic,
        "compile": args.compile,
    }


def _check_train_dtype(args) -> None:
    from diffalign.engine.errors import DiffalignError

    if args.dtype != "fp32":
        raise DiffalignError(
            "fine-tuning keeps float32 weights: use --dtype fp32 with --mixed-precision "
            "fp16|bf16 for half-precision compute"
        )


def _run_sft(args) -> int:
    from diffalign.noise.dataset import BuiltDataset, dataset_image_size, recorded_num_steps
    from diffalign.noise.sft import check_before_loading, sft

    _check_train_dtype(args)
    dataset = BuiltDataset(args.manifest_path)  # its files are read once for the run
    # the dataset's noises and targets have the size it records: the default here
    args.height, args.width = dataset_image_size(dataset, args.height, args.width)
    if args.num_steps is None and not (args.direct or args.allow_other_generator):
        # its noises were assigned for the generator at these steps: the default here
        args.num_steps = recorded_num_steps(dataset)
    common = dict(
        direct=args.direct,
        init_lora=args.init_lora,
        resume=args.resume,
        overwrite=args.overwrite,
        **_sft_kwargs(args),
    )
    check_before_loading(dataset, args.output_dir, **common)  # a used folder: now
    gen = _load(args)
    _check_init_lora(args.init_lora, gen.name)
    r = sft(
        gen,
        dataset,
        args.output_dir,
        model_info=_model_info(args, gen),
        allow_other_generator=args.allow_other_generator,
        **common,
    )
    print(f"model: {r['model']} ({r['steps']} steps; best: {r['best']})")
    return 0


def _check_init_lora(init_lora, kind: str) -> None:
    """An `--init-lora` export made for another recipe does not continue on this one."""
    from diffalign.engine.errors import DiffalignError
    from diffalign.noise.recipes import RECIPE_FILE, read_recorded_recipe

    record = read_recorded_recipe(init_lora)
    if record is not None and record["generator"] != kind:
        raise DiffalignError(
            f"--init-lora {init_lora} was trained on {record['generator']} ({RECIPE_FILE}), "
            f"not on this {kind} model"
        )


def _run_em(args) -> int:
    from pathlib import Path

    from diffalign.noise.dataset import dataset_image_size
    from diffalign.noise.em import em

    _check_train_dtype(args)
    if args.initial_model:
        args.model = args.initial_model
    # a resumed EM run goes on at the size its first dataset was built at
    if not args.overwrite:
        first = Path(args.output_dir) / "cycle-000" / "dataset"
        args.height, args.width = dataset_image_size(first, args.height, args.width)
    settings = _settings(args, "assign_")
    assign_kwargs = {
        "settings": settings,
        "prompt_field": args.prompt_field,
        "image_field": args.image_field,
        "batch_size": args.assign_batch_size,
        "max_items": args.max_items,
        "num_intermediates": args.num_intermediates,
        "plots": not args.no_plots,
    }
    s = em(
        args.model,
        args.data_root,
        args.output_dir,
        num_cycles=args.num_cycles,
        load=lambda model, first: _load(args, model, first),
        assign_kwargs=assign_kwargs,
        sft_kwargs=_sft_kwargs(args, "train_"),
        lora=args.lora_rank is not None,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    print(f"final model: {s['final_model']} ({s['num_cycles']} cycles)")
    return 0
