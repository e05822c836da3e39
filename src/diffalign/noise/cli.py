"""`diffalign noise ...` and `diffalign demo` (spec N)."""

from __future__ import annotations

from diffalign.engine.cliutils import make_subparsers


def register(sub) -> None:
    from diffalign.noise import cli_optimize, cli_theory
    from diffalign.noise.toy import cli as toy_cli

    parser = sub.add_parser(
        "noise",
        help="orthogonal-constrained noise (spec N)",
        description="Orthogonal-constrained noise for one-step generators.",
    )
    verbs = make_subparsers(parser)
    cli_theory.register(verbs)
    cli_optimize.register(verbs)
    toy_cli.register(verbs)


def register_demo(sub) -> None:
    """`diffalign demo`: the toy pipeline on scikit-learn's digits (the README's main job)."""
    from diffalign.noise.toy import cli as toy_cli

    toy_cli.register_demo(sub)
