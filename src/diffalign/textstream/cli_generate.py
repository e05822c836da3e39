"""`diffalign textstream sample | generate | geneval | dpg | compbench` (spec T: Generation;
seed 002).

Parsing only; the work is in `diffalign.textstream.generate`. Heavy imports stay in handlers.
"""

from __future__ import annotations

from diffalign.engine.cliutils import (
    nonneg_float,
    nonneg_int,
    positive_int,
    seed_int,
)

_RESIDUAL_HELP = (
    "Residual text-stream options (seeds 002/000): re-inject the text tokens of the origin "
    "layer into the text stream of each target block."
)


def _add_common(
    p, *, multi_model: bool = False, size: bool = True, geneval_spellings: bool = False
) -> None:
    """Sampling and residual options; `geneval_spellings` adds GenEval's own script's names
    (`--H`, `--W`, `--scale`) so its users can swap commands."""
    h_names = ["--height", "--H"] if geneval_spellings else ["--height"]
    w_names = ["--width", "--W"] if geneval_spellings else ["--width"]
    cfg_names = ["--cfg", "--scale"] if geneval_spellings else ["--cfg"]
    g = p.add_argument_group("sampling")
    if multi_model:
        g.add_argument(
            "--model",
            nargs="+",
            action="extend",
            default=None,
            metavar="MODEL",
            help="sd3 | sd3.5 | sd3.5-medium | flux-dev | flux-schnell | qwen-image | diffusers "
            "folder | Hub id | single-file .safetensors; several give one folder per "
            "prompt/model (default: sd3)",
        )
    else:
        g.add_argument(
            "--model",
            default="sd3",
            help="sd3 | sd3.5 | sd3.5-medium | flux-dev | flux-schnell | qwen-image | diffusers "
            "folder | Hub id | single-file .safetensors (default: %(default)s)",
        )
    g.add_argument("--vae", default=None, help="VAE to use instead of the model's own")
    g.add_argument(
        "--single-file-config",
        default=None,
        help="diffusers folder or Hub id whose config a single-file --model uses (default: "
        "inferred from the file)",
    )
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="denoising steps (default: the model card's: SD3 28, FLUX.1-dev 28, "
        "FLUX.1-schnell 4, Qwen-Image 50)",
    )
    g.add_argument(
        *cfg_names,
        dest="cfg",
        type=nonneg_float,
        default=None,
        help="classifier-free guidance scale (true CFG on FLUX.1 / Qwen-Image), a finite "
        "number >= 0 (default: SD3 7.0, FLUX.1 1.0 = off, Qwen-Image 4.0)",
    )
    g.add_argument(
        "--guidance",
        type=nonneg_float,
        default=None,
        help="FLUX.1 distilled guidance (default: dev 3.5, schnell 0; not for other models)",
    )
    if size:
        g.add_argument(
            *h_names,
            dest="height",
            type=positive_int,
            default=None,
            help="image height (default: the model's own sample size, 1024 on SD3/SD3.5)",
        )
        g.add_argument(
            *w_names,
            dest="width",
            type=positive_int,
            default=None,
            help="image width (default: the model's own sample size, 1024 on SD3/SD3.5)",
        )
    else:  # dpg: tiles are --resolution squared; equal --height and --width set it
        g.add_argument(
            "--height",
            type=positive_int,
            default=None,
            help="tile height: must equal --width (and --resolution if given)",
        )
        g.add_argument(
            "--width",
            type=positive_int,
            default=None,
            help="tile width: must equal --height (and --resolution if given)",
        )
    g.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="base seed; image k of prompt i uses seed + i*n_samples + k (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per pipeline call (default: all samples of a prompt at once)",
    )
    g.add_argument("--negative-prompt", default=None, help="negative prompt (default: none)")
    g.add_argument(
        "--dtype",
        default=None,
        help="fp32 | fp16 | bf16 (default: bf16 on cuda, fp32 on cpu)",
    )
    g.add_argument(
        "--device",
        default=None,
        help="torch device (default: the process's accelerate device, cuda if available)",
    )
    g.add_argument(
        "--max-sequence-length",
        type=positive_int,
        default=None,
        help="text-encoder token length (default: SD3 256, FLUX.1-dev 512, FLUX.1-schnell "
        "256, Qwen-Image 512)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: redo every prompt, also when the folder was made with other "
        "settings or prompts (default: skip finished prompts, so a run can be resumed; a "
        "re-run with other settings or prompts is refused)",
    )

    r = p.add_argument_group("residual", _RESIDUAL_HELP)
    r.add_argument(
        "--residual-origin-layer",
        type=nonneg_int,
        default=None,
        metavar="INT",
        help="layer whose incoming text tokens are re-used; 0 = before block 0 "
        "(default: 0, or the rotation file's)",
    )
    r.add_argument(
        "--residual-target-layers",
        nargs="*",
        default=None,
        metavar="LAYERS",
        help='blocks receiving the residual: "3,5,7" or "3 5 7"; "" = off '
        "(default: off, or the rotation file's layers)",
    )
    r.add_argument(
        "--residual-weights",
        nargs="*",
        default=None,
        metavar="WEIGHTS",
        help="one weight per target, or one for all (default: 1.0 each)",
    )
    r.add_argument(
        "--residual-weights-file",
        default=None,
        metavar="FILE",
        help="learned weights from `textstream train-weights` (residual_weights.safetensors): "
        "sets origin, targets, weights and mode; give the rotation file it was trained with",
    )
    r.add_argument(
        "--residual-procrustes-path",
        default=None,
        metavar="FILE",
        help="rotation file from `diffalign textstream calibrate` (implies --residual-mode ln)",
    )
    r.add_argument(
        "--residual-mode",
        choices=["plain", "ln"],
        default=None,
        help="plain: c + w*o; ln: standardise, rotate, mix, rescale (default: plain, or ln "
        "with a rotation file)",
    )
    r.add_argument(
        "--residual-layernorm",
        action="store_true",
        help="parameter-free LayerNorm on the mix before rescaling (ln mode)",
    )
    r.add_argument(
        "--col-center",
        action="store_true",
        help="check that the rotation file was calibrated with --col-center (refused "
        "otherwise); the file is applied as any other, no centring at generation (the "
        "method authors' generation code)",
    )


def register(verbs) -> None:
    """Add sample, generate, geneval, dpg and compbench to `diffalign textstream`."""
    p = verbs.add_parser(
        "sample",
        help="images for one or more prompts and models (seed 002's sd3_infer.py)",
        description="Generate images for each prompt with each model, with the optional "
        "text-stream residual. One folder per prompt/model under --output-dir: "
        "<model>_<prompt slug>/000.png ..., grid.png, settings.json.",
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text (repeat for several)"
    )
    p.add_argument(
        "--output-dir",
        "--save-dir",
        default="outputs",
        help="where the prompt/model folders go (default: %(default)s)",
    )
    p.add_argument(
        "--n-samples", type=positive_int, default=1, help="images per prompt (default: %(default)s)"
    )
    _add_common(p, multi_model=True)
    p.set_defaults(func=_run_sample)

    p = verbs.add_parser(
        "generate",
        help="images for every prompt of a prompt file or dataset",
        description="Generate images for a prompt set (.txt, .jsonl, COCO captions json, "
        "GenEval metadata, DPG-Bench folder, or names coco/coco2014/geneval/dpg under "
        "--datadir; comma-separated to combine). Layout: OUT/<index:05d>_<slug>/000.png ..., "
        "prompt.json and settings.json per folder, OUT/settings.json and OUT/summary.json.",
    )
    p.add_argument("--prompts", required=True, help="prompt file, folder or dataset name(s)")
    p.add_argument("--datadir", default=None, help="folder the dataset names are looked up in")
    p.add_argument("--output-dir", "--save-dir", required=True, help="output folder")
    p.add_argument(
        "--n-samples", type=positive_int, default=1, help="images per prompt (default: %(default)s)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    p.add_argument(
        "--prompt-field", default="prompt", help="prompt key in .jsonl files (default: %(default)s)"
    )
    _add_common(p)
    p.set_defaults(func=_run_generate)

    p = verbs.add_parser(
        "geneval",
        help="GenEval images: OUT/<00000>/metadata.jsonl + samples/0000.png",
        description="Generate the GenEval image folders from evaluation_metadata.jsonl: "
        "OUT/<index:05d>/metadata.jsonl (the prompt's line), OUT/<index:05d>/samples/0000.png "
        "..., grid.png; run records in OUT/settings.json and OUT/summary.json. Resumable; "
        "shard with `accelerate launch`. The spellings of GenEval's own "
        "generation/diffusers_generate.py work too: METADATA_FILE positional, --outdir, --n_samples, --H, --W, --scale, --steps, "
        "--seed, --batch_size, --skip_grid.",
    )
    p.add_argument(
        "metadata_file",
        nargs="?",
        default=None,
        metavar="METADATA_FILE",
        help="GenEval evaluation_metadata.jsonl (GenEval's positional spelling of --metadata)",
    )
    p.add_argument("--metadata", default=None, help="GenEval evaluation_metadata.jsonl")
    p.add_argument(
        "--output-dir",
        "--save-dir",
        "--outdir",
        dest="output_dir",
        required=True,
        help="output folder (--outdir: GenEval's spelling)",
    )
    p.add_argument(
        "--n-samples", type=positive_int, default=4, help="images per prompt (default: %(default)s)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    p.add_argument(
        "--skip-grid",
        action="store_true",
        help="do not write grid.png into each prompt folder (GenEval's --skip_grid)",
    )
    _add_common(p, geneval_spellings=True)
    p.set_defaults(func=_run_geneval)

    p = verbs.add_parser(
        "dpg",
        help="DPG-Bench images: OUT/<id>.png, 2x2 grids",
        description="Generate DPG-Bench images from prompts/<id>.txt: one flat folder with "
        "only <id>.png, each a row-major 2x2 grid of 4 samples of --resolution squared. The run "
        "records go beside the folder: OUT.settings.json and OUT.summary.json. Resumable; "
        "shard with `accelerate launch`.",
    )
    p.add_argument("--prompts-dir", required=True, help="DPG-Bench prompts/ folder or its parent")
    p.add_argument("--output-dir", "--save-dir", required=True, help="output folder")
    p.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="tile size in pixels (default: --height when --height and --width are equal, "
        "else the model's own sample size, 1024 on SD3/SD3.5)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N prompts")
    _add_common(p, size=False)
    p.set_defaults(func=_run_dpg)

    p = verbs.add_parser(
        "compbench",
        help="T2I-CompBench images: OUT/samples/<prompt>_000000.png",
        description="Generate T2I-CompBench images from a <category>_val.txt prompt file "
        "(one prompt a line): OUT/samples/<prompt>_<counter:06d>.png, the counter running "
        "over the file's images from 0 (image k of prompt i: i*n_samples + k), as its "
        "evaluators read them with --out_dir OUT. A folder of <category>_val.txt files gives "
        "OUT/<category>/samples/ per category. Run records in OUT/settings.json and "
        "OUT/summary.json. Resumable; shard with `accelerate launch`.",
    )
    p.add_argument(
        "--prompts",
        "--from-file",
        dest="prompts",
        required=True,
        help="a <category>_val.txt file, or a folder of them (or its dataset/ subfolder); "
        "--from-file: T2I-CompBench's spelling",
    )
    p.add_argument(
        "--output-dir",
        "--save-dir",
        "--outdir",
        dest="output_dir",
        required=True,
        help="output folder (--outdir: T2I-CompBench's spelling)",
    )
    p.add_argument(
        "--n-samples",
        type=positive_int,
        default=10,
        help="images per prompt (default: %(default)s, T2I-CompBench's)",
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N prompts of each file"
    )
    _add_common(p)
    p.set_defaults(func=_run_compbench)


def dpg_resolution(resolution: int | None, height: int | None, width: int | None) -> int | None:
    """DPG-Bench tiles are square: `--resolution`, or equal `--height`/`--width`, else None
    (the model's own sample size)."""
    from diffalign.engine.errors import DiffalignError

    sides = {name: v for name, v in (("height", height), ("width", width)) if v is not None}
    if resolution is None:
        if not sides:
            return None
        if len(sides) == 2 and height == width:
            return int(height)
        raise DiffalignError(
            f"DPG-Bench tiles are square: give --resolution, or --height and --width equal "
            f"(got {', '.join(f'--{k} {v}' for k, v in sides.items())})"
        )
    for name, value in sides.items():
        if value != resolution:
            raise DiffalignError(
                f"--{name} {value} differs from --resolution {resolution}; DPG-Bench "
                "tiles are square, set --resolution only"
            )
    return int(resolution)


def _configs(args, n_samples: int, model: str | None = None):
    from diffalign.engine.cliutils import parse_float_list, parse_int_list
    from diffalign.textstream.generate import GenerationConfig, ResidualConfig
    from diffalign.textstream.weights import apply_weights_file

    cfg = GenerationConfig(
        model=model if model is not None else args.model,
        vae=args.vae,
        single_file_config=args.single_file_config,
        steps=args.steps,
        cfg=args.cfg,
        height=args.height,
        width=args.width,
        seed=args.seed,
        n_samples=n_samples,
        batch_size=args.batch_size,
        negative_prompt=args.negative_prompt,
        dtype=args.dtype,
        device=args.device,
        max_sequence_length=args.max_sequence_length,
        overwrite=args.overwrite,
        guidance=args.guidance,
    )
    targets = args.residual_target_layers
    weights = args.residual_weights
    rc = ResidualConfig(
        origin_layer=args.residual_origin_layer,
        target_layers=None
        if targets is None
        else parse_int_list(targets, "--residual-target-layers"),
        weights=None if not weights else parse_float_list(weights, "--residual-weights") or None,
        weights_file=args.residual_weights_file,
        mode=args.residual_mode,
        procrustes_path=args.residual_procrustes_path,
        layernorm=args.residual_layernorm,
        col_center=args.col_center,
    )
    return cfg, apply_weights_file(rc)


def _print_summary(summary: dict, where: str) -> None:
    from diffalign.engine.progress import is_main_process

    if is_main_process():
        print(
            f"{summary['command']}: {summary['prompts_done']} prompts generated, "
            f"{summary['prompts_skipped']} skipped, {summary['images_written']} images in "
            f"{summary['seconds']:.1f} s -> {where}"
        )


def _run_sample(args) -> int:
    from diffalign.textstream.generate import run_sample

    models = args.model or ["sd3"]
    cfg, rc = _configs(args, args.n_samples, model=models[0])
    summary = run_sample(args.prompt, models, args.output_dir, cfg, rc)
    _print_summary(summary, args.output_dir)
    return 0


def _run_generate(args) -> int:
    from diffalign.textstream.generate import run_generate

    cfg, rc = _configs(args, args.n_samples)
    summary = run_generate(
        args.prompts,
        args.output_dir,
        cfg,
        rc,
        datadir=args.datadir,
        limit=args.limit,
        prompt_field=args.prompt_field,
    )
    _print_summary(summary, args.output_dir)
    return 0


def _run_geneval(args) -> int:
    from diffalign.engine.errors import DiffalignError
    from diffalign.textstream.generate import run_geneval

    given = [m for m in (args.metadata_file, args.metadata) if m is not None]
    if not given:
        raise DiffalignError("give the GenEval metadata file: --metadata FILE (or FILE alone)")
    if len(given) == 2 and given[0] != given[1]:
        raise DiffalignError(
            f"two metadata files given ({given[0]} and --metadata {given[1]}); give one"
        )
    cfg, rc = _configs(args, args.n_samples)
    summary = run_geneval(
        given[0], args.output_dir, cfg, rc, limit=args.limit, grid=not args.skip_grid
    )
    _print_summary(summary, args.output_dir)
    return 0


def _run_dpg(args) -> int:
    from diffalign.textstream.generate import run_dpg

    args.resolution = dpg_resolution(args.resolution, args.height, args.width)
    args.height = args.width = args.resolution
    cfg, rc = _configs(args, 4)
    summary = run_dpg(
        args.prompts_dir, args.output_dir, cfg, rc, resolution=args.resolution, limit=args.limit
    )
    _print_summary(summary, args.output_dir)
    return 0


def _run_compbench(args) -> int:
    from diffalign.textstream.generate import run_compbench

    cfg, rc = _configs(args, args.n_samples)
    summary = run_compbench(args.prompts, args.output_dir, cfg, rc, limit=args.limit)
    _print_summary(summary, args.output_dir)
    return 0
