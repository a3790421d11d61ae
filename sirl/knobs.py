"""Typed, documented, range-checked dataclass fields ("knobs"): what a config key or a reward option is.

A knob carries its default, a one-line doc and its allowed range (``choices``, ``gt``/``ge``/``lt``/``le``,
``nonempty``); :func:`check_field` converts a value to the field's annotated type (text from a command line
included: ``"1e-6"``, ``"yes"``, ``"a,b"``) and checks the range, raising ConfigError with one line: the name, the
value and what is allowed. ``sirl.config.SIRLConfig`` and ``sirl.reward.RewardSpec`` are made of knobs.

No imports of the rest of ``sirl`` here: both the config and the reward spec build on this module.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
NONE_WORDS = ("null", "none", "~")


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line: key, value, what is allowed."""


def knob(default, doc: str, *, choices=None, gt=None, ge=None, lt=None, le=None, nonempty=False):
    """A config field: its default, a one-line doc and its allowed range (checked by :func:`check_field`)."""
    meta = dict(doc=doc, choices=choices, gt=gt, ge=ge, lt=lt, le=le, nonempty=nonempty)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def copy_knob(f: dataclasses.Field):
    """A new field with ``f``'s default and metadata (the same knob in another dataclass)."""
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def shown(value) -> str:
    return value if isinstance(value, str) and value and " " not in value else repr(value)


def fail(name: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{name}={shown(value)}: {allowed}")


# ---------------------------------------------------------------------------------------------------------------
# a value as the field's type


def _as_bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise fail(name, value, "must be a boolean: true/false, 1/0 or yes/no")


def _as_int(name, value, expected):
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise fail(name, value, expected) from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(name, value, expected)
    return value


def _as_float(name, value, expected):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(name, value, expected) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(name, value, expected + " (finite)")
    return float(value)


def _as_str_list(name, value):
    if isinstance(value, str):  # key=a,b or key=[a, b] on the command line
        value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise fail(name, value, "must be a list of names")
    return list(value)


def _typed(name: str, value, hint, expected: str):
    """``value`` as the type of the annotation ``hint`` (text from the command line is converted)."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if hint is bool:
        return _as_bool(name, value)
    if hint is int:
        return _as_int(name, value, expected)
    if hint is float:
        return _as_float(name, value, expected)
    if hint is str:
        if not isinstance(value, str):
            raise fail(name, value, expected)
        return value
    if typing.get_origin(hint) is list:
        return _as_str_list(name, value)
    if str in args and any(typing.get_origin(a) is list for a in args):  # str | list[str]
        if isinstance(value, str) and not value.strip().startswith("[") and "," not in value:
            return value  # one name (e.g. all-linear); a,b or [a, b] is a list
        return _as_str_list(name, value)
    if hint is dict:
        if isinstance(value, str):
            value = parse_yaml(value, name)
        if not isinstance(value, dict):
            raise fail(name, value, "must be a mapping")
        return value
    raise TypeError(f"config key {name}: unsupported annotation {hint}")  # a programming error, not user input


def allowed_range(f: dataclasses.Field, hint) -> str:
    """What the knob ``f`` (annotated ``hint``) accepts, in words: "a number > 0", "one of mean, sum", ..."""
    meta = f.metadata
    optional = type(None) in typing.get_args(hint)
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        base[0] if len(base) == 1 else None, "a name or a list of names")
    if meta["choices"]:
        text = "one of " + ", ".join(meta["choices"])
    else:
        lo = f"> {meta['gt']}" if meta["gt"] is not None else f">= {meta['ge']}" if meta["ge"] is not None else None
        hi = f"< {meta['lt']}" if meta["lt"] is not None else f"<= {meta['le']}" if meta["le"] is not None else None
        if lo and hi:
            left = "(" if meta["gt"] is not None else "["
            right = ")" if meta["lt"] is not None else "]"
            low, high = (meta["gt"] if meta["gt"] is not None else meta["ge"]), (
                meta["lt"] if meta["lt"] is not None else meta["le"])
            text = f"{kind} in {left}{low}, {high}{right}"
        else:
            text = " ".join(x for x in (kind, lo or hi) if x)
    return text + (" or null" if optional else "")


def check_field(name: str, value, f: dataclasses.Field, hint):
    """``value`` converted to the knob's type and checked against its range; ConfigError naming ``name``."""
    expected = f"must be {allowed_range(f, hint)}"
    typed = _typed(name, value, hint, expected)
    if typed is None:
        return None
    meta = f.metadata
    bad = bool(meta["choices"]) and typed not in meta["choices"]
    if isinstance(typed, (int, float)) and not isinstance(typed, bool):
        bad |= meta["gt"] is not None and not typed > meta["gt"]
        bad |= meta["ge"] is not None and not typed >= meta["ge"]
        bad |= meta["lt"] is not None and not typed < meta["lt"]
        bad |= meta["le"] is not None and not typed <= meta["le"]
    if meta["nonempty"] and isinstance(typed, (str, list)) and not (typed.strip() if isinstance(typed, str)
                                                                     else typed):
        raise fail(name, value, "must not be empty")
    if bad:
        raise fail(name, value, expected)
    return typed


def check_dataclass(obj, prefix: str = "") -> dict:
    """Every knob of the dataclass instance ``obj`` checked (and converted): ``{name: value}``; ConfigError with
    every problem (names shown with ``prefix``, e.g. ``sirl_`` for TRL's spelling of them)."""
    hints = typing.get_type_hints(type(obj))
    values, errors = {}, []
    for f in dataclasses.fields(obj):
        try:
            values[f.name] = check_field(prefix + f.name, getattr(obj, f.name), f, hints[f.name])
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else f"{len(errors)} invalid values: " + "; ".join(errors))
    return values


# ---------------------------------------------------------------------------------------------------------------
# YAML as data


def _yaml_loader():
    """PyYAML's safe loader (data only: no tags that build objects) that refuses a key given twice in a mapping,
    which plain YAML loading silently resolves in favour of the last one."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: duplicate key {key!r} (first given on line {seen[key]})")
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader


def parse_yaml(text: str, where: str):
    """YAML text as data (duplicate keys refused); errors name ``where`` and the line."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where}, {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
