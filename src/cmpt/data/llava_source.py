"""The LLaVA JSON / JSONL reader: random access, stable ids, bad lines counted (docs/method.md §4).

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
is a document record (:attr:`~cmpt.data.sources.Record.is_document`). **Captions**: a record whose
only content is a ``caption`` (``{"image": "a.jpg", "caption": "A cat."}``, a common caption-dataset
form) is an image–caption record (:attr:`~cmpt.data.sources.Record.caption`), read as tar ``.txt``
captions are (:func:`cmpt.data.sources.caption_of`, :func:`cmpt.data.chat_layout.caption_views`).
Contrastive pairs (:data:`~cmpt.data.sources.PAIR_KEYS`) are read as they are (:mod:`cmpt.data.pairs`).

Decisions:

* **Random access, small memory.** A JSON list is parsed once and each record is kept as its
  serialized bytes in one NumPy buffer (no per-record Python objects, so forked DataLoader workers
  do not copy it page by page through reference counting). A JSONL file is scanned once, line by
  line, keeping only byte offsets; records are read back with ``os.pread`` when accessed.
* **Stable ids**: ``record["id"]`` (as a string) or ``"<file name>:<index>"``.
* **Bad lines are never dropped silently.** A JSONL line that is not valid UTF-8, not valid JSON
  or not an object keeps its index; accessing it raises :class:`~cmpt.data.sources.BadSample`
  with reason ``invalid_json`` and the line number, so it is counted like any bad sample
  (docs/method.md §4). With ``strict=True`` the constructor raises ``ValueError`` naming the first
  bad line instead.
* **A JSONL file that changes while it is read** (size or modification time, checked at every
  read) stops the run with an error naming it, instead of reading records from stale offsets.
* **Image paths** are relative to the image root (default: the file's directory) and must stay
  inside it (:func:`cmpt.data.sources.resolve_image_path`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from cmpt.data.chat_layout import caption_views, messages_to_conversations
from cmpt.data.sources import READER_VERSION, RECORD_KEYS, BadSample, Record, caption_of

__all__ = ["LlavaSource"]

log = logging.getLogger("cmpt.data")
_FD_LOCK = threading.Lock()


def _record_from_obj(obj: dict[str, Any], default_id: str, index: int, image_root: str) -> Record:
    rid = obj.get("id")
    rid = default_id if rid is None or rid == "" else str(rid)
    raw = obj.get("image" if "image" in obj else "images")
    images = [] if raw is None else list(raw) if isinstance(raw, list) else [raw]
    convs, text, caption = obj.get("conversations"), obj.get("text"), caption_of(obj)
    if convs is None and obj.get("messages") is not None:  # the HF / TRL chat layout
        convs, images = messages_to_conversations(obj["messages"], images, rid)
    if caption is not None:  # {"image": ..., "caption": ...}: an image–caption record
        text, caption, convs = caption_views(caption, len(images), rid)
    meta = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
    return Record(rid, images, convs, meta, index, image_root, text=text, caption=caption)


class LlavaSource:
    """Random-access LLaVA JSON / JSONL reader (docs/method.md §4); ``source[i] -> Record``.

    ``image_root`` defaults to the directory of ``path``. ``bad_lines`` lists ``(index, line,
    message)`` of the JSONL lines that could not be parsed (``source[index]`` raises ``BadSample``).
    """

    def __init__(
        self, path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, strict: bool = False
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.name = os.path.basename(self.path)
        self.image_root = os.path.abspath(os.fspath(image_root) if image_root else os.path.dirname(self.path))
        self.bad_lines: list[tuple[int, int, str]] = []
        self._fd: int | None = None
        self._pid = -1
        with open(self.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            self._stamp = (st.st_size, st.st_mtime_ns)  # what the offsets were computed from
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
        self._bad = np.zeros(len(blobs), dtype=bool)

    def _scan_jsonl(self, strict: bool) -> None:
        offsets, sizes, bad = [], [], []
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
                bad.append(bool(msg))
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._bad = np.asarray(bad, dtype=bool)

    # -- access ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._bad)

    def _raw(self, i: int) -> bytes:
        if self.format == "json":
            return self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes()
        if self._fd is None or self._pid != os.getpid():  # one descriptor per (worker) process
            with _FD_LOCK:
                if self._fd is None or self._pid != os.getpid():
                    self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != self._stamp:  # the byte offsets no longer hold
            raise ValueError(
                f"{self.path} changed while it was being read (size {self._stamp[0]} → {st.st_size} B, "
                "or a new modification time): its records would come from the wrong lines. Restore the "
                "file and resume the run, or start again on the new file (a resume compares data by content)"
            )
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
