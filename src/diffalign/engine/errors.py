"""Errors the user can act on: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class DiffalignError(Exception):
    """Bad input or a missing asset; the message is the whole story (no traceback)."""

    exit_code = 2


class ModelNotFoundError(DiffalignError):
    """A model could not be found locally and could not be fetched."""

    def __init__(self, model: str, download_name: str | None = None, detail: str | None = None):
        hint = (
            f"diffalign download --only {download_name}" if download_name else "diffalign download"
        )
        msg = f"model '{model}' not found"
        if detail:
            msg += f" ({detail})"
        msg += f"; fetch it with `{hint}` or pass a local folder with --model"
        super().__init__(msg)
        self.model = model
