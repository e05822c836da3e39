"""Argument parsing shared by every command: kebab-case options with the seeds' snake_case
spellings accepted too, list parsing, and the one-line error convention (spec: Interfaces)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from diffalign.engine.errors import DiffalignError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--snake_case` aliases added for every `--kebab-case` option.

    `--help` lists both spellings; old scripts written against the seeds keep working.
    """

    def add_argument(self, *names, **kwargs):  # type: ignore[override]
        return super().add_argument(*with_snake_aliases(names), **kwargs)

    def add_argument_group(self, *args, **kwargs):  # type: ignore[override]
        group = super().add_argument_group(*args, **kwargs)
        _patch_group(group)
        return group

    def add_mutually_exclusive_group(self, **kwargs):  # type: ignore[override]
        group = super().add_mutually_exclusive_group(**kwargs)
        _patch_group(group)
        return group

    def error(self, message: str):  # one line, exit 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def with_snake_aliases(names) -> list[str]:
    """`["--num-samples"]` -> `["--num-samples", "--num_samples"]` (the seeds' spelling)."""
    names = list(names)
    for name in list(names):
        if name.startswith("--") and "-" in name[2:]:
            alias = "--" + name[2:].replace("-", "_")
            if alias not in names:
                names.append(alias)
    return names


def _patch_group(group) -> None:
    original = group.add_argument

    def add_argument(*names, **kwargs):
        return original(*with_snake_aliases(names), **kwargs)

    group.add_argument = add_argument


def make_subparsers(parser: argparse.ArgumentParser, title: str = "commands"):
    """Subparsers whose children are our ArgumentParser (so aliases apply everywhere)."""
    sub = parser.add_subparsers(
        title=title,
        dest=f"_{parser.prog.replace(' ', '_')}_cmd",
        parser_class=ArgumentParser,
        metavar="COMMAND",
    )
    sub.required = True
    return sub


_SPLIT = re.compile(r"[,\s]+")


def split_list(text: str | Sequence[str] | None) -> list[str]:
    """Split `"3,5,7"`, `"3 5 7"` or `["3", "5,7"]` into items; empty or None gives []."""
    if text is None:
        return []
    if isinstance(text, str):
        text = [text]
    items: list[str] = []
    for chunk in text:
        items.extend(tok for tok in _SPLIT.split(str(chunk).strip()) if tok)
    return items


def parse_int_list(text: str | Sequence[str] | None, what: str = "list") -> list[int]:
    """Comma- or whitespace-separated integers; a malformed item is a DiffalignError."""
    out = []
    for tok in split_list(text):
        try:
            out.append(int(tok))
        except ValueError:
            raise DiffalignError(f"{what}: '{tok}' is not an integer (got {text!r})") from None
    return out


def parse_float_list(text: str | Sequence[str] | None, what: str = "list") -> list[float]:
    """Comma- or whitespace-separated floats; a malformed item is a DiffalignError."""
    out = []
    for tok in split_list(text):
        try:
            out.append(float(tok))
        except ValueError:
            raise DiffalignError(f"{what}: '{tok}' is not a number (got {text!r})") from None
    return out
