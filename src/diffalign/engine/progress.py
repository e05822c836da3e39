"""Progress bars for long work; quiet on non-main processes and when DIFFALIGN_NO_PROGRESS is set.

The variable also silences the bars the libraries draw themselves (diffusers' "Loading pipeline
components...", transformers' "Loading weights", huggingface_hub's downloads, a pipeline's
per-step bar): `quiet_library_bars`, called when the CLI starts and when a pipeline is built.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tqdm.auto is imported on first use: the CLI starts without it
    from tqdm.auto import tqdm


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed); read from the launcher's environment."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def no_progress() -> bool:
    """True when DIFFALIGN_NO_PROGRESS is set (read at call time)."""
    return bool(os.environ.get("DIFFALIGN_NO_PROGRESS"))


# (module, function) that turns a library's own bars off, process-wide
_LIBRARY_SWITCHES = (
    ("diffusers.utils.logging", "disable_progress_bar"),
    ("transformers.utils.logging", "disable_progress_bar"),
    ("huggingface_hub.utils", "disable_progress_bars"),
)


def quiet_library_bars(pipe: Any = None) -> None:
    """With DIFFALIGN_NO_PROGRESS set, turn off the libraries' own progress bars and `pipe`'s
    per-step bar (a diffusers pipeline); without it, change nothing.

    Only libraries already imported are switched (importing diffusers costs seconds); the ones
    imported later read HF_HUB_DISABLE_PROGRESS_BARS (transformers, huggingface_hub) or are
    switched when `engine.loading.load_pipeline` builds a pipeline (diffusers).
    """
    if not no_progress():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for module, switch in _LIBRARY_SWITCHES:
        if module in sys.modules:
            getattr(sys.modules[module], switch)()
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)


def progress(
    iterable: Iterable | None = None,
    desc: str = "",
    total: int | None = None,
    disable: bool | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar with our defaults."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = (not is_main_process()) or no_progress()
    return tqdm(
        iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False, **kwargs
    )
