"""Typed values for dataclass-schema configs: a YAML value or a `--key value` command-line string
converted to a field's annotation (`int`, `float`, `bool`, `str`, `list[str]`, each optionally
`| None`), with one DiffalignError line naming the key. Used by the capabilities' YAML configs."""

from __future__ import annotations

import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from diffalign.engine.errors import DiffalignError

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
NULL_WORDS = frozenset({"null", "none", ""})


def base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as `int | None` or `list[str]` (strings
    from `from __future__ import annotations` are evaluated)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list}, {})
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0], True
    return annotation, False


def coerce_value(key: str, annotation: Any, value: Any, where: str = "") -> Any:
    """`value` as the type of field `key`; `where` prefixes the error (e.g. the config file).

    Booleans accept true/false/yes/no/on/off/1/0; ints refuse fractions and booleans; floats
    must be finite; `null`/`none` is None for optional fields only."""
    prefix = f"{where}: " if where else ""
    tp, optional = base_type(annotation)
    if value is None or (
        isinstance(value, str) and optional and value.strip().lower() in NULL_WORDS
    ):
        if not optional:
            raise DiffalignError(f"{prefix}{key}: a value is required")
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in TRUE_WORDS:
                return True
            if text in FALSE_WORDS:
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value.strip()) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if typing.get_origin(tp) is list or tp is list:
            if isinstance(value, str):
                from diffalign.engine.cliutils import split_list

                return split_list(value)
            if isinstance(value, list):
                return [str(v) for v in value]
            raise ValueError
        if isinstance(value, dict | list):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        kind = getattr(tp, "__name__", str(tp))
        raise DiffalignError(f"{prefix}{key}: {value!r} is not a valid {kind}") from None


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} when empty); a missing file, invalid YAML
    or another top-level value is one DiffalignError line naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DiffalignError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DiffalignError(f"{p}: not valid YAML ({first})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DiffalignError(f"{p}: expected a mapping of config keys")
    return {str(k): v for k, v in raw.items()}


def config_differences(saved: dict, current: dict, free: frozenset[str] | set[str]) -> list[str]:
    """Keys outside `free` whose values differ between two recorded configs (compared as JSON,
    so tuples equal lists)."""
    import json

    saved = json.loads(json.dumps(saved, default=str))
    current = json.loads(json.dumps(current, default=str))
    keys = sorted((set(saved) | set(current)) - set(free))
    return [k for k in keys if saved.get(k) != current.get(k)]


def check_resume_config(
    saved: dict, current: dict, free: frozenset[str] | set[str], path: str | os.PathLike
) -> None:
    """One DiffalignError naming the first key (outside `free`) whose value differs between the
    config a checkpoint at `path` recorded and the current one."""
    diff = config_differences(saved, current, free)
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise DiffalignError(
            f"cannot resume from {path}: it was trained with {k}={saved.get(k)!r}, "
            f"this configuration has {k}={current.get(k)!r}{more}"
        )
