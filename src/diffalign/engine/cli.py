"""Engine commands: `diffalign make-tiny` and `diffalign download` (spec E)."""

from __future__ import annotations

from diffalign.engine.cliutils import seed_int


def register(sub) -> None:
    """Add the engine's commands to the top-level subparsers."""
    _register_make_tiny(sub)
    _register_download(sub)


def _register_make_tiny(sub) -> None:
    from diffalign.engine.tiny import describe_kinds, kind_names  # light: no torch import

    p = sub.add_parser(
        "make-tiny",
        help="write a tiny random model in the real on-disk format (tests, smoke runs)",
        description=(
            "Write a small randomly initialised model in the same on-disk format as the real "
            "checkpoint (diffusers folder, tokenizers built offline), loadable with "
            "from_pretrained and with --model of every command. Kinds: " + describe_kinds() + "."
        ),
    )
    p.add_argument("kind", metavar="KIND", help=f"model kind: {', '.join(kind_names())}")
    p.add_argument(
        "--output-dir",
        "--out",  # the earlier spelling
        dest="out",
        metavar="DIR",
        required=True,
        help="output folder, must be empty or absent (--out: the earlier spelling)",
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the random weights (default: %(default)s)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --output-dir even if it is not empty"
    )
    g = p.add_argument_group(
        "size overrides (sd3/sd35; default: the tiny test size, only the transformer grows)"
    )
    g.add_argument("--num-layers", type=int, default=None, help="transformer blocks (tiny: 4)")
    g.add_argument(
        "--num-attention-heads", type=int, default=None, help="attention heads (tiny: 4)"
    )
    g.add_argument(
        "--attention-head-dim",
        type=int,
        default=None,
        help="width of one head (tiny: 8); heads x head dim = transformer width",
    )
    g.add_argument(
        "--joint-attention-dim",
        type=int,
        default=None,
        help="text-embedding width = T5 width (tiny: 32; real SD3: 4096)",
    )
    g.add_argument("--sample-size", type=int, default=None, help="latent side length (tiny: 16)")
    g.add_argument("--patch-size", type=int, default=None, help="patch size (tiny: 2)")
    g.add_argument(
        "--dual-attention-layers",
        default=None,
        help="sd35 only: comma-separated blocks with the extra image attention (tiny: 0)",
    )
    g.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any size option of the kind (repeatable), e.g. --set block_out_channels=32,64 "
        "for sd15; a value is an integer, a comma-separated list of integers, a number or text",
    )
    p.set_defaults(func=_run_make_tiny)


def _parse_override(item: str):
    """`name=value` -> (name, int | tuple of ints | float | str)."""
    from diffalign.engine.cliutils import split_list
    from diffalign.engine.errors import DiffalignError

    name, sep, text = item.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name:
        raise DiffalignError(f"--set {item!r}: expected NAME=VALUE")
    text = text.strip()
    parts = split_list(text)
    try:
        if len(parts) > 1 or text.endswith(","):
            return name, tuple(int(p) for p in parts)
        return name, int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return name, text
    import math

    if not math.isfinite(value):
        raise DiffalignError(f"--set {item!r}: not a finite number")
    return name, value


def _run_make_tiny(args) -> int:
    from diffalign.engine.cliutils import parse_int_list
    from diffalign.engine.tiny import make_tiny

    overrides = {}
    for name in (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "joint_attention_dim",
        "sample_size",
        "patch_size",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.dual_attention_layers is not None:
        overrides["dual_attention_layers"] = tuple(
            parse_int_list(args.dual_attention_layers, "--dual-attention-layers")
        )
    for item in args.set_overrides:
        name, value = _parse_override(item)
        overrides[name] = value
    out = make_tiny(args.kind, args.out, seed=args.seed, overwrite=args.overwrite, **overrides)
    print(f"wrote tiny {args.kind} model to {out}")
    return 0


def _register_download(sub) -> None:
    import argparse

    from diffalign.engine.download import HPS_FILES, describe_assets  # light: no hub import

    p = sub.add_parser(
        "download",
        help="fetch real models and reward weights into models/ (huggingface_hub)",
        description=(
            "Download assets from the Hugging Face Hub into <dir>/<NAME>/ (the layout the "
            "loaders and presets look in). Complete assets are skipped; each asset is written "
            "into a temp folder and renamed into place, so a failure leaves nothing half-written. "
            "Gated repos (SD3, SD3.5, FLUX) need an accepted licence and a token.\n\n"
            "Assets (* = fetched when --only is not given):\n" + describe_assets()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--only",
        action="extend",
        nargs="+",
        metavar="NAME",
        default=None,
        help="fetch only these assets: --only sd3 sd15, --only sd3,sd15 or --only sd3 --only sd15",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="models folder (default: $DIFFALIGN_MODELS_DIR or ./models)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (sources, targets) and fetch nothing"
    )
    p.add_argument(
        "--hps-version",
        choices=sorted(HPS_FILES),
        default="v2.1",
        help="which HPSv2 checkpoint to fetch (default: %(default)s)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="Hugging Face token for gated repos (default: $HF_TOKEN or the saved login)",
    )
    p.set_defaults(func=_run_download)


def _run_download(args) -> int:
    import sys

    from diffalign.engine.cliutils import split_list
    from diffalign.engine.download import download_assets

    only = split_list(args.only) if args.only is not None else None  # --only '' is an error
    result = download_assets(
        only,
        args.dir,
        hps_version=args.hps_version,
        token=args.token,
        dry_run=args.dry_run,
    )
    failed = [name for name, status in result.items() if status == "failed"]
    if failed:
        print(
            f"diffalign: error: {len(failed)} of {len(result)} assets failed: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0
