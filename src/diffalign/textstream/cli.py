"""`diffalign textstream ...` (spec T)."""

from __future__ import annotations

from diffalign.engine.cliutils import make_subparsers


def register(sub) -> None:
    from diffalign.textstream import cli_calibrate, cli_generate, cli_weights

    parser = sub.add_parser(
        "textstream",
        help="text-stream residual injection for SD3/SD3.5, FLUX.1 and Qwen-Image (spec T)",
        description="Text-stream residual injection for SD3 / SD3.5, FLUX.1-dev / -schnell and "
        "Qwen-Image: calibrate rotations, learn weights, generate.",
    )
    verbs = make_subparsers(parser)
    cli_calibrate.register(verbs)
    cli_generate.register(verbs)
    cli_weights.register(verbs)
