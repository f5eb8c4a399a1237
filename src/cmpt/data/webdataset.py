"""WebDataset-style tar shards: naming, streaming reads and sample decoding (docs/method.md §4).

A shard is a plain POSIX tar file. A *sample* is a run of consecutive members sharing a *key*:
the member path up to the first ``.`` of its base name; the rest is the member's *extension*::

    000123.json      the LLaVA record (id, conversations, ...) without image paths
    000123.png       its single image                       (extension "png")
    000124.json
    000124.0.jpg     several images: "<n>.<ext>", in the order of n
    000124.1.jpg

Images: when the JSON has an ``image`` (or ``images``) field, each entry names a member: its
extension (``"png"`` or ``["0.jpg", "1.jpg"]``; a leading ``"<key>."`` is accepted too), or the base
name of a path kept as written (``"coco/x.jpg"`` → member ``<key>.x.jpg``) — when every entry names
one and different entries name different ones. Otherwise (paths of LLaVA records stored verbatim)
the entries are the image members by position (the plain image extension, then ``<n>.<ext>`` by
``n``) when there are as many, else ``missing_image``: the i-th of ``k`` paths is the i-th of ``k``
image members even where a path's base name is another member's (``"clip/1.png"``). Names and
positions are never mixed over these members (only one outside that order, ``x.jpg``, is named).
Without the field, the images are the member with a plain image extension (``png``, ``jpg``, ...)
followed by ``<n>.<ext>`` by ``n``. The record's id is the JSON ``id`` or ``"<shard name>/<key>"``.

The ``.json`` member may be in the Hugging Face / TRL chat layout (``messages`` with typed parts,
:mod:`cmpt.data.chat_layout`); its ``images`` (or inline image parts) resolve to members as above.

Documents (docs/method.md §3): the ``.json`` member may carry ``text`` (with ``<image>``
placeholders) instead of ``conversations``; its images are found as above. A sample without a
``.json`` member but with a ``.txt`` one (UTF-8) is read from the ``.txt`` — and so is a sample
whose ``.json`` has neither ``text`` nor ``conversations`` (metadata only, as img2dataset and
open_clip write); without a ``.txt``, such metadata's ``caption`` is read instead (img2dataset
writes it there when configured so). With one image member and no ``<image>`` in the text it is an
**image–caption pair** (``Record.caption``, :func:`cmpt.data.chat_layout.caption_views`): a
one-turn caption conversation for CoMP (user ``"<image>\n" + data.caption_prompt``, assistant the
caption, :func:`cmpt.data.chat_layout.caption_conversation`) and the document ``"<image>\n" +
caption`` for MoCa; otherwise a document (a text-only passage when it has no image).

Contrastive pairs (docs/method.md §3, :mod:`cmpt.data.pairs`): a ``.json`` member with the pair keys
(``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ``neg_text``, ``neg_image_path``,
``task``) and no ``text`` / ``conversations``; its image fields name members of the sample
(``"qry.png"`` or ``"000123.qry.png"``), kept in ``Record.members``.

Reading (streaming, seekable, damage found where it starts) is :mod:`cmpt.data.tar_reader`.

Shards are given as a list, a glob (``data/*.tar``), a brace pattern (``shards-{000000..000009}.tar``,
``{a,b}``; ranges keep their zero padding) or a directory holding ``*.tar`` files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from cmpt.data.chat_layout import caption_views, messages_to_conversations
from cmpt.data.sources import PAIR_KEYS, RECORD_KEYS, BadSample, Record, caption_of
from cmpt.data.tar_reader import RawSample, iter_tar, read_sample_at, split_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "TAR_SUFFIXES",
    "RawSample",
    "ShardList",
    "decode_sample",
    "expand_braces",
    "expand_shards",
    "iter_tar",
    "read_sample_at",
    "split_key",
]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_NUMBERED = re.compile(r"(\d+)\.([A-Za-z0-9]+)")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
log = logging.getLogger("cmpt.data")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b}`` (zero padding kept when ``a`` is padded) and ``{x,y}`` groups, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def expand_shards(spec: str | os.PathLike | list | tuple) -> list[str]:
    """The shard paths of ``spec`` (a list, glob, brace pattern or directory), absolute, in order."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    s = os.fspath(spec)
    if os.path.isdir(s):
        paths = sorted(os.path.join(s, n) for n in os.listdir(s) if n.lower().endswith(TAR_SUFFIXES))
    else:
        paths = []
        for p in expand_braces(s):
            hits = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
            if not hits:
                raise FileNotFoundError(f"no tar shard matches {p!r} (from {s!r})")
            paths += hits
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} tar shard(s) of {s!r} do not exist, e.g. {missing[0]!r}")
    if not paths:
        raise FileNotFoundError(f"no tar shard in {s!r}")
    return [os.path.abspath(p) for p in paths]


def _image_extensions(members: dict[str, bytes]) -> list[str]:
    single = [e for e in members if e.lower() in IMAGE_EXTENSIONS]
    numbered = [
        (int(m.group(1)), e)
        for e in members
        if (m := _NUMBERED.fullmatch(e)) and m.group(2).lower() in IMAGE_EXTENSIONS
    ]
    return single + [e for _, e in sorted(numbered)]


def _txt(raw: RawSample, rid: str, origin: str) -> str:
    """The text of the sample's ``.txt`` member (UTF-8, else ``bad_value``)."""
    try:
        return raw.members["txt"].decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadSample(rid, "bad_value", f"{origin}.txt is not UTF-8 ({e})") from None


def _member_for(entry: str, base: str, members: dict[str, bytes]) -> str | None:
    """The extension of the member ``entry`` names: ``entry`` itself, without a leading ``"<key>."``,
    or the base name of a path (``"coco/x.jpg"`` → member ``"<key>.x.jpg"``)."""
    own = entry[len(base) + 1 :] if entry.startswith(base + ".") else entry
    for ext in (own, entry.rsplit("/", 1)[-1]):
        if ext in members:
            return ext
    return None


def _resolve_images(listed: list[str], raw: RawSample, base: str, rid: str, origin: str) -> list[str]:
    """The members of the entries of an ``image`` / ``images`` field (see the module docstring): by
    name when every entry names a member and different entries name different members; else by
    position over the image members (``missing_image`` unless there are as many), never both."""
    named = [_member_for(e, base, raw.members) for e in listed]
    owner: dict[str, str] = {}
    clash = {m for e, m in zip(listed, named) if m is not None and owner.setdefault(m, e) != e}
    if None not in named and not clash:
        return named  # type: ignore[return-value]
    order = _image_extensions(raw.members)  # what "by position" means: plain, then <n>.<ext> by n
    # a member outside that order ("x.jpg", named by "coco/x.jpg") has no position to mix up
    exts = [m if m is not None and m not in order and m not in clash else None for m in named]
    unnamed = [i for i, m in enumerate(exts) if m is None]
    if len(order) != len(unnamed):
        raise BadSample(
            rid, "missing_image", f"{origin}: no member for {[listed[i] for i in unnamed]} ({len(order)} "
            f"image member(s) for {len(unnamed)} path(s); has {sorted(raw.members)}): store one image member "
            "per path, or name the members in the field (\"0.jpg\", \"1.jpg\")",
        )  # fmt: skip
    for i, m in zip(unnamed, order):
        exts[i] = m
    return exts  # type: ignore[return-value]


def _load_json(raw: RawSample, default_id: str, origin: str) -> dict[str, Any]:
    if "json" not in raw.members:
        if "txt" in raw.members:
            return {}
        raise BadSample(
            default_id, "missing_key", f"{origin}: no .json or .txt member (has {sorted(raw.members)})"
        )
    try:
        obj = json.loads(raw.members["json"].decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(default_id, "invalid_json", f"{origin}.json: {e}") from None
    if not isinstance(obj, dict):
        raise BadSample(default_id, "invalid_json", f"{origin}.json is a {type(obj).__name__}, not an object")
    return obj


def decode_sample(raw: RawSample, shard_name: str, index: int = -1) -> Record:
    """The :class:`Record` of a raw sample (images as bytes); ``BadSample`` for a missing or invalid
    ``.json`` member (without a ``.txt`` one), an unreadable shard, an unreadable chat-layout record
    or an image field whose entries have no member."""
    base = raw.key.rsplit("/", 1)[-1]
    default_id = f"{shard_name}/{raw.key}" if raw.key else f"{shard_name}@{raw.offset}"
    origin = f"{shard_name}:{raw.key}"
    if raw.error:
        raise BadSample(default_id, "corrupt_archive", f"{shard_name} unreadable from byte {raw.offset}: "
                        f"{raw.error}; the sample there and the rest of the shard are skipped (write or copy "
                        "the shard again)")  # fmt: skip
    obj = _load_json(raw, default_id, origin)
    rid = obj.get("id")
    rid = default_id if rid is None or rid == "" else str(rid)
    if obj.get("conversations") is None and obj.get("text") is None and any(k in obj for k in PAIR_KEYS[:4]):
        # a contrastive pair (docs/method.md §3): its image fields name members, resolved by the builder
        named = {e: v for e, v in raw.members.items() if e != "json"}
        named.update({f"{base}.{e}": v for e, v in list(named.items())})
        meta = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
        return Record(rid, [], None, meta, index, "", origin, None, named)
    field_name = "image" if "image" in obj else "images" if "images" in obj else None
    listed = obj.get(field_name) if field_name else None
    listed = [] if listed is None else [listed] if isinstance(listed, str) else listed
    convs = obj.get("conversations")
    if convs is None and obj.get("messages") is not None:  # the HF / TRL chat layout
        convs, listed = messages_to_conversations(obj["messages"], listed, rid)
    if field_name is None and not listed:
        exts = _image_extensions(raw.members)
    elif not isinstance(listed, list) or not all(isinstance(e, str) and e for e in listed):
        raise BadSample(
            rid, "bad_value", f"{origin}: '{field_name or 'image'}' must name members or image paths"
        )
    else:
        exts = _resolve_images(listed, raw, base, rid, origin)
    text, caption = obj.get("text"), None
    if text is None and convs is None:  # the .txt member, else the metadata's caption (or nothing)
        caption = _txt(raw, rid, origin) if "txt" in raw.members else caption_of(obj)
        if caption is not None:  # an image–caption pair: a conversation for CoMP, a document for MoCa
            text, caption, convs = caption_views(caption, len(exts), rid)
    meta = {k: v for k, v in obj.items() if k not in RECORD_KEYS}
    images: list[Any] = [raw.members[e] for e in exts]
    return Record(rid, images, convs, meta, index, "", origin, text, caption=caption)


class ShardList:
    """A list of tar shards read as a stream (docs/method.md §4); see the module docstring for the format.

    ``paths``: the expanded shard paths (a shard may be listed more than once: mixture weights).
    """

    def __init__(self, spec: str | os.PathLike | list | tuple) -> None:
        self.spec = spec if isinstance(spec, (list, tuple)) else os.fspath(spec)
        self.path = self.spec if isinstance(self.spec, str) else f"{len(self.spec)} shard spec(s)"
        self.paths = expand_shards(spec)
        self.names = [os.path.basename(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def iter_shard(self, shard: int, offset: int = 0) -> Iterator[RawSample]:
        """Raw samples of shard number ``shard`` from byte ``offset``."""
        return iter_tar(self.paths[shard], offset)

    def label(self, shard: int, rid: str) -> str:
        """The id of a sample of entry ``shard`` whose own id is ``rid`` (a mixture adds to it)."""
        return rid

    def decode(self, raw: RawSample, shard: int, index: int = -1) -> Record:
        """:func:`decode_sample` of a sample of entry ``shard``, with its :meth:`label` (a
        ``BadSample``'s too)."""
        try:
            record = decode_sample(raw, self.names[shard], index)
        except BadSample as e:
            raise BadSample(self.label(shard, e.id), e.reason, e.detail) from None
        record.id = self.label(shard, record.id)
        return record

    def read(self, shard: int, offset: int, index: int = -1) -> Record:
        """Decode the sample of shard ``shard`` at ``offset`` (raises ``BadSample``)."""
        return self.decode(read_sample_at(self.paths[shard], offset), shard, index)

    def iter_records(self) -> Iterator[Record | BadSample]:
        """Every sample of every shard, in order: a ``Record`` or the ``BadSample`` it raised."""
        n = 0
        for shard in range(len(self)):
            for raw in self.iter_shard(shard):
                try:
                    yield self.decode(raw, shard, n)
                except BadSample as e:
                    yield e
                n += 1

    def fingerprint(self) -> dict[str, Any]:
        """Shard paths with their sizes and modification times."""
        return {"shards": [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in self.paths]}

    def __repr__(self) -> str:
        return f"ShardList({len(self)} shards, first={self.paths[0]!r})"
