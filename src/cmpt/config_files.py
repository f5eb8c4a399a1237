"""Recipe files: YAML read strictly (a key given twice is an error, errors on one line naming the
file), ``base:`` inheritance (bases merged first, in order, relative to the file; dicts merge deep,
lists and scalars replace) with the file each key came from, and packaged recipe names resolved
(:mod:`cmpt.config` turns the result into typed dataclasses)."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path, PurePath
from typing import Any

import yaml

from cmpt.paths import user_path

from .config_schema import BASE_KEY, ConfigError, _KeyPath

__all__ = ["deep_merge", "load_yaml", "read_yaml", "resolve_config_path", "with_bases"]


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: ``override`` on top of ``base``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _record_origins(data: dict, name: str, prefix: _KeyPath, origins: dict[_KeyPath, str]) -> None:
    for k, v in data.items():
        origins[(*prefix, k)] = name
        if isinstance(v, dict):
            _record_origins(v, name, (*prefix, k), origins)


def with_bases(data: dict, base_dir: Path, name: str, stack: tuple[Path, ...]) -> tuple[dict, dict]:
    """``data`` (read from ``name``) on top of its ``base:`` files (relative to ``base_dir``), and the
    file each key came from."""
    data = dict(data)
    bases = data.pop(BASE_KEY, None)
    bases = [] if bases is None else [bases] if isinstance(bases, (str, PurePath)) else bases
    if not isinstance(bases, list) or not all(isinstance(b, (str, PurePath)) for b in bases):
        raise ConfigError(f"'{BASE_KEY}' in {name} must be a file name or a list of file names")
    merged: dict = {}
    origins: dict[_KeyPath, str] = {}
    for b in bases:
        b_path = user_path(b)
        b_data, b_origins = read_yaml(b_path if b_path.is_absolute() else base_dir / b_path, stack)
        merged = deep_merge(merged, b_data)
        origins.update(b_origins)
    _record_origins(data, name, (), origins)
    return deep_merge(merged, data), origins


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key given twice in one mapping (PyYAML silently keeps the
    last); keys brought in by a ``<<:`` merge may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first is not key_node.start_mark:
                msg = f"found the key {key!r} twice (first at line {first.line + 1}); keep one"
                raise yaml.constructor.ConstructorError(None, None, msg, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A PyYAML error on one line: ``line 3, column 1: found character '\\t' ...`` (its own text
    spans several lines, which the CLI's one-line errors would split)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    context = f" ({e.context})" if getattr(e, "context", None) else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}{context}"


def read_yaml(path: Path, stack: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """The plain dict of the YAML file ``path`` with its ``base:`` chain merged in, and the file
    each key came from; ``stack``: the files that led here (a cycle is an error)."""
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"cycle in '{BASE_KEY}' inheritance: {chain}")
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "not found"
        extra = f" (base of {stack[-1]}; '{BASE_KEY}:' paths are relative to that file)" if stack else ""
        raise ConfigError(f"config file {what}: {path.absolute() if stack else path}{extra}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {path}: {_yaml_problem(e)}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
            ) from e
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return with_bases(data, path.parent, str(path), (*stack, resolved))


def load_yaml(path: str | Path) -> dict:
    """The plain dict of a YAML file with its ``base:`` chain merged in (no schema check)."""
    return read_yaml(Path(path), ())[0]


def resolve_config_path(name_or_path: str | Path, packaged_root: str | Path) -> Path:
    """A YAML path if it exists, else the packaged recipe ``<packaged_root>/<name>.yaml``."""
    path = user_path(name_or_path)
    if path.is_file():
        return path
    root = Path(packaged_root)
    name = str(name_or_path)
    candidate = root / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    if path.is_dir():
        raise ConfigError(
            f"{name_or_path} is a directory; pass a recipe YAML file (or a packaged recipe name)"
        )
    available = sorted(
        p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.y*ml") if p.is_file()
    )
    hint = difflib.get_close_matches(name.removesuffix(".yaml"), available, n=1)
    raise ConfigError(
        f"no config file {name!r} and no packaged recipe of that name under {root}"
        + (f"; did you mean '{hint[0]}'?" if hint else "")
        + f"; available recipes: {', '.join(available) if available else '(none)'}"
    )
