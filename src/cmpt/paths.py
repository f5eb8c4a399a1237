"""Path conventions of cmpt (recipes, data, caches): ``{cache}`` is cmpt's cache directory, ``~`` and
``$VARS`` expand."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else ``$CMPT_CACHE``, else ``~/.cache/cmpt``."""
    return Path(cache or os.environ.get("CMPT_CACHE") or Path.home() / ".cache" / "cmpt").expanduser()


def expand_path(path: str | os.PathLike) -> str:
    """``{cache}/tiny/data.json`` → ``<cache_root()>/tiny/data.json``; also ``~`` and ``$VAR``."""
    text = str(path).replace("{cache}", str(cache_root()))
    return os.path.expanduser(os.path.expandvars(text))
