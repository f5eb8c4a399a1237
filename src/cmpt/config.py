"""Configuration is data: typed dataclasses ⇄ YAML, ``base:`` inheritance and ``--set a.b=c`` overrides.

A schema is a tree of (ordinary, module-level) dataclasses. :func:`load_config` builds it from a
YAML file or a dict, checking every key and value against the type hints: nested dataclasses,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``X | None``, ``Literal[...]``, enums, ``int``,
``float``, ``bool``, ``str`` and ``Path``.

Conversions (everything else is a :class:`ConfigError`):

* ``float`` fields accept ints and numeric strings (YAML 1.1 reads ``1e-4`` as a string), but
  not NaN or infinities (``.nan``, ``inf``, ``1e400``);
* ``int`` fields accept ints, and floats or numeric strings that are exact integers (``1e5``);
* ``bool`` fields accept only booleans; ``str`` fields only strings (quote ``"2024"``);
* ``Path`` fields accept strings; tuples accept YAML lists; mapping keys declared ``str`` accept
  YAML numbers (``1: x``) as their string form.

A key given twice in one YAML mapping is an error (YAML would keep the last silently).

A YAML file may start with ``base: other.yaml`` (or a list of files), relative to the file
itself; bases are merged first, in order, then the file on top (dicts merge deep, lists and
scalars replace). ``base`` is therefore a reserved top-level key.

The value checks and conversions live in :mod:`cmpt.config_schema`, reading the files and their
bases in :mod:`cmpt.config_files`; this module applies moved keys and overrides, builds the
dataclasses, and writes configs back.

Moved keys: a dataclass may list ``_moved_keys = (("old", "section.new"), ...)``, an old field name
and its new dotted path from the root of the schema. A file or ``--set`` that still uses the old
key is read as the new one, with a one-time ``FutureWarning``; a file setting both to different
values, or a schema without the new key, is a :class:`ConfigError`.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import enum
import hashlib
import json
from pathlib import Path, PurePath
from typing import Any, get_args, get_origin

import yaml

from .config_files import deep_merge, load_yaml, read_yaml, resolve_config_path, with_bases
from .config_schema import (
    _DICTS,
    _LISTS,
    BASE_KEY,
    ConfigError,
    T,
    _convert,
    _Ctx,
    _fmt,
    _hints,
    _init_fields,
    _is_dataclass_type,
    _KeyPath,
    _moved_keys,
    _suggestion,
    _type_name,
    _unwrap_optional,
    _warn_moved,
)
from .io_atomic import atomic_file

__all__ = ["BASE_KEY", "ConfigError", "config_hash", "deep_merge", "load_config", "load_yaml"]
__all__ += ["resolve_config_path", "save_config", "to_dict"]


# ----------------------------------------------------------------------------- moved keys
def _schema_type(cls: type, parts: list[str]) -> Any:
    """The type of the dotted field path ``parts`` from dataclass ``cls``, or None if not a field."""
    tp: Any = cls
    for part in parts:
        tp = _unwrap_optional(tp)
        if not _is_dataclass_type(tp) or part not in _init_fields(tp):
            return None
        tp = _hints(tp)[part]
    return tp


def _migrate_moved(root: dict, cls: type, ctx: _Ctx) -> None:
    """Move old keys (``_moved_keys`` of the nested dataclass sections) of the plain dict ``root``
    of schema ``cls`` to their new paths, in place (see the module docstring)."""
    todo: list[tuple[dict, type, _KeyPath]] = [(root, cls, ())]
    while todo:
        node, tp, path = todo.pop()
        for old, new in _moved_keys(tp).items():
            parts = new.split(".")
            if old not in node or _schema_type(cls, parts) is None:
                continue  # absent, or no new key in this schema: _build reports it
            value, old_path = node.pop(old), (*path, old)
            target = root
            for part in parts[:-1]:
                if target.get(part) is None:
                    target[part] = {}
                target = target[part]
                if not isinstance(target, dict):
                    raise ctx.error(tuple(parts[:-1]), f"expected a mapping, got {target!r}")
            new_path = tuple(parts)
            if parts[-1] in target:
                hint = _schema_type(cls, parts)
                if _convert(target[parts[-1]], hint, new_path, ctx) != _convert(value, hint, old_path, ctx):
                    raise ConfigError(
                        f"config key '{_fmt(old_path)}' (from {ctx.where(old_path)}) moved to "
                        f"'{new}', which is also set (from {ctx.where(new_path)}) to a different "
                        f"value; remove '{_fmt(old_path)}'"
                    )
            else:
                target[parts[-1]] = value
                ctx.origins[new_path] = ctx.where(old_path)
            _warn_moved(_fmt(old_path), new, ctx.where(old_path))
        for name, hint in _hints(tp).items() if _is_dataclass_type(tp) else ():
            sub = _unwrap_optional(hint)
            if name in _init_fields(tp) and _is_dataclass_type(sub) and isinstance(node.get(name), dict):
                todo.append((node[name], sub, (*path, name)))


# ----------------------------------------------------------------------------- overrides
def _is_text_type(tp: Any) -> bool:
    """``str`` or a path type, optionally ``| None``."""
    tp = _unwrap_optional(tp)
    return tp is str or (isinstance(tp, type) and issubclass(tp, PurePath))


_NULLS = ("", "~", "null", "Null", "NULL")


def _override_value(raw: str, tp: Any, override: str) -> Any:
    """The value of ``--set key=raw``, parsed as YAML; a text-typed key (``str``, ``Path``) takes
    ``raw`` as written (stripped), not YAML's reading of it (``{cache}/x`` is a YAML flow mapping,
    ``2024`` a number, ``run #2`` loses its ``#`` comment, ``&a x`` its anchor) — ``null`` / ``~`` /
    empty still mean None for an optional key, and quoted YAML strings are unquoted."""
    text = raw.strip()
    if _is_text_type(tp) and text not in _NULLS and not text.startswith(("'", '"')):
        return text
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        if _is_text_type(tp):
            return raw.strip()
        hint = " (quote it: '\"...\"')" if "{" in raw else ""
        raise ConfigError(f"override {override!r}: the value is not valid YAML{hint}: {e}") from e
    if _is_text_type(tp) and value is not None and not isinstance(value, str):
        return raw.strip()
    return value


def _merge_section(current: dict, new: dict, cls: type) -> dict:
    """``--set section={a: 1}``: ``new`` on top of the section's current values, as a ``base:``
    child file merges; nested dataclass sections merge too, any other value (a list, a
    ``dict[str, X]`` such as ``stage.lr``) is replaced."""
    out = dict(current)
    fields, hints = _init_fields(cls), _hints(cls)
    for key, value in new.items():
        sub = _unwrap_optional(hints[key]) if key in fields else None
        if _is_dataclass_type(sub) and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge_section(out[key], value, sub)
        out[key] = value
    return out


def _apply_override(data: dict, cls: type, override: str, ctx: _Ctx) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) in the plain dict ``data`` of schema ``cls``."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r} must look like a.b.c=value")
    where = f"--set {override}"
    node: Any = data
    tp: Any = cls
    path: _KeyPath = ()
    for i, part in enumerate(parts):
        tp = _unwrap_optional(tp)
        origin, args = get_origin(tp), get_args(tp)
        k: Any = part
        if _is_dataclass_type(tp):
            fields = _init_fields(tp)
            moved = _moved_keys(tp)
            if part not in fields and part in moved and i == len(parts) - 1:
                if _schema_type(cls, moved[part].split(".")) is not None:
                    _warn_moved(_fmt((*path, part)), moved[part], where)
                    _apply_override(data, cls, f"{moved[part]}={raw}", ctx)
                    return
                raise ConfigError(f"{where}: config key '{_fmt((*path, part))}' moved to '{moved[part]}'")
            if part not in fields:
                raise ConfigError(
                    f"{where}: unknown config key '{_fmt((*path, part))}'" + _suggestion(part, fields, path)
                )
            child_tp = _hints(tp)[part]
        elif isinstance(node, dict) and (tp is Any or tp in _DICTS or origin in _DICTS):
            child_tp = args[1] if args else Any
        elif isinstance(node, list) and (tp is Any or tp in (*_LISTS, tuple) or origin in (*_LISTS, tuple)):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: '{part}' is not an index of '{_fmt(path)}' ({len(node)} items)")
            k = int(part)
            fixed_tuple = origin is tuple and args and args[-1] is not Ellipsis
            child_tp = (args[k] if k < len(args) else Any) if fixed_tuple else (args[0] if args else Any)
        else:
            raise ConfigError(f"{where}: '{_fmt(path)}' has type {_type_name(tp)}; it has no key '{part}'")
        path = (*path, k)
        if i == len(parts) - 1:
            value = _override_value(raw, child_tp, override)
            current = node.get(k) if isinstance(node, dict) else node[k]
            section = _unwrap_optional(child_tp)
            if _is_dataclass_type(section) and isinstance(value, dict) and isinstance(current, dict):
                value = _merge_section(current, value, section)  # keep the file's other keys
            _convert(value, child_tp, path, _Ctx(where))  # fail now, naming the override
            node[k] = value
            ctx.origins[path] = where
            return
        child = node.get(k) if isinstance(node, dict) else node[k]
        if child is None:  # e.g. an Optional[Dataclass] left at None: fill it from defaults
            child = node[k] = {}
        node, tp = child, child_tp


# ----------------------------------------------------------------------------- public API
def load_config(
    cls: type[T], source: str | Path | dict | None = None, overrides: cabc.Sequence[str] = ()
) -> T:
    """Build a ``cls`` instance from a YAML file (or a dict, or nothing: defaults) plus overrides.

    Overrides look like ``"optim.lr=1e-4"``, ``"data.sizes=[224, 448]"`` or
    ``"data.sources.0.weight=2"`` (list index); values are parsed with ``yaml.safe_load`` and
    type-checked. A text key (``str`` / ``Path``) takes the value as written (unless quoted or
    ``null``), so ``data.path={cache}/x.json``, ``run.name=2024`` and ``run.name=exp #2`` need no
    quotes. A mapping set on a section (``train={steps: 5}``) merges into it, as a ``base:`` child
    file does. Errors are :class:`ConfigError` naming the dotted key and where it came from.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    if source is None:
        data, ctx = {}, _Ctx("<defaults>")
    elif isinstance(source, dict):
        data, origins = with_bases(source, Path.cwd(), "<dict>", ())
        ctx = _Ctx("<dict>", origins)
    else:
        data, origins = read_yaml(Path(source), ())
        ctx = _Ctx(str(source), origins)
    if _is_dataclass_type(cls) and isinstance(data, dict):
        _migrate_moved(data, cls, ctx)
    obj = _convert(data, cls, (), ctx)
    if overrides:
        plain = to_dict(obj)
        for ov in overrides:
            _apply_override(plain, cls, ov, ctx)
        obj = _convert(plain, cls, (), ctx)
    return obj


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {n: _plain(getattr(v, n)) for n in _init_fields(type(v))}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, PurePath):
        return str(v)
    if isinstance(v, enum.Enum):
        return v.value
    return v


def to_dict(obj: Any) -> dict:
    """Plain YAML-able dict of a config (tuples → lists, paths → str, enums → values)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as YAML (atomically); ``load_config(type(obj), path)`` gives it back."""
    return write_yaml(to_dict(obj), path)


def write_yaml(data: Any, path: str | Path) -> Path:
    """Write plain ``data`` (dicts, lists, scalars) as YAML, atomically
    (:func:`cmpt.io_atomic.atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return Path(path)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash (hex sha256 of the canonical JSON of ``to_dict(obj)``)."""
    data = obj if isinstance(obj, dict) else to_dict(obj)
    text = json.dumps(_plain(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
