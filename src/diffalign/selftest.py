"""`diffalign selftest`: every equivalence check of the engine and the capabilities, run on the
real assets under a models folder (the framework and the reward checks: `engine/selftest.py`;
the generator, Fill and text-stream checks: `<capability>/selftest.py`).

    from diffalign.selftest import run_selftest
    code = run_selftest("models", output_dir="reports")   # 0: all passed, 1: a check failed

Imports are lazy so that `diffalign --help` does not pull in torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# modules whose import registers checks (`engine.selftest.register_check`)
CHECK_MODULES: tuple[str, ...] = (
    "diffalign.engine.selftest",
    "diffalign.noise.selftest",
    "diffalign.fill.selftest",
    "diffalign.textstream.selftest",
)


def load_checks() -> list:
    """Import every module of CHECK_MODULES; returns the registered checks."""
    import importlib

    for name in CHECK_MODULES:
        importlib.import_module(name)
    from diffalign.engine.selftest import registered_checks

    return registered_checks()


def run_selftest(
    models: str | Path | None = None,
    output_dir: str | Path = ".",
    *,
    device: str | None = None,
    size: int = 64,
    log: Callable[[str], None] = print,
) -> int:
    """Run every check on the assets under `models` (default: `$DIFFALIGN_MODELS_DIR` or
    `./models`), print the table, write `<output_dir>/selftest.json`; returns the exit code."""
    from diffalign.engine.loading import models_dir
    from diffalign.engine.selftest import run_checks

    checks = load_checks()
    return run_checks(
        models if models is not None else models_dir(),
        output_dir,
        device=device,
        size=size,
        checks=checks,
        log=log,
    )


def register(sub) -> None:
    """`diffalign selftest` on the top-level subparsers."""
    p = sub.add_parser(
        "selftest",
        help="run the equivalence checks of the tests on the real models you downloaded",
        description=(
            "Find every asset under --models by its contents (diffusers pipelines by "
            "model_index.json, transformers models by config.json, reward and weight files by "
            "their official names) and run the checks our tests run on tiny models: each "
            "one-step and few-step generator (FLUX.1-schnell, SD3.5-Large-Turbo, SANA-Sprint, "
            "PixArt DMD: on the folders of their own release) against its own diffusers "
            "pipeline, each reward against a "
            "plain reference forward of its official layout, FillEncoder against "
            "FluxFillPipeline's preparation, LoRA round trips (Fill, U-Net), attach_semantic, and the "
            "text-stream residual switched off = the plain pipeline, bit for bit (SD3/SD3.5, "
            "FLUX.1, Qwen-Image). Prints a "
            "table (asset, check, max difference, verdict) and writes selftest.json. Exit "
            "status: 0 when every check passed (skipped checks and an empty folder included), "
            "1 when a check failed or raised, 2 on bad input."
        ),
    )
    p.add_argument(
        "--models",
        default=None,
        metavar="DIR",
        help="models folder (default: $DIFFALIGN_MODELS_DIR or ./models)",
    )
    p.add_argument(
        "--output-dir",
        default=".",
        metavar="DIR",
        help="where selftest.json goes (default: the current folder)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help="image side of the generator, Fill and text-stream checks, a multiple of 16 "
        "(default: %(default)s; small keeps the real models fast)",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    return run_selftest(args.models, args.output_dir, device=args.device, size=args.size)
