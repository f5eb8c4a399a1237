"""Which kind of data source a path names, and opening it (docs/method.md §4, docs/data.md).

One path names every source cmpt reads: a LLaVA ``.json`` / ``.jsonl`` file
(:class:`~cmpt.data.llava_source.LlavaSource`), a mixture ``.yaml`` (:mod:`cmpt.data.mixture`), tar
shards (:class:`~cmpt.data.webdataset.ShardList`: a ``.tar``, a glob, a brace pattern, a list or a
directory of them) or a Hugging Face dataset (:class:`~cmpt.data.hf_source.HFSource`: a
``save_to_disk`` directory, ``.parquet`` files, a directory of them or a dataset repository
downloaded from the hub, :mod:`cmpt.data.hub_layout`). ``PATH#SPLIT`` names a split of a Hugging
Face dataset; a path that exists as written (a ``#`` in a file name) is taken literally. A path
without wildcards that does not exist is one ``FileNotFoundError`` naming the setting it came from
(``data.path``, a mixture's ``datasets[N].path``); so is an image root that is not a folder
(``data.image_root``, ``--image-root``): one error up front, not a ``missing_image`` per record.
:func:`iter_records` reads an opened source's records in order, whatever its kind.

The training loaders (:mod:`cmpt.data.batching`), the pair loader (:mod:`cmpt.data.pair_loader`),
mixtures and ``cmpt data check`` all open their data here, so they accept the same forms.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import Any

from cmpt.data.hf_source import HFSource
from cmpt.data.hub_layout import is_parquet_dir
from cmpt.data.llava_source import LlavaSource
from cmpt.data.sources import BadSample, Record, check_image_root
from cmpt.data.webdataset import TAR_SUFFIXES, ShardList
from cmpt.hub import missing_path_error

__all__ = ["is_map_style", "iter_records", "open_source", "source_kind", "split_spec"]


def split_spec(path: str | os.PathLike | list) -> tuple[Any, str | None]:
    """``"data/hub#test" -> ("data/hub", "test")``: a Hugging Face dataset path with the split to read
    (docs/data.md). A path that exists as written (a ``#`` in a file name) is taken literally."""
    if isinstance(path, (list, tuple)):
        return path, None
    p = os.fspath(path)
    base, sep, split = p.rpartition("#")
    if not sep or not split or os.path.exists(p) or not os.path.exists(base):
        return p, None
    return base, split


def source_kind(path: str | os.PathLike | list, key: str = "data.path") -> str:
    """``"llava"`` (.json/.jsonl), ``"mixture"`` (.yaml/.yml), ``"tar"`` (a list, glob or brace pattern
    of tar shards, or a directory of them) or ``"hf"`` (a ``save_to_disk`` directory, ``.parquet``
    files, a glob of them, a directory of them or a dataset repository downloaded from the hub,
    :mod:`cmpt.data.hub_layout`; ``PATH#SPLIT`` names a split) (docs/method.md §4, docs/data.md).
    A path without wildcards (glob, ``{000..009}``) that does not exist is a ``FileNotFoundError``
    naming ``key``, the setting it came from."""
    if isinstance(path, (list, tuple)):
        return "tar"
    p, split = split_spec(path)
    if not glob.has_magic(p) and "{" not in p and not os.path.exists(p):
        raise missing_path_error(p, key)
    low = p.lower().rstrip("/")
    if low.endswith((".json", ".jsonl")):
        kind = "llava"
    elif low.endswith((".yaml", ".yml")):
        kind = "mixture"
    elif low.endswith(".parquet"):
        kind = "hf"
    elif low.endswith(TAR_SUFFIXES) or "{" in p:
        kind = "tar"
    elif os.path.isdir(p):
        kind = _dir_kind(p)
    else:
        kind = ""
    if not kind:
        raise ValueError(
            f"cannot tell the kind of data source {p!r}: expected a LLaVA .json/.jsonl file, a mixture "
            ".yaml, tar shards (.tar, a glob or {000..009} pattern, a directory of .tar) or a Hugging "
            "Face dataset (a save_to_disk directory, .parquet files, a downloaded hub dataset); see "
            "docs/data.md"
        )
    if split is not None and kind != "hf":
        raise ValueError(f"{os.fspath(path)!r}: a split ('#{split}') applies only to Hugging Face datasets")
    return kind


def _dir_kind(p: str) -> str:
    names = os.listdir(p)
    if {"dataset_info.json", "state.json", "dataset_dict.json"} & set(names):
        return "hf"
    if any(n.lower().endswith(".parquet") for n in names):
        return "hf"
    if any(n.lower().endswith(TAR_SUFFIXES) for n in names):
        return "tar"
    return "hf" if is_parquet_dir(p) else ""


def open_source(
    path: str | os.PathLike | list,
    image_root: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    key: str = "data.path",
    root_key: str | None = None,
) -> Any:
    """The source named by ``path``, by :func:`source_kind` (docs/method.md §4, docs/data.md).

    Map-style sources (``len`` / ``source[i] -> Record``): ``LlavaSource``, ``HFSource``,
    ``MixtureSource``. Tar shards give a :class:`cmpt.data.webdataset.ShardList` (streaming), and so
    does a mixture whose members are all tar shards. ``split``: the split of a Hugging Face dataset
    (as ``PATH#SPLIT``, which wins); ``ValueError`` for the other kinds. ``key``: the setting
    ``path`` came from, named when it does not exist. ``image_root`` (JSON and Hugging Face sources;
    tar shards and mixtures hold their own) must be an existing folder
    (:func:`~cmpt.data.sources.check_image_root`); ``root_key`` names it (default: ``key`` with
    ``path`` → ``image_root``, e.g. ``data.image_root``).
    """
    kind = source_kind(path, key)
    if kind in ("llava", "hf"):
        default = key[: -len("path")] + "image_root" if key.endswith("path") else "image_root"
        check_image_root(image_root, root_key or default)
    path, named = split_spec(path)
    split = named or split
    if split is not None and kind != "hf":
        raise ValueError(f"{os.fspath(path)!r}: a split ({split!r}) applies only to Hugging Face datasets")
    if kind == "llava":
        return LlavaSource(path, image_root or None)
    if kind == "hf":
        return HFSource(path, image_root or None, split=split)
    if kind == "mixture":
        from cmpt.data.mixture import load_mixture  # mixtures open their members here

        return load_mixture(path)
    return ShardList(path)


def is_map_style(source: Any) -> bool:
    """Whether an opened source reads by index (``len`` / ``source[i]``) rather than streaming."""
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def iter_records(source: Any) -> Iterator[Record | BadSample]:
    """Every record of a source from :func:`open_source`, in order: as the source streams them
    when it can (tar shards, a tar index reads each shard once), else by index (a record that
    cannot be read comes as its :class:`~cmpt.data.sources.BadSample`; docs/method.md §4)."""
    if hasattr(source, "iter_records"):
        yield from source.iter_records()
        return
    for i in range(len(source)):
        try:
            yield source[i]
        except BadSample as e:
            yield e
