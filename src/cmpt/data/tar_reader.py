"""Tar shards read as samples: streaming, seekable, and damage reported where it starts
(docs/method.md §4; the sample naming is :mod:`cmpt.data.webdataset`'s).

Reading is streaming (``tarfile``, member by member, nothing extracted to disk) and seekable: every
raw sample carries the byte offset of its first header, so a reader can restart at any sample
(:func:`iter_tar` with ``offset``) and a single sample can be read back (:func:`read_sample_at`) —
this is what makes the streaming loader's resume exact (:mod:`cmpt.data.streaming`). A sample is
whole once the next sample's header or the end-of-archive marker is read: a shard that stops being
readable (a bad header, cut data, no end marker: a killed writer or a partial copy, even one cut on
a 512-byte block) ends with a raw sample whose ``error`` is set, in place of the sample being read
there; it and the rest of the shard are one ``corrupt_archive`` bad sample, from any resume point.
Hidden members (``._000123.json``: macOS AppleDouble files) are skipped, logged once per shard.
"""

from __future__ import annotations

import gzip
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RawSample", "iter_tar", "read_sample_at", "split_key"]

log = logging.getLogger("cmpt.data")
_HIDDEN_LOGGED: set[str] = set()  # shards whose hidden members were logged (once per process)


def split_key(name: str) -> tuple[str, str]:
    """``"dir/000123.0.png" -> ("dir/000123", "0.png")``: key up to the first dot of the base name."""
    base = name.rsplit("/", 1)[-1]
    dot = base.find(".")
    if dot < 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot + 1 :]


@dataclass
class RawSample:
    """One sample as stored: ``members`` maps extensions to bytes; ``offset`` is the byte offset of its
    first tar header, ``next_offset`` that of the next sample. ``error`` (the rest of the shard is
    unreadable) comes alone, as the last item of a shard."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0
    next_offset: int = 0
    error: str = ""


def _open_file(path: str) -> Any:
    """Gzipped shards are read through ``gzip`` (offsets are in the uncompressed stream; seeking
    back to one decompresses from the start, so compressed shards resume slower)."""
    return gzip.open(path, "rb") if path.lower().endswith((".gz", ".tgz")) else open(path, "rb")


def _open_at(fh: Any, offset: int) -> tarfile.TarFile:
    fh.seek(offset)
    return tarfile.open(fileobj=fh, mode="r:")


def _end_of_archive(fh: Any, pos: int) -> tuple[bool, str]:
    """Where ``tarfile`` stopped (byte ``pos``): ``(ended, error)``. ``ended``: the end-of-archive
    marker (a zero block) is there, so the last sample is whole; ``error``: what is wrong there or
    after the marker (``""``: nothing). ``tarfile`` stops silently at a missing or bad header."""
    fh.seek(pos)
    block = fh.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return False, (
            f"the shard ends at byte {pos + len(block)} without the end-of-archive marker (two zero "
            "blocks): it is truncated (a killed writer or a partial copy)"
        )
    if block.strip(b"\0"):
        return False, f"bad tar header at byte {pos}"
    while chunk := fh.read(1 << 16):
        if chunk.strip(b"\0"):
            return True, f"data after the end-of-archive marker at byte {pos} (tar files concatenated?)"
    return True, ""


def _read_samples(fh: Any, offset: int, read_data: bool, hidden: list[str]) -> Iterator[RawSample]:
    """The samples of an open shard from ``offset`` (see :func:`iter_tar`). A sample is whole once
    the next sample's header or the end-of-archive marker is read: the one being read when damage
    is found (a bad header, cut data, a missing end marker) is the ``error`` item."""
    cur: RawSample | None = None
    tf: tarfile.TarFile | None = None
    try:
        tf = _open_at(fh, offset)
        while (member := tf.next()) is not None:
            tf.members.clear()  # do not keep every TarInfo of a large shard
            if not member.isfile():
                continue
            if member.name.rsplit("/", 1)[-1].startswith("."):  # "._000123.json" (macOS AppleDouble)
                hidden.append(member.name)
                continue
            key, ext = split_key(member.name)
            if cur is not None and key != cur.key:
                cur.next_offset = member.offset
                yield cur
                cur = None
            if cur is None:
                cur = RawSample(key, offset=member.offset)
            data = tf.extractfile(member) if read_data else None
            cur.members[ext] = data.read() if data is not None else b""
        stop = tf.offset
        ended, error = _end_of_archive(fh, stop)
    except (tarfile.TarError, OSError, EOFError) as e:
        stop = tf.offset if tf is not None else offset
        ended, error = False, f"{type(e).__name__} near byte {stop}: {e}"
    if cur is not None and not ended:  # possibly incomplete: not a shorter good sample
        yield RawSample(cur.key, offset=cur.offset, next_offset=cur.offset, error=error)
        return
    if cur is not None:
        cur.next_offset = stop
        yield cur
    if error:
        yield RawSample("", offset=stop, next_offset=stop, error=error)


def iter_tar(
    path: str, offset: int = 0, *, limit: int | None = None, read_data: bool = True
) -> Iterator[RawSample]:
    """Raw samples of shard ``path`` from the sample starting at byte ``offset`` (streaming, seekable).

    ``limit``: stop after that many samples. ``read_data=False``: members are listed with empty
    contents (headers only: an index of the samples' offsets). Directories, links and other
    non-files are ignored, and so are hidden members (``._000123.json``), logged once per shard.
    """
    hidden: list[str] = []
    with _open_file(path) as fh:
        for count, raw in enumerate(_read_samples(fh, offset, read_data, hidden), 1):
            yield raw
            if limit is not None and count >= limit:
                return
    if hidden and path not in _HIDDEN_LOGGED:
        _HIDDEN_LOGGED.add(path)
        log.warning(
            "%s: skipped %d hidden member(s) such as %r (macOS AppleDouble files, which bsdtar adds "
            "for extended attributes; not samples): create shards with COPYFILE_DISABLE=1 to leave "
            "them out", path, len(hidden), hidden[0],
        )  # fmt: skip


def read_sample_at(path: str, offset: int) -> RawSample:
    """The one raw sample of ``path`` whose first header is at byte ``offset``."""
    for raw in iter_tar(path, offset, limit=1):
        return raw
    raise ValueError(f"{path}: no sample at byte offset {offset}")
