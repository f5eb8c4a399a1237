"""The schema machinery of :mod:`cmpt.config`: checking and converting plain YAML values against
dataclass type hints, with errors that name the dotted key and where it came from (the rules are
listed in :mod:`cmpt.config`'s docstring)."""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import difflib
import enum
import functools
import math
import types
import typing
import warnings
from pathlib import PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")
BASE_KEY = "base"
_KeyPath = tuple[Any, ...]  # str for mapping keys / fields, int for list indices
_NONE = type(None)
_LISTS = (list, cabc.Sequence, cabc.MutableSequence)
_DICTS = (dict, cabc.Mapping, cabc.MutableMapping)


class ConfigError(ValueError):
    """A configuration that does not fit its schema; the message names key, source and expectation."""


def _fmt(path: _KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


@dataclasses.dataclass
class _Ctx:
    """Where values came from: the main source plus the file (or override) of each key."""

    source: str
    origins: dict[_KeyPath, str] = dataclasses.field(default_factory=dict)

    def where(self, path: _KeyPath) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return self.source

    def error(self, path: _KeyPath, msg: str) -> ConfigError:
        return ConfigError(f"config key '{_fmt(path)}' (from {self.where(path)}): {msg}")


def _type_name(tp: Any) -> str:
    if tp is _NONE:
        return "None"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:  # string annotations naming something not importable at module level
        raise ConfigError(f"cannot resolve the type hints of {cls.__name__}: {e}") from e


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _suggestion(key: str, names: cabc.Iterable[str], parent: _KeyPath) -> str:
    names = list(names)
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"; did you mean '{_fmt((*parent, close[0]))}'?"
    return f"; valid keys here: {', '.join(names) or '(none)'}"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _moved_keys(cls: type) -> dict[str, str]:
    """``old field name -> new dotted path from the root`` declared by ``cls._moved_keys``."""
    return dict(getattr(cls, "_moved_keys", ()))


_WARNED_MOVES: set[tuple[str, str]] = set()


def _warn_moved(old: str, new: str, where: str) -> None:
    if (old, new) not in _WARNED_MOVES:
        _WARNED_MOVES.add((old, new))
        warnings.warn(
            f"config key '{old}' (from {where}) is deprecated and read as '{new}'; set '{new}' instead",
            FutureWarning,
            stacklevel=4,
        )


# ----------------------------------------------------------------------------- value conversion
def _convert(value: Any, tp: Any, path: _KeyPath, ctx: _Ctx) -> Any:
    """Check ``value`` against ``tp`` and return it in its typed form."""
    if tp is Any or tp is object:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and _NONE in args:
            return None
        options = [a for a in args if a is not _NONE]
        for a in options:  # an exact scalar match wins (1.0 stays float for ``int | float``)
            if a in (int, float, str, bool) and type(value) is a:
                return value
        if len(options) == 1:
            return _convert(value, options[0], path, ctx)
        for a in options:
            try:
                return _convert(value, a, path, ctx)
            except ConfigError:
                pass
        raise _type_error(value, tp, path, ctx)
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        raise _type_error(value, tp, path, ctx)
    if _is_dataclass_type(tp):
        return _build(tp, value, path, ctx)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        raise ctx.error(path, f"expected one of {[m.value for m in tp]}, got {value!r}")
    if tp in _LISTS or origin in _LISTS:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, path, ctx)
        item = args[0] if args else Any
        return [_convert(v, item, (*path, i), ctx) for i, v in enumerate(value)]
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, tp, path, ctx)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        elif len(args) != len(value):
            raise ctx.error(path, f"expected {len(args)} items ({_type_name(tp)}), got {value!r}")
        else:
            items = list(args)
        return tuple(_convert(v, t, (*path, i), ctx) for i, (v, t) in enumerate(zip(value, items)))
    if tp in _DICTS or origin in _DICTS:
        if not isinstance(value, dict):
            raise _type_error(value, tp, path, ctx)
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if kt is str and isinstance(k, (int, float)) and not isinstance(k, bool):
                k = str(k)
            key = _convert(k, kt, (*path, str(k)), ctx)
            out[key] = _convert(v, vt, (*path, str(k)), ctx)
        return out
    return _convert_scalar(value, tp, path, ctx)


def _convert_scalar(value: Any, tp: Any, path: _KeyPath, ctx: _Ctx) -> Any:
    if not isinstance(tp, type):
        raise ctx.error(path, f"unsupported type {tp!r} in the schema")
    if tp is int and not isinstance(value, (bool, int)):
        num = _as_number(value)
        if isinstance(num, int) or (isinstance(num, float) and num.is_integer()):
            return int(num)
    elif tp is float:
        num = _as_number(value)
        if num is not None:
            return _finite(num, value, path, ctx)
    elif issubclass(tp, PurePath) and isinstance(value, (str, PurePath)):
        return tp(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value  # bool, int, str, None and any other plain class
    raise _type_error(value, tp, path, ctx)


def _finite(num: int | float, value: Any, path: _KeyPath, ctx: _Ctx) -> float:
    """``num`` as a float; NaN, infinities and numbers beyond float range (``.nan``, ``inf``,
    ``1e400``) are refused: no float setting means them, and ``lr >= 0``-style checks let NaN by."""
    try:
        out = float(num)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ctx.error(path, f"expected a finite number, got {value!r}")
    return out


def _as_number(value: Any) -> int | float | None:
    """``value`` as a number when it is one (not a bool) or a numeric string, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _type_error(value: Any, tp: Any, path: _KeyPath, ctx: _Ctx) -> ConfigError:
    return ctx.error(path, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type[T], value: Any, path: _KeyPath, ctx: _Ctx) -> T:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ctx.error(path, f"expected a mapping for {cls.__name__}, got {value!r}")
    fields, hints = _init_fields(cls), _hints(cls)
    kwargs = {}
    for key, v in value.items():
        if key not in fields and key in _moved_keys(cls):
            raise ctx.error((*path, key), f"this key moved to '{_moved_keys(cls)[key]}'; set that instead")
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{_fmt((*path, key))}' in {ctx.where((*path, key))}"
                + _suggestion(str(key), fields, path)
            )
        kwargs[key] = _convert(v, hints[key], (*path, key), ctx)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ctx.error(path, f"missing required key(s) {', '.join(missing)} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        where = _sources(kwargs, path, ctx)
        msg = f"{cls.__name__} rejected the values: {e}"
        raise ConfigError(f"config key '{_fmt(path)}' ({where}): {msg}") from e


def _sources(keys: dict, path: _KeyPath, ctx: _Ctx) -> str:
    """Where a section came from, and which of its keys came from elsewhere (an override, a base
    file): ``"from a.yaml; steps from --set train.steps=-5"`` — a value check may fail on any of them."""
    section = ctx.where(path)
    others: dict[str, list[str]] = {}
    for key in keys:
        if (origin := ctx.where((*path, key))) != section:
            others.setdefault(origin, []).append(str(key))
    return "; ".join([f"from {section}", *(f"{', '.join(n)} from {o}" for o, n in others.items())])


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not _NONE]
        if len(options) == 1:
            return options[0]
    return tp
