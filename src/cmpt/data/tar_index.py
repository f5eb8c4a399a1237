"""A map-style view of tar shards, so they mix with JSON and Hugging Face datasets (docs/method.md §4).

Tar shards are streamed (:mod:`cmpt.data.streaming`) when they are the whole data. In a mixture
that also has map-style members (LLaVA JSON/JSONL, Hugging Face datasets), the shards are opened as
a :class:`TarIndexSource` instead: each shard is scanned once, headers only, for the byte offset of
every sample (:func:`cmpt.data.tar_reader.iter_tar` with ``read_data=False``), and
``source[i]`` reads sample ``i`` back at its offset (:func:`cmpt.data.tar_reader.read_sample_at`)
and decodes it as the stream would (:func:`cmpt.data.webdataset.decode_sample`: the same records,
ids and bad-sample reasons). A shard that stops being readable keeps the samples before the damage
and one ``corrupt_archive`` entry for the rest, as the stream does.

The offsets are cached by content under ``cache_root()/tar_index/`` (``$CMPT_CACHE``): the key hashes
the shards' paths, sizes and modification times, so a changed shard is scanned again; writers
coordinate as the length cache's do (:func:`cmpt.data.length_cache.load_or_build`). Random access
to gzipped shards decompresses from the start of the shard at every read: prefer plain ``.tar``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cmpt.data import length_cache as LC
from cmpt.data.sources import READER_VERSION, BadSample, Record
from cmpt.data.tar_reader import RawSample, iter_tar, read_sample_at
from cmpt.data.webdataset import ShardList, decode_sample

__all__ = ["TarIndexSource", "tar_index_dir"]

VERSION = 2  # 2: the sample being read at the damage is the corrupt_archive entry


def tar_index_dir() -> Path:
    """Where shard offsets are cached: ``cache_root()/tar_index``."""
    from cmpt.paths import cache_root

    return cache_root() / "tar_index"


def _scan_shard(path: str) -> list[Any]:
    """``[offset, key, error]`` of every sample of one shard, headers only. A shard that ends in
    damage ends in one ``corrupt_archive`` entry, in place of the sample being read there, as in the
    stream: reading the data or skipping it finds the same damage (``tarfile`` checks that each
    member's data is there before reading the next header)."""
    return [[raw.offset, raw.key, raw.error] for raw in iter_tar(path, read_data=False)]


class TarIndexSource:
    """Map-style tar shards (see the module docstring); ``source[i] -> Record`` or ``BadSample``.

    ``shards``: a :class:`~cmpt.data.webdataset.ShardList` or what it accepts (a list, glob, brace
    pattern or directory). ``cache_dir``: where offsets are cached (``""``: :func:`tar_index_dir`;
    ``None``: not cached).
    """

    def __init__(
        self, shards: ShardList | str | os.PathLike | list, cache_dir: str | os.PathLike | None = ""
    ) -> None:
        self.shards = shards if isinstance(shards, ShardList) else ShardList(shards)
        self.path = self.shards.path
        key = hashlib.sha256(
            json.dumps({"version": VERSION, **self.shards.fingerprint()}, sort_keys=True).encode()
        ).hexdigest()
        directory = tar_index_dir() if cache_dir == "" else cache_dir
        file = Path(directory) / f"tar-index-{key[:20]}.json" if directory is not None else None

        def build(beat: Any) -> dict[str, Any]:
            out = []
            for p in self.shards.paths:
                out.append(_scan_shard(p))
                beat()
            return {"records": out}

        per_shard = LC.load_or_build(file, key, len(self.shards), build)[0]["records"]
        self._shard = np.concatenate(
            [np.full(len(s), k, dtype=np.int32) for k, s in enumerate(per_shard)] or [np.zeros(0, np.int32)]
        )
        self._offset = np.asarray([e[0] for s in per_shard for e in s], dtype=np.int64)
        entries = [e for s in per_shard for e in s]
        self._errors = {i: (e[1], e[2]) for i, e in enumerate(entries) if e[2]}

    def __len__(self) -> int:
        return len(self._offset)

    def shard_of(self, i: int) -> int:
        """The number of the shard (in ``shards.paths``) that sample ``i`` is in."""
        return int(self._shard[i])

    def __getitem__(self, i: int) -> Record:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record index {i} out of range for {n} samples in {self.path}")
        i %= n
        k, offset = int(self._shard[i]), int(self._offset[i])
        if i in self._errors:  # raises the corrupt_archive BadSample the stream reports
            key, error = self._errors[i]
            return decode_sample(RawSample(key, offset=offset, error=error), self.shards.names[k], i)
        return decode_sample(read_sample_at(self.shards.paths[k], offset), self.shards.names[k], i)

    def iter_records(self) -> Iterator[Record | BadSample]:
        """``source[i]`` (or the ``BadSample`` it raises) for every ``i`` in order, each shard streamed
        once from its start instead of a seek per sample: for reading every record, as the pair
        loader does for the tasks (and as :meth:`ShardList.iter_records` streams)."""
        starts = np.searchsorted(self._shard, np.arange(len(self.shards) + 1))
        for k, path in enumerate(self.shards.paths):
            stream = iter_tar(path)
            raw = next(stream, None)
            for i in range(int(starts[k]), int(starts[k + 1])):
                while raw is not None and not raw.error and raw.offset < self._offset[i]:
                    raw = next(stream, None)
                use = raw is not None and not raw.error and raw.offset == self._offset[i]
                try:  # a sample the stream does not give as indexed (damage) is read by offset
                    yield decode_sample(raw, self.shards.names[k], i) if use else self[i]
                except BadSample as e:
                    yield e

    def fingerprint(self) -> dict[str, Any]:
        """The shards' paths, sizes and modification times, and how records are read from them
        (:data:`cmpt.data.sources.READER_VERSION`): what identifies the records for caches."""
        return {"reader": READER_VERSION, **self.shards.fingerprint()}

    def __repr__(self) -> str:
        return f"TarIndexSource({self.path!r}, shards={len(self.shards)}, samples={len(self)})"
