"""`diffalign repa ...` (spec R)."""

from __future__ import annotations

from diffalign.engine.cliutils import make_subparsers


def register(sub) -> None:
    from diffalign.repa import cli_train

    parser = sub.add_parser(
        "repa",
        help="U-REPA on SD 1.5: preprocess, train, extract, probe (spec R)",
        description="U-REPA: align an SD 1.5 U-Net bottleneck with DINOv2 tokens.",
    )
    verbs = make_subparsers(parser)
    cli_train.register(verbs)
