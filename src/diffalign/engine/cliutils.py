"""Argument parsing shared by every command: kebab-case options with the seeds' snake_case
spellings accepted too, list parsing, and the one-line error convention (spec: Interfaces)."""

from __future__ import annotations

import argparse
import math
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
        verb = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"{self.prog.split(' ', 1)[0]}: error: {verb}{message}\n")


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
            value = float(tok)
        except ValueError:
            raise DiffalignError(f"{what}: '{tok}' is not a number (got {text!r})") from None
        if not math.isfinite(value):
            raise DiffalignError(f"{what}: '{tok}' is not a finite number (got {text!r})")
        out.append(value)
    return out


# ----------------------------------------------------------------------------------------------
# argparse types: bad numbers fail at parse time with one line ("argument --x: ...") and exit 2

SEED_MAX = 2**63 - 1


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be > 0")
    return value


def nonneg_float(text: str) -> float:
    """A finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be >= 0")
    return value


def unit_float(text: str) -> float:
    """A finite float in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' must be between 0 and 1")
    return value


def _int(text: str) -> int:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be >= 1")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be >= 0")
    return value


def seed_int(text: str) -> int:
    """A random seed: an integer in [0, 2**63 - 1] (what torch, numpy and python all accept)."""
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"'{text}' must be between 0 and 2**63 - 1")
    return value
