"""What every source reads records into: :class:`Record`, :class:`BadSample` and its reasons, and
safely resolved image paths (docs/method.md §4).

The readers — LLaVA JSON / JSONL (:mod:`cmpt.data.llava_source`), tar shards
(:mod:`cmpt.data.webdataset`, :mod:`cmpt.data.tar_index`), Hugging Face datasets
(:mod:`cmpt.data.hf_source`), mixtures (:mod:`cmpt.data.mixture`) — give the same :class:`Record`
whatever the form (every accepted form: ``docs/data.md``); :mod:`cmpt.data.open` tells which reader
a path needs (``open_source``, ``source_kind`` and ``split_spec`` are still importable from here, and
so is ``LlavaSource``).

Decisions:

* **Image bytes.** Tar shards and Hugging Face datasets put the encoded image bytes themselves in
  ``Record.images``; :meth:`Record.image_source` gives what to decode (bytes or a resolved path)
  for every kind of source, so the sample builder and the checkers treat them alike.
* **Image paths** must stay inside the image root: a path that leaves it lexically (``../``, an
  absolute path elsewhere) or through a symbolic link (its ``realpath`` is outside the resolved
  root) is a bad sample (``path_escape``). Absolute paths are read when the image root holds them:
  the message of an absolute one names the fix, an image root such as ``/``
  (:data:`ABSOLUTE_PATH_FIX`, ``docs/data.md`` "Image paths"). Links that stay inside the root
  are fine; links out of it are followed only with ``data.follow_symlinks: true`` (datasets that
  link their image folders in), see :func:`set_follow_symlinks`.
* **Captions.** A record whose only content is a caption (a ``caption`` key, :func:`caption_of`; in
  tar shards also a ``.txt`` member) is an image–caption record (:attr:`Record.caption`) in every
  reader alike (:func:`cmpt.data.chat_layout.caption_views`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ABSOLUTE_PATH_FIX",
    "PAIR_KEYS",
    "READER_VERSION",
    "REASONS",
    "RECORD_KEYS",
    "BadSample",
    "Record",
    "caption_of",
    "check_image_root",
    "resolve_image_path",
    "set_follow_symlinks",
]

#: How records are read from files: part of the sources' fingerprints, so caches of what was read
#: before (length scans, :mod:`cmpt.data.length_cache`) are rebuilt when it changes (2: the chat layout;
#: 3: ``caption`` keys).
READER_VERSION = 3

#: The keys a record's fields are read from; every other key goes to ``Record.meta``.
RECORD_KEYS = ("id", "image", "images", "conversations", "text", "messages", "caption")

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


#: How to let absolute image paths through, named in their ``path_escape`` message (docs/data.md).
ABSOLUTE_PATH_FIX = (
    "image paths must stay inside the image root; to read absolute paths set the root to a folder "
    "that holds the images, e.g. `data.image_root: /` (training; `image_root:` of a mixture member) "
    "or `--image-root /` (cmpt data check, cmpt eval)"
)

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


def check_image_root(image_root: str | os.PathLike | None, key: str = "data.image_root") -> None:
    """Refuse an image root that is given but is not an existing folder, in one line naming ``key``
    (the setting or option it came from) — otherwise every image would be a ``missing_image``
    (docs/data.md "Image paths"). ``None`` / ``""`` (the default root) pass."""
    if not image_root:
        return
    root = os.fspath(image_root)
    fix = "set it to the folder the image paths are relative to, or leave it out (default: the data's folder)"
    if not os.path.exists(root):
        raise FileNotFoundError(f"{key} {root!r} does not exist: {fix}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{key} {root!r} is a file, not a folder: {fix}")


def resolve_image_path(
    image_root: str, path: Any, sample_id: str = "?", follow_symlinks: bool | None = None
) -> str:
    """``path`` joined to ``image_root``, normalized; ``BadSample`` if it leaves the root or is not a path.

    Absolute paths are accepted only inside the root (the message names the fix,
    :data:`ABSOLUTE_PATH_FIX`). ``..`` components are collapsed first; then,
    unless ``follow_symlinks`` (default :data:`FOLLOW_SYMLINKS`), the path's ``realpath`` must lie
    inside the root's ``realpath`` — a symbolic link out of the root is ``path_escape`` (docs/method.md §4).
    The normalized, unresolved path is returned.
    """
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise BadSample(sample_id, "bad_value", f"image path must be a non-empty string, got {path!r}")
    root = os.path.normpath(os.path.abspath(image_root))
    full = os.path.normpath(os.path.join(root, path))
    if not _inside(full, root):
        if os.path.isabs(path):
            detail = f"absolute path {path!r} is outside the image root {root!r}: {ABSOLUTE_PATH_FIX}"
        else:
            detail = f"{path!r} resolves to {full!r}, outside the image root {root!r}"
        raise BadSample(sample_id, "path_escape", detail)
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
    ``caption``: an image–caption record's caption, stripped (one image and a caption from a
    ``caption`` key or a tar ``.txt`` member, :func:`caption_of`); such a record carries both views
    — ``conversations``, the one-turn caption conversation with the default prompt (the CoMP
    builder puts ``data.caption_prompt`` there, :func:`cmpt.data.chat_layout.caption_conversation`),
    and ``text``, ``"<image>\n" + caption``, the document MoCa reads (docs/method.md §2.1, §3).
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
    caption: str | None = None  # image–caption records: the caption

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


def caption_of(obj: dict[str, Any]) -> Any:
    """The ``caption`` of a record object whose content is nothing else — no ``conversations``,
    ``messages``, ``text`` nor pair keys (:data:`PAIR_KEYS`) — else ``None`` (docs/data.md)."""
    if any(obj.get(k) is not None for k in ("conversations", "messages", "text")):
        return None
    return None if any(k in obj for k in PAIR_KEYS[:4]) else obj.get("caption")
