"""`diffalign fill make-triptychs` (spec F: Data). Heavy imports stay inside the handler."""

from __future__ import annotations

from diffalign.engine.cliutils import positive_int


def register(verbs) -> None:
    p = verbs.add_parser(
        "make-triptychs",
        help="build [visible | target | semantic] triptych images + captions.jsonl",
        description=(
            "Build a triptych training folder from (visible, target, semantic) image triples. "
            "INPUT is either a folder holding NAME_visible.EXT, NAME_target.EXT, "
            "NAME_semantic.EXT (png/jpg/jpeg/webp/bmp) with the caption in NAME.txt, or a jsonl "
            'file of {"visible": PATH, "target": PATH, "semantic": PATH, "prompt": TEXT, '
            '"name": NAME} records (relative paths are relative to the jsonl). Writes '
            "OUT/images/NAME.png (three square panels side by side), OUT/captions.jsonl "
            '({"image": "images/NAME.png", "prompt": ...}) and OUT/summary.json. Every triple is '
            "checked before anything is written (panels of unequal size, non-square panels, "
            "sizes not divisible by 16, missing images or captions are one-line errors) unless "
            "--skip-bad."
        ),
    )
    p.add_argument("--input", required=True, help="folder of NAME_<role>.EXT triples or a jsonl")
    p.add_argument(
        "--output-dir",
        "--out",  # the earlier spelling
        dest="out",
        metavar="DIR",
        required=True,
        help="output folder, locked while running (--out: the earlier spelling)",
    )
    p.add_argument(
        "--panel-size",
        type=positive_int,
        default=512,
        help="side of each square panel, a multiple of 16 (default: %(default)s, FLUX Fill's)",
    )
    p.add_argument(
        "--keep-size",
        action="store_true",
        help="keep the images' native size instead of resizing to --panel-size "
        "(must then be square and divisible by 16; panels above --max-panel-size are resized "
        "down to it)",
    )
    p.add_argument(
        "--max-panel-size",
        type=positive_int,
        default=1024,  # fill.data.MAX_PANEL_SIZE (not imported: the CLI stays light)
        help="largest panel side, a multiple of 16: a larger --panel-size is an error, larger "
        "native panels with --keep-size are resized down to it (default: %(default)s, "
        "FLUX.1's resolution: a 1024 x 2048 diptych, a 3072 x 1024 triptych)",
    )
    p.add_argument(
        "--center-crop",
        action="store_true",
        help="center-crop non-square panels to squares (default: non-square is an error)",
    )
    p.add_argument(
        "--default-prompt",
        default=None,
        help="caption for triples without one (default: a missing caption is an error)",
    )
    p.add_argument(
        "--prompt-field",
        default="prompt",
        help="caption field of a jsonl INPUT (default: %(default)s)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="report, skip and count bad triples in summary.json instead of stopping",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="rebuild even if OUT/captions.jsonl exists"
    )
    p.set_defaults(func=_run_make_triptychs)


def _run_make_triptychs(args) -> int:
    from diffalign.fill.data import make_triptychs

    summary = make_triptychs(
        args.input,
        args.out,
        panel_size=None if args.keep_size else args.panel_size,
        crop=args.center_crop,
        default_prompt=args.default_prompt,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        prompt_field=args.prompt_field,
        max_panel_size=args.max_panel_size,
    )
    for item in summary["skipped_items"]:
        print(f"skipped {item['name']}: {item['reason']}")
    if summary["resized_down"]:
        print(
            f"resized {summary['resized_down']} triples with panels above --max-panel-size "
            f"down to {summary['max_panel_size']}px"
        )
    print(
        f"wrote {summary['written']} triptychs ({summary['panel_size']}px panels) to "
        f"{summary['out']}; {summary['skipped']} skipped"
    )
    return 0
