"""Where the parquet files of a Hugging Face dataset directory are, and which split each holds
(docs/method.md §4).

A dataset directory is read from its *data directory* ``D``:

* ``ROOT/data/`` when it holds parquet files — a dataset repository downloaded from the hub
  (``hf download --repo-type dataset``, ``snapshot_download``): ``data/<split>-00000-of-00001.parquet``;
* else ``ROOT`` itself when it holds parquet files directly, or only split folders
  (``ROOT/train/*.parquet``, ``ROOT/test/*.parquet``: folder names of :data:`SPLIT_WORDS`);
* else the one configuration folder holding them (``ROOT/<config>/<split>-*.parquet`` or
  ``ROOT/<config>/<split>/*.parquet``, as the hub writes named configurations and its parquet
  conversion); with several configurations, name one (``ROOT/<config>``).

The files are ``D/*.parquet`` and ``D/*/*.parquet``. A file's split is its folder's name for
``D/<split>/x.parquet``; else ``<split>`` for the hub's own file names
``<split>-NNNNN-of-NNNNN.parquet``; else the leading word of the name (up to ``-``, ``_`` or
``.``) when it is one of :data:`SPLIT_WORDS` (``train.parquet``, ``test-0.parquet``); else none.

Choosing: a split asked for (``PATH#SPLIT``, a mixture member's ``split:``) takes the files of that
split (an error names the splits there are). Without one: every file when no file has a split or
all have the same one; else the ``train`` files; else an error naming the splits to choose from.
"""

from __future__ import annotations

import glob
import os
import re

__all__ = ["SPLIT_WORDS", "is_parquet_dir", "parquet_files"]

#: Leading words read as split names (the hub's own split keywords).
SPLIT_WORDS = (
    "train",
    "training",
    "validation",
    "valid",
    "val",
    "dev",
    "test",
    "testing",
    "eval",
    "evaluation",
)
_HUB_NAME = re.compile(r"(?P<split>\w+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet")


def _direct(d: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(d), "*.parquet")))


def _subdirs(d: str) -> list[str]:
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    return [os.path.join(d, n) for n in names if not n.startswith(".") and os.path.isdir(os.path.join(d, n))]


def _has_parquet(d: str) -> bool:
    return bool(_direct(d)) or any(_direct(s) for s in _subdirs(d))


def _data_dir(root: str) -> str:
    data = os.path.join(root, "data")
    if os.path.isdir(data) and _has_parquet(data):
        return data
    folders = [s for s in _subdirs(root) if _has_parquet(s)]
    configs = [s for s in folders if os.path.basename(s).lower() not in SPLIT_WORDS]
    if _direct(root) or not configs:
        return root
    if len(configs) == 1:
        return configs[0]
    names = [os.path.basename(c) for c in configs]
    raise ValueError(
        f"{root} holds several dataset configurations {names}: point the path at one of them, "
        f"e.g. {os.path.join(root, names[0])}"
    )


def is_parquet_dir(path: str) -> bool:
    """Whether directory ``path`` holds parquet files in one of the layouts of the module docstring."""
    return os.path.isdir(path) and (_has_parquet(path) or any(_has_parquet(s) for s in _subdirs(path)))


def _split_of(d: str, f: str) -> str | None:
    parent = os.path.dirname(f)
    if parent != d:
        return os.path.basename(parent)
    name = os.path.basename(f)
    m = _HUB_NAME.fullmatch(name)
    if m:
        return m.group("split")
    word = re.split(r"[-_.]", name, maxsplit=1)[0].lower()
    return word if word in SPLIT_WORDS else None


def parquet_files(path: str, split: str | None = None) -> list[str]:
    """The parquet files of directory ``path`` for ``split`` (see the module docstring), absolute."""
    d = _data_dir(os.path.abspath(path))
    files = _direct(d) + [f for s in _subdirs(d) for f in _direct(s)]
    if not files:
        raise FileNotFoundError(f"no parquet file in {path!r}")
    splits = {f: _split_of(d, f) for f in files}
    named = sorted({s for s in splits.values() if s is not None})
    if split is not None:
        chosen = [f for f in files if splits[f] == split]
        if not chosen:
            raise ValueError(f"{path}: no split {split!r} (splits found: {named or 'none'})")
        return chosen
    if len(set(splits.values())) <= 1:
        return files
    if "train" in named:
        return [f for f in files if splits[f] == "train"]
    raise ValueError(
        f"{path} holds several splits {named} and no 'train': choose one, e.g. {path}#{named[0]} "
        "(or 'split:' in a mixture)"
    )
