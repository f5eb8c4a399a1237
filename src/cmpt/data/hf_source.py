"""Hugging Face ``datasets`` sources: ``save_to_disk`` directories and parquet files (docs/method.md §4).

:class:`HFSource` is map-style (``len``, ``source[i] -> Record``), so the length index, the
token-budget batcher, the rank split and exact resume apply unchanged. Rows are read as raw Arrow
values (no ``datasets`` formatting, no image decoding); the columns are:

* ``id`` (optional): the record id; ``"<dataset name>:<row>"`` when absent or empty.
* ``image`` or ``images``: one image or a list of them, each a ``datasets.Image`` value
  (``{"bytes", "path"}``), raw ``bytes`` or a path string. Bytes are used when present; a path is
  resolved against ``image_root`` (default: the dataset directory), with the same ``path_escape`` /
  ``missing_image`` checks as a JSON source. ``None`` / an empty list: a text-only sample.
* ``conversations``: a list of ``{from, value}`` (or ``{role, content}``), or the same as a JSON
  string; or, instead, ``messages`` in the Hugging Face / TRL chat layout (typed content parts,
  :mod:`cmpt.data.chat_layout`), with the images in ``images`` or inline in the image parts.
* ``text`` (documents, docs/method.md §3): the text with its ``<image>`` placeholders, for rows
  without ``conversations`` (a null / absent ``conversations`` value).
* ``caption`` (image–caption datasets, ``{"image", "caption"}``): for rows with no other content
  (:func:`cmpt.data.sources.caption_of`), an image–caption record as tar ``.txt`` captions are
  (:func:`cmpt.data.chat_layout.caption_views`).
* every other column goes to ``Record.meta``; a string column ``extra_json`` holding a JSON object
  is merged into it (the record's other keys, as written by :func:`cmpt.data.convert.llava_to_hf`).

Storage: a ``save_to_disk`` directory is memory-mapped (``datasets.load_from_disk``; a
``DatasetDict`` gives its ``split``, default ``"train"`` or its only split). A directory of parquet
files — flat, or a dataset repository downloaded from the hub (``data/<split>-*.parquet``,
``<config>/<split>-*.parquet``) — is read by split (:mod:`cmpt.data.hub_layout`). Parquet files are read
with ``pyarrow`` into memory once per process (Arrow buffers are shared by forked DataLoader
workers); for data larger than memory prefer ``save_to_disk``. The ``datasets`` package is optional
and imported only here (:func:`cmpt.data.convert.require_datasets` explains how to install it).
"""

from __future__ import annotations

import glob
import json
import os
import threading
from typing import Any

from cmpt.data.chat_layout import caption_views, messages_to_conversations
from cmpt.data.convert import require_datasets
from cmpt.data.hub_layout import parquet_files
from cmpt.data.sources import READER_VERSION, RECORD_KEYS, BadSample, Record, caption_of

__all__ = ["HFSource", "hf_record"]

_LOCK = threading.Lock()


def _image_value(x: Any, rid: str) -> Any:
    if isinstance(x, dict):
        if x.get("bytes") is not None:
            return bytes(x["bytes"])
        if x.get("path"):
            return str(x["path"])
        raise BadSample(rid, "bad_value", "an image value with neither bytes nor a path")
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, str):
        return x
    raise BadSample(rid, "bad_value", f"an image must be bytes, a path or {{bytes, path}}, got {type(x)}")


def hf_record(row: dict[str, Any], index: int, name: str, image_root: str) -> Record:
    """The :class:`Record` of one raw dataset row (see the module docstring for the columns)."""
    rid = row.get("id")
    rid = f"{name}:{index}" if rid is None or rid == "" else str(rid)
    key = "images" if "images" in row else "image"
    raw = row.get(key)
    items = [] if raw is None else list(raw) if isinstance(raw, (list, tuple)) else [raw]
    convs = row.get("conversations")
    if convs is None and row.get("messages") is not None:  # the HF / TRL chat layout
        convs, items = messages_to_conversations(row["messages"], items, rid)
    images = [_image_value(x, rid) for x in items]
    if isinstance(convs, str):
        try:
            convs = json.loads(convs)
        except json.JSONDecodeError as e:
            raise BadSample(
                rid, "invalid_json", f"row {index}: 'conversations' is not valid JSON ({e})"
            ) from None
    if isinstance(convs, list):  # Arrow structs give every field of the schema: drop the null ones
        convs = [{k: v for k, v in t.items() if v is not None} if isinstance(t, dict) else t for t in convs]
    text, caption = row.get("text"), caption_of(row)
    if caption is not None:  # {"image", "caption"} rows: image–caption records
        text, caption, convs = caption_views(caption, len(images), rid)
    meta = {k: v for k, v in row.items() if k not in RECORD_KEYS}
    extra = meta.pop("extra_json", None)
    if isinstance(extra, str) and extra:
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            raise BadSample(rid, "invalid_json", f"row {index}: 'extra_json' is not valid JSON") from None
        if isinstance(extra, dict):
            meta.update(extra)
    return Record(rid, images, convs, meta, index, image_root, f"{name}[{index}]", text, caption=caption)


class HFSource:
    """Random-access reader of a Hugging Face dataset on disk or parquet file(s) (docs/method.md §4).

    ``path``: a ``save_to_disk`` directory, a ``.parquet`` file, a glob of them or a directory of
    them (flat or in a hub layout). ``image_root``: where image paths resolve (default: the dataset
    directory, or a single file's directory). ``split``: a ``DatasetDict``'s split, or the split of a
    directory of parquet files (:func:`cmpt.data.hub_layout.parquet_files`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        *,
        split: str | None = None,
    ) -> None:
        p = os.fspath(path)
        self.path, self.split = os.path.abspath(p), split
        saved = {"dataset_info.json", "state.json", "dataset_dict.json"}
        if os.path.isdir(p) and saved & set(os.listdir(p)):
            self.kind, self.files = "disk", []
        else:
            self.kind = "parquet"
            if os.path.isdir(p):
                self.files = parquet_files(p, split)
            elif split is not None:
                raise ValueError(f"{p}: a split ({split!r}) selects files of a directory, not of {p!r}")
            elif glob.has_magic(p):
                self.files = sorted(os.path.abspath(f) for f in glob.glob(p))
            else:
                self.files = [self.path]
            if not self.files or not all(os.path.isfile(f) for f in self.files):
                raise FileNotFoundError(f"no parquet file at {p!r}")
        base = self.path if os.path.isdir(p) else os.path.dirname(self.files[0])
        self.name = os.path.basename(self.path.rstrip(os.sep))
        self.image_root = os.path.abspath(os.fspath(image_root) if image_root else base)
        self._data: Any = None
        self._len = self._table().num_rows if self.kind == "parquet" else len(self._dataset())

    # -- storage -------------------------------------------------------------------------------
    def _dataset(self) -> Any:
        if self._data is None:  # memory-mapped: shared with forked workers, reopened when unpickled
            with _LOCK:
                datasets = require_datasets()
                ds = datasets.load_from_disk(self.path)
                if isinstance(ds, datasets.DatasetDict):
                    split = self.split or ("train" if "train" in ds or len(ds) != 1 else next(iter(ds)))
                    if split not in ds:
                        raise ValueError(f"{self.path}: no split {split!r} (has {list(ds)})")
                    ds = ds[split]
                elif self.split is not None:
                    raise ValueError(
                        f"{self.path}: a single dataset, not a DatasetDict: it has no split {self.split!r}"
                    )
                self._data = ds.with_format("arrow")
        return self._data

    def _table(self) -> Any:
        if self._data is None:  # immutable Arrow buffers: shared with forked workers
            with _LOCK:
                require_datasets()  # pyarrow comes with it
                import pyarrow as pa
                import pyarrow.parquet as pq

                tables = [pq.read_table(f, memory_map=True) for f in self.files]
                self._data = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return self._data

    def column(self, name: str) -> list[Any] | None:
        """Every value of column ``name`` as Python values, in row order (``None``: no such column);
        reads that column only (e.g. the pair loader's ``task``)."""
        data = self._table() if self.kind == "parquet" else self._dataset()
        if name not in data.column_names:
            return None
        return (data.column(name) if self.kind == "parquet" else data[name]).to_pylist()

    def row(self, i: int) -> dict[str, Any]:
        """Raw row ``i`` as Python values (images undecoded)."""
        if self.kind == "parquet":
            return self._table().slice(i, 1).to_pylist()[0]
        return self._dataset()[i].to_pylist()[0]

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record index {i} out of range for {n} records in {self.path}")
        i %= n
        return hf_record(self.row(i), i, self.name, self.image_root)

    def __iter__(self):
        for i in range(len(self)):
            try:
                yield self[i]
            except BadSample:
                continue

    def fingerprint(self) -> dict[str, Any]:
        """Files (with sizes and mtimes), split, image root and the reader's version: what
        identifies the content for caches."""
        if self.kind == "disk":
            files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(self.path) for f in fs)
        else:
            files = self.files
        return {
            "reader": READER_VERSION,
            "path": self.path,
            "split": self.split,
            "files": [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files],
            "image_root": self.image_root,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None  # reopened lazily in the new process
        return state

    def __repr__(self) -> str:
        return f"HFSource({self.path!r}, kind={self.kind!r}, records={len(self)})"
