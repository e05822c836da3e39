"""`diffalign fill ...` (spec F): FLUX.1-Fill with a semantic cross-attention branch.

Each verb lives in its own `cli_*.py` module exposing `register(verbs)`; list it here.
"""

from __future__ import annotations

import importlib

from diffalign.engine.cliutils import make_subparsers

# Verb modules, in `--help` order.
VERB_MODULES: tuple[str, ...] = ("cli_data", "cli_train", "cli_infer")


def register(sub) -> None:
    parser = sub.add_parser(
        "fill",
        help="FLUX.1-Fill in-context inpainting with semantic cross-attention (spec F)",
        description=(
            "FLUX.1-Fill in-context inpainting on [visible | target] diptychs with a semantic "
            "cross-attention branch fed by a third (semantic) panel: triptych data, training, "
            "inference."
        ),
    )
    verbs = make_subparsers(parser)
    for name in VERB_MODULES:
        importlib.import_module(f"diffalign.fill.{name}").register(verbs)
