"""Data fingerprints: content digests of the data a run's config names, compared on resume
(:mod:`cmpt.train.resume`; docs/method.md §4 for the data sources).

Every string under ``data.`` that names an existing file, directory or shard pattern — and, for a
mixture YAML, each member (recursively, 4 levels) — gets a digest under the key
``<config key>[content]`` (the file itself) or ``<config key>[<member path>]``: SHA-256 of the whole
file up to 32 MiB, beyond that of its size and 8 evenly spaced 1 MiB blocks; a directory
contributes its data files (``.json``, ``.jsonl``, ``.yaml``, ``.yml``, ``.tar``, ``.parquet``,
``.arrow``; images are not read) down to 3 levels (hub snapshots keep their parquet files in
``data/`` or ``<config>/<split>/``); after 512 files only sizes are used. A ``PATH#SPLIT`` names
``PATH`` (the whole dataset: a conservative digest). Modification
times are not used (``touch`` changes nothing): a reordered or edited file changes its digest, a
moved ``run.dir`` does not.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import yaml

__all__ = ["data_fingerprint"]

_DATA_SUFFIXES = (".json", ".jsonl", ".yaml", ".yml", ".tar", ".parquet", ".arrow")
_FULL_HASH_MAX, _BLOCK, _BLOCKS, _MAX_FILES = 32 << 20, 1 << 20, 8, 512


def _file_digest(path: Path, budget: list[int]) -> str:
    size = path.stat().st_size
    budget[0] -= 1
    if budget[0] < 0:
        return f"size {size}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_MAX:
            for chunk in iter(lambda: f.read(_BLOCK), b""):
                h.update(chunk)
        else:
            for i in range(_BLOCKS):
                f.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                h.update(f.read(_BLOCK))
    return f"sha256 {h.hexdigest()[:16]}, {size} B"


def _combine(parts: list[tuple[str, str]]) -> str:
    if len(parts) == 1 and parts[0][0] == "":
        return parts[0][1]
    h = hashlib.sha256("".join(f"{n}\t{d}\n" for n, d in parts).encode())
    return f"sha256 {h.hexdigest()[:16]} of {len(parts)} files"


def _files_of(path: Path, raw: str) -> list[tuple[str, Path]]:
    if path.is_file():
        return [("", path)]
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            rel = os.path.relpath(dirpath, path)
            if rel.count(os.sep) >= 2:
                dirnames.clear()  # <root>/a/b/c/ (3 levels down) is the deepest level read
            dirnames.sort()
            for n in sorted(filenames):
                if n.endswith(_DATA_SUFFIXES):
                    found.append((n if rel == "." else os.path.join(rel, n), Path(dirpath) / n))
        return found
    if any(c in raw for c in "*?[{"):
        try:
            from ..data.webdataset import expand_shards

            files = expand_shards(str(path))
        except Exception:  # not a shard pattern
            files = sorted(glob.glob(str(path)))
        return [(os.path.basename(f), Path(f)) for f in files if os.path.isfile(f)]
    return []


def _fingerprint_path(key: str, raw: str, base: str, out: dict, budget: list[int], depth: int) -> None:
    from ..data.open import split_spec
    from ..paths import expand_path

    text = split_spec(expand_path(raw))[0]
    path = Path(text if os.path.isabs(text) or not base else os.path.join(base, text))
    files = _files_of(path, raw)
    if not files:
        return
    out[key] = _combine([(name, _file_digest(p, budget)) for name, p in files])
    if depth < 4 and path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return
        members = doc.get("datasets") if isinstance(doc, dict) else None
        for m in members if isinstance(members, list) else []:
            if isinstance(m, dict) and isinstance(m.get("path"), str):
                sub = f"{key.split('[')[0]}[{m['path']}]" if depth == 0 else f"{key[:-1]}/{m['path']}]"
                _fingerprint_path(sub, m["path"], str(path.parent), out, budget, depth + 1)


def data_fingerprint(config: dict, ignored: Iterable[str] = ()) -> dict[str, str]:
    """Content digests of the data a config names (see the module docstring), skipping keys covered
    by ``ignored``: ``{"data.path[content]": "sha256 …, 1234 B", "data.path[docs.jsonl]": ...}``."""
    from .config_diff import covered, flatten

    out: dict[str, str] = {}
    budget = [_MAX_FILES]
    for key, value in flatten(config).items():
        if key.startswith("data.") and isinstance(value, str) and value and not covered(key, ignored):
            content: dict[str, str] = {}
            _fingerprint_path(f"{key}[content]", value, "", content, budget, 0)
            out.update(content)
    return dict(sorted(out.items()))
