"""Progress bars for long work; quiet on non-main processes and when DIFFALIGN_NO_PROGRESS is set."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed); read from the launcher's environment."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def progress(
    iterable: Iterable | None = None,
    desc: str = "",
    total: int | None = None,
    disable: bool | None = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar with our defaults."""
    if disable is None:
        disable = (not is_main_process()) or bool(os.environ.get("DIFFALIGN_NO_PROGRESS"))
    return tqdm(
        iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False, **kwargs
    )
