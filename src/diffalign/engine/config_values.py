"""Typed values for dataclass-schema configs: a YAML value or a `--key value` command-line string
converted to a field's annotation (`int`, `float`, `bool`, `str`, `list[str]`, each optionally
`| None`), with one DiffalignError line naming the key. Used by the capabilities' YAML configs:
`read_config_file` (typed values of a YAML file, `base: other.yaml` inheritance, unknown keys named
with a "did you mean" hint) and `typed_overrides` (`--key value` strings), then the resume check."""

from __future__ import annotations

import difflib
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
                raise DiffalignError(f"{prefix}{key}: {value!r} is not a valid float (not finite)")
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


def field_types(schema: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass schema (in field order)."""
    import dataclasses

    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def unknown_key(key: str, known: typing.Iterable[str], where: str = "") -> DiffalignError:
    """The error for a key the schema lacks: a "did you mean" hint, else the known keys."""
    known = sorted(known)
    prefix = f"{where}: " if where else ""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
    return DiffalignError(f"{prefix}unknown key '{key}' ({hint})")


def typed_value(types_: dict[str, Any], key: str, value: Any, where: str = "") -> Any:
    """`value` as the type of schema key `key` (`-` in the key read as `_`); an unknown key is
    one DiffalignError naming it."""
    key = key.replace("-", "_")
    if key not in types_:
        raise unknown_key(key, types_, where)
    return coerce_value(key, types_[key], value, where)


def typed_overrides(types_: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Command-line `--key value` overrides typed by the schema; errors name `--key`."""
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in types_:
            raise unknown_key(key, types_, "override")
        out[key] = coerce_value(key, types_[key], value, "--" + key.replace("_", "-"))
    return out


def read_config_file(
    path: str | os.PathLike, types_: dict[str, Any], base_key: str = "base", _seen: tuple = ()
) -> dict[str, Any]:
    """Typed values of a YAML config file. `base: other.yaml` (relative to the file) is read
    first and overridden by the file's own keys (e.g. ablation configs built on a track's);
    a cycle of bases, an unknown key or a bad value is one DiffalignError naming the file."""
    p = Path(path)
    if p.is_file() and p.resolve() in _seen:
        raise DiffalignError(f"{p}: '{base_key}' configs form a cycle")
    data = read_yaml_mapping(p)
    values: dict[str, Any] = {}
    base = None if base_key in types_ else data.pop(base_key, None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise DiffalignError(f"{p}: {base_key}: expected a config file name, got {base!r}")
        values.update(read_config_file(p.parent / base, types_, base_key, (*_seen, p.resolve())))
    for key, value in data.items():
        key = key.replace("-", "_")
        values[key] = typed_value(types_, key, value, str(p))
    return values


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


def call_arguments(fn: typing.Callable, /, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every parameter of `fn` by name as the call `fn(*args, **kwargs)` would get it, defaults
    applied (a check before loading reads a function's options as it would); a call `fn`
    would refuse raises its TypeError."""
    import inspect

    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
