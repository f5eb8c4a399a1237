"""Path conventions of cmpt (recipes, data, caches): ``{cache}`` is cmpt's cache directory, ``~`` and
``$VARS`` expand."""

from __future__ import annotations

import os
import re
from pathlib import Path

_VAR = re.compile(r"\$(\w+|\{([^}]*)\})")


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else ``$CMPT_CACHE``, else ``~/.cache/cmpt``."""
    return Path(cache or os.environ.get("CMPT_CACHE") or Path.home() / ".cache" / "cmpt").expanduser()


def user_path(path: str | os.PathLike) -> Path:
    """``path`` with a leading ``~`` / ``~user`` expanded; left as written when that user does not
    exist (``Path.expanduser`` raises ``RuntimeError`` there), so the caller reports a missing path."""
    return Path(os.path.expanduser(os.fspath(path)))


def expand_path(path: str | os.PathLike) -> str:
    """``{cache}/tiny/data.json`` → ``<cache_root()>/tiny/data.json``; also ``~`` and ``$VAR`` /
    ``${VAR}``. A variable that is not set is a ``ValueError`` naming it (left as written, it would
    make a run write into a directory literally called ``$VAR``)."""
    text = str(path).replace("{cache}", str(cache_root()))
    unset = sorted({m.group(2) or m.group(1) for m in _VAR.finditer(text)} - set(os.environ))
    if unset:
        names = ", ".join(f"${v}" for v in unset)
        raise ValueError(f"{path}: the environment variable {names} is not set; set it or write the path out")
    return os.path.expanduser(os.path.expandvars(text))
