"""LLaVA-format sources: records with stable ids and safely resolved image paths (docs/method.md §4).

A LLaVA file is either one JSON list or JSON Lines (one object per line)::

    {"id": "000001", "image": "coco/1.jpg" | ["a.jpg", "b.jpg"],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt", "value": "A cat."}]}

The Hugging Face / TRL chat layout (``messages`` with typed content parts, plus ``images``) is read
into the same form (:mod:`cmpt.data.chat_layout`; every accepted form: ``docs/data.md``).

The same files may hold **documents** (MoCa's text-only passages and interleaved documents,
docs/method.md §3): ``{"id"?, "text": "Intro <image> more <image> ...", "images"|"image": [...]}``,
the i-th ``<image>`` of the text being the i-th image. A record with ``conversations`` is a
conversation record (its ``text``, if any, is ignored); one with ``text`` and no ``conversations``
is a document record (:attr:`Record.is_document`).

Decisions:

* **Random access, small memory.** A JSON list is parsed once and each record is kept as its
  serialized bytes in one NumPy buffer (no per-record Python objects, so forked DataLoader workers
  do not copy it page by page through reference counting). A JSONL file is scanned once, line by
  line, keeping only byte offsets; records are read back with ``os.pread`` when accessed.
* **Stable ids**: ``record["id"]`` (as a string) or ``"<file name>:<index>"``.
* **Bad lines are never dropped silently.** A JSONL line that is not valid UTF-8, not valid JSON
  or not an object keeps its index; accessing it raises :class:`BadSample` with reason
  ``invalid_json`` and the line number, so it is counted like any bad sample (docs/method.md §4). With
  ``strict=True`` the constructor raises ``ValueError`` naming the first bad line instead.
* **Image bytes.** Other sources (tar shards, Hugging Face datasets) put the encoded image bytes
  themselves in ``Record.images``; :meth:`Record.image_source` gives what to decode (bytes or a
  resolved path) for every kind of source, so the sample builder and the checkers treat them alike.
* **Image paths** must stay inside the image root: a path that leaves it lexically (``../``, an
  absolute path elsewhere) or through a symbolic link (its ``realpath`` is outside the resolved
  root) is a bad sample (``path_escape``). Links that stay inside the root are fine; links out of
  it are followed only with ``data.follow_symlinks: true`` (datasets that link their image
  folders in), see :func:`set_follow_symlinks`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmpt.data.chat_layout import messages_to_conversations

__all__ = [
    "PAIR_KEYS",
    "READER_VERSION",
    "REASONS",
    "RECORD_KEYS",
    "BadSample",
    "LlavaSource",
    "Record",
    "open_source",
    "resolve_image_path",
    "set_follow_symlinks",
    "source_kind",
    "split_spec",
]

log = logging.getLogger("cmpt.data")
_FD_LOCK = threading.Lock()

#: How records are read from files: part of the sources' fingerprints, so caches of what was read
#: before (length scans, :mod:`cmpt.data.length_cache`) are rebuilt when it changes (2: the chat layout).
READER_VERSION = 2

#: The keys a record's fields are read from; every other key goes to ``Record.meta``.
RECORD_KEYS = ("id", "image", "images", "conversations", "text", "messages")

#: Every reason a sample can be bad for, as reported by the checker and the loader (docs/method.md §4).
REASONS = (
    "invalid_json",  # a JSONL line that is not UTF-8 / JSON / an object
    "missing_key",  # no "conversations" (nor "text" for a document)
    "bad_value",  # wrong types: non-string turn values or image paths, unknown roles, ...
    "empty_conversation",
    "empty_text",  # a document record whose text is empty or blank
    "no_assistant_turn",
    "placeholder_mismatch",  # number of <image> in user turns != number of images
    "path_escape",  # image path outside the image root
    "missing_image",
    "unreadable_image",  # truncated, corrupt, not an image, decompression bomb
    "zero_size_image",
    "extreme_aspect_ratio",  # > 200
    "too_long",  # conversation longer than max_text_tokens (checker only; the loader truncates)
    "invalid_conversation",  # any other rendering error
    "corrupt_archive",  # a tar shard that cannot be read on (the rest of the shard is skipped)
    "empty_query",  # a contrastive pair whose query has no text and no image (docs/method.md §3)
    "empty_positive",  # a contrastive pair whose positive has no text and no image
    "negative_is_positive",  # a hard negative identical to the positive (same text and image)
)

#: The keys of a contrastive pair record (MMEB-train / MoCa-CL-Pairs layout, docs/method.md §3); a
#: record with any of the first four and neither ``conversations`` nor ``text`` is a pair record.
PAIR_KEYS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path", "task")


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is one of :data:`REASONS` (docs/method.md §4)."""

    def __init__(self, id: str, reason: str, detail: str = "") -> None:
        self.id, self.reason, self.detail = str(id), reason, detail
        super().__init__(f"bad sample {self.id!r}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (BadSample, (self.id, self.reason, self.detail))


#: Whether image paths may follow symbolic links out of the image root (``data.follow_symlinks``,
#: docs/method.md §4). A process-wide default: the loader builders set it from their
#: ``DataConfig`` (:func:`set_follow_symlinks`); ``CMPT_FOLLOW_SYMLINKS=1`` carries it to spawned
#: DataLoader workers (forked ones inherit it).
FOLLOW_SYMLINKS = os.environ.get("CMPT_FOLLOW_SYMLINKS") == "1"


def set_follow_symlinks(follow: bool) -> None:
    """Set :data:`FOLLOW_SYMLINKS` for this process and the workers it starts."""
    global FOLLOW_SYMLINKS
    FOLLOW_SYMLINKS = bool(follow)
    os.environ["CMPT_FOLLOW_SYMLINKS"] = "1" if follow else "0"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


@functools.lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    """``realpath`` of an image root, resolved once per process (it is asked for every image)."""
    return os.path.realpath(root)


def resolve_image_path(
    image_root: str, path: Any, sample_id: str = "?", follow_symlinks: bool | None = None
) -> str:
    """``path`` joined to ``image_root``, normalized; ``BadSample`` if it leaves the root or is not a path.

    Absolute paths are accepted only inside the root. ``..`` components are collapsed first; then,
    unless ``follow_symlinks`` (default :data:`FOLLOW_SYMLINKS`), the path's ``realpath`` must lie
    inside the root's ``realpath`` — a symbolic link out of the root is ``path_escape`` (docs/method.md §4).
    The normalized, unresolved path is returned.
    """
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise BadSample(sample_id, "bad_value", f"image path must be a non-empty string, got {path!r}")
    root = os.path.normpath(os.path.abspath(image_root))
    full = os.path.normpath(os.path.join(root, path))
    if not _inside(full, root):
        raise BadSample(
            sample_id, "path_escape", f"{path!r} resolves to {full!r}, outside the image root {root!r}"
        )
    if not (FOLLOW_SYMLINKS if follow_symlinks is None else follow_symlinks):
        real_root, real = _real_root(root), os.path.realpath(full)
        if not _inside(real, real_root):
            raise BadSample(
                sample_id,
                "path_escape",
                f"{path!r} leads through a symbolic link to {real!r}, outside the image root "
                f"{real_root!r} (data.follow_symlinks: true allows it)",
            )
    return full


@dataclass
class Record:
    """One LLaVA-form record or document, whatever the source (docs/method.md §3, §4).

    ``images``: the raw ``image`` entries (a single string becomes a one-element list; types are
    checked by the validator): paths relative to ``image_root`` (JSON sources) or the encoded image
    ``bytes`` (tar shards, Hugging Face datasets). ``conversations``: the raw value, ``None`` when
    the key is missing. ``meta``: every other key. ``index``: position in the source.
    ``image_root``: where paths resolve. ``origin``: where the record was read (a shard and member
    key, a dataset row), for messages only. ``text``: a document's text with its ``<image>``
    placeholders (``None`` when the key is missing; a non-string value is kept as read and reported
    as ``bad_value`` by the checker and the builder). ``members``: tar shards only, the sample's
    members other than ``.json`` by extension and by full name (``"qry.png"``, ``"000001.qry.png"``),
    through which pair records reference their images (:mod:`cmpt.data.pairs`); ``None`` elsewhere.
    ``caption``: an image–caption record's raw caption (tar ``jpg`` + ``txt`` samples,
    :mod:`cmpt.data.webdataset`); such a record carries both views — ``conversations``, the one-turn
    caption conversation with the default prompt (the CoMP builder puts ``data.caption_prompt``
    there, :func:`cmpt.data.chat_layout.caption_conversation`), and ``text``, ``"<image>\n" +
    caption``, the document MoCa reads (docs/method.md §2.1, §3).
    """

    id: str
    images: list[Any]
    conversations: Any
    meta: dict[str, Any] = field(default_factory=dict)
    index: int = -1
    image_root: str = ""
    origin: str = ""
    text: Any = None  # str for document records
    members: dict[str, bytes] | None = None  # tar shards: named members (pair records' images)
    caption: str | None = None  # image–caption records: the raw caption

    @property
    def is_document(self) -> bool:
        """A document record: ``text`` and no ``conversations`` (docs/method.md §3)."""
        return self.conversations is None and self.text is not None

    @property
    def is_caption(self) -> bool:
        """An image–caption record (``caption`` set): a conversation for CoMP, a document for MoCa."""
        return self.caption is not None

    @property
    def is_pair(self) -> bool:
        """A contrastive pair record (:data:`PAIR_KEYS` in ``meta``, neither ``conversations`` nor
        ``text``; docs/method.md §3)."""
        return self.conversations is None and self.text is None and any(k in self.meta for k in PAIR_KEYS[:4])

    def image_path(self, i: int) -> str:
        """Absolute path of image ``i``; raises ``BadSample`` (``path_escape`` / ``bad_value``)."""
        return resolve_image_path(self.image_root, self.images[i], self.id)

    def image_source(self, i: int) -> str | bytes:
        """What to decode for image ``i``: its bytes when held in memory, else its resolved path."""
        x = self.images[i]
        if isinstance(x, (bytes, bytearray, memoryview)):
            return bytes(x)
        return self.image_path(i)

    def image_label(self, i: int) -> str:
        """A short name of image ``i`` for messages (never the bytes themselves)."""
        x = self.images[i]
        if isinstance(x, (bytes, bytearray, memoryview)):
            return f"{self.origin or self.id} image {i} ({len(x)} bytes)"
        return repr(x)


def _record_from_obj(obj: dict[str, Any], default_id: str, index: int, image_root: str) -> Record:
    rid = obj.get("id")
    rid = default_id if rid is None or rid == "" else str(rid)
    image_key = "image" if "image" in obj else "images"
    raw = obj.get(image_key)
    images = (
        []
        if raw is None
        else [raw]
        if isinstance(raw, str)
        else list(raw)
        if isinstance(raw, list)
        else [raw]
    )
    convs = obj.get("conversations")
    if convs is None and obj.get("messages") is not None:  # the HF / TRL chat layout
        convs, images = messages_to_conversations(obj["messages"], images, rid)
    meta = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
    return Record(rid, images, convs, meta, index, image_root, text=obj.get("text"))


class LlavaSource:
    """Random-access LLaVA JSON / JSONL reader (docs/method.md §4); ``source[i] -> Record``.

    ``image_root`` defaults to the directory of ``path``. ``bad_lines`` lists ``(index, line,
    message)`` of the JSONL lines that could not be parsed (``source[index]`` raises ``BadSample``).
    """

    def __init__(
        self, path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, strict: bool = False
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.name = os.path.basename(self.path)
        self.image_root = os.path.abspath(os.fspath(image_root) if image_root else os.path.dirname(self.path))
        self.bad_lines: list[tuple[int, int, str]] = []
        self._fd: int | None = None
        self._pid = -1
        with open(self.path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        self.format = "json" if head.startswith(b"[") else "jsonl"
        if self.format == "json":
            self._load_json()
        else:
            self._scan_jsonl(strict)
        if self.bad_lines:
            shown = ", ".join(f"line {ln}" for _, ln, _ in self.bad_lines[:10])
            more = f" and {len(self.bad_lines) - 10} more" if len(self.bad_lines) > 10 else ""
            log.warning(
                "%s: %d unparseable line(s) (%s%s) will be counted as bad samples (invalid_json)",
                self.path, len(self.bad_lines), shown, more,
            )  # fmt: skip

    # -- loading ---------------------------------------------------------------------------------
    def _load_json(self) -> None:
        try:
            with open(self.path, encoding="utf-8-sig") as fh:
                data = json.load(fh)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f"line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(
                f"{self.path}: not a valid JSON list ({where}); fix the file or convert it to JSONL, "
                "where a bad line is skipped and counted"
            ) from None
        if not isinstance(data, list):
            raise ValueError(f"{self.path}: a LLaVA .json file must hold a list of records")
        blobs = [json.dumps(rec, ensure_ascii=False).encode("utf-8") for rec in data]
        del data
        sizes = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self._lines = np.full(len(blobs), -1, dtype=np.int64)
        self._bad = np.zeros(len(blobs), dtype=bool)

    def _scan_jsonl(self, strict: bool) -> None:
        offsets, sizes, lines, bad = [], [], [], []
        pos = 0
        with open(self.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                msg = ""
                try:
                    obj = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                    if not isinstance(obj, dict):
                        msg = f"a record must be a JSON object, got {type(obj).__name__}"
                except UnicodeDecodeError as e:
                    msg = f"invalid UTF-8 at byte {e.start} of the line"
                except json.JSONDecodeError as e:
                    msg = f"invalid JSON ({e.msg} at character {e.pos})"
                if msg:
                    if strict:
                        raise ValueError(f"{self.path}:{lineno}: {msg}; fix or delete the line")
                    self.bad_lines.append((len(offsets), lineno, msg))
                offsets.append(start)
                sizes.append(len(line))
                lines.append(lineno)
                bad.append(bool(msg))
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        self._bad = np.asarray(bad, dtype=bool)

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._bad)

    def line_of(self, index: int) -> int | None:
        """1-based line number of record ``index`` in a JSONL file (``None`` for a JSON list)."""
        ln = int(self._lines[index])
        return ln if ln > 0 else None

    def _raw(self, i: int) -> bytes:
        if self.format == "json":
            return self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes()
        if self._fd is None or self._pid != os.getpid():  # one descriptor per (worker) process
            with _FD_LOCK:
                if self._fd is None or self._pid != os.getpid():
                    self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, int(self._sizes[i]), int(self._offsets[i]))

    def __getitem__(self, i: int) -> Record:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record index {i} out of range for {n} records in {self.path}")
        i %= n
        default_id = f"{self.name}:{i}"
        if self._bad[i]:
            _, lineno, msg = next(b for b in self.bad_lines if b[0] == i)
            raise BadSample(default_id, "invalid_json", f"{self.path}:{lineno}: {msg}")
        obj = json.loads(self._raw(i).decode("utf-8-sig"))
        if not isinstance(obj, dict):
            raise BadSample(
                default_id, "invalid_json", f"record {i} is a {type(obj).__name__}, not an object"
            )
        return _record_from_obj(obj, default_id, i, self.image_root)

    def __iter__(self) -> Iterator[Record]:
        """All records; unparseable ones are skipped here (use indexing to see them as ``BadSample``)."""
        for i in range(len(self)):
            if not self._bad[i]:
                yield self[i]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this source's content for caches: path, size, mtime, image root, and
        :data:`READER_VERSION`."""
        st = os.stat(self.path)
        return {
            "reader": READER_VERSION,
            "path": self.path,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "image_root": self.image_root,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state

    def __del__(self, _getpid=os.getpid, _close=os.close) -> None:  # bound now: `os` may be gone at exit
        if getattr(self, "_fd", None) is not None and self._pid == _getpid():
            with contextlib.suppress(OSError):
                _close(self._fd)

    def __repr__(self) -> str:
        return f"LlavaSource({self.path!r}, image_root={self.image_root!r}, records={len(self)})"


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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


def source_kind(path: str | os.PathLike | list) -> str:
    """``"llava"`` (.json/.jsonl), ``"mixture"`` (.yaml/.yml), ``"tar"`` (a list, glob or brace pattern
    of tar shards, or a directory of them) or ``"hf"`` (a ``save_to_disk`` directory, ``.parquet``
    files, a glob of them, a directory of them or a dataset repository downloaded from the hub,
    :mod:`cmpt.data.hub_layout`; ``PATH#SPLIT`` names a split) (docs/method.md §4, docs/data.md)."""
    if isinstance(path, (list, tuple)):
        return "tar"
    p, split = split_spec(path)
    low = p.lower().rstrip("/")
    if low.endswith((".json", ".jsonl")):
        kind = "llava"
    elif low.endswith((".yaml", ".yml")):
        kind = "mixture"
    elif low.endswith(".parquet"):
        kind = "hf"
    elif low.endswith(_TAR_SUFFIXES) or "{" in p:
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
    from cmpt.data.hub_layout import is_parquet_dir

    names = os.listdir(p)
    if {"dataset_info.json", "state.json", "dataset_dict.json"} & set(names):
        return "hf"
    if any(n.lower().endswith(".parquet") for n in names):
        return "hf"
    if any(n.lower().endswith(_TAR_SUFFIXES) for n in names):
        return "tar"
    return "hf" if is_parquet_dir(p) else ""


def open_source(
    path: str | os.PathLike | list, image_root: str | os.PathLike | None = None, *, split: str | None = None
) -> Any:
    """The source named by ``path``, by :func:`source_kind` (docs/method.md §4, docs/data.md).

    Map-style sources (``len`` / ``source[i] -> Record``): ``LlavaSource``, ``HFSource``,
    ``MixtureSource``. Tar shards give a :class:`cmpt.data.webdataset.ShardList` (streaming), and so
    does a mixture whose members are all tar shards. ``split``: the split of a Hugging Face dataset
    (as ``PATH#SPLIT``, which wins); ``ValueError`` for the other kinds.
    """
    kind = source_kind(path)
    path, named = split_spec(path)
    split = named or split
    if split is not None and kind != "hf":
        raise ValueError(f"{os.fspath(path)!r}: a split ({split!r}) applies only to Hugging Face datasets")
    if kind == "llava":
        return LlavaSource(path, image_root or None)
    if kind == "hf":
        from cmpt.data.hf_source import HFSource

        return HFSource(path, image_root or None, split=split)
    if kind == "mixture":
        from cmpt.data.mixture import load_mixture

        return load_mixture(path)
    from cmpt.data.webdataset import ShardList

    return ShardList(path)
