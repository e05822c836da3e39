"""Errors the user can act on: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


class DiffalignError(Exception):
    """Bad input or a missing asset; the message is the whole story (no traceback)."""

    exit_code = 2


class ModelNotFoundError(DiffalignError):
    """A model could not be found locally and could not be fetched."""

    def __init__(
        self,
        model: str,
        download_name: str | None = None,
        detail: str | None = None,
        fix: str | None = None,
    ):
        hint = (
            f"diffalign download --only {download_name}" if download_name else "diffalign download"
        )
        msg = f"model '{model}' not found"
        if detail:
            msg += f" ({detail})"
        msg += f"; {fix or f'fetch it with `{hint}` or pass a local folder with --model'}"
        super().__init__(msg)
        self.model = model


LIBRARY_LOGGERS = ("diffusers", "transformers", "peft", "huggingface_hub", "accelerate")


@contextlib.contextmanager
def library_output_held(loggers: Sequence[str] = LIBRARY_LOGGERS) -> Iterator[None]:
    """Hold what the libraries log or warn inside the block: passed on if the block succeeds,
    dropped if it raises (the error we report names the cause in one line; diffusers would
    print its own "Loading ... was unsuccessful" lines before it)."""
    import logging
    import warnings

    held: list[tuple[logging.Handler, logging.LogRecord]] = []

    class _Hold(logging.Filter):
        def __init__(self, handler: logging.Handler):
            super().__init__()
            self.handler = handler

        def filter(self, record: logging.LogRecord) -> bool:
            held.append((self.handler, record))
            return False

    handlers = {h for name in (*loggers, "") for h in logging.getLogger(name).handlers}
    if logging.lastResort is not None:  # a logger without handlers anywhere ends here
        handlers.add(logging.lastResort)
    filters = [(h, _Hold(h)) for h in handlers]
    for h, f in filters:
        h.addFilter(f)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for h, f in filters:
            h.removeFilter(f)
    for handler, record in held:  # the block succeeded: what it logged is shown after all
        handler.handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
