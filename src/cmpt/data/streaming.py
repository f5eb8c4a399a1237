"""Streaming loader over tar shards: disjoint streams, shuffle buffer, budgets, exact resume (method.md §4).

**Streams.** Each rank runs ``S`` streams (``DataConfig.num_streams``; default one per DataLoader
worker, at least one); worker ``w`` of ``W`` runs the streams ``≡ w (mod W)`` (``S`` must be a multiple
of ``W``) and the micro-batches come out round-robin over the streams: stream ``s, s+1, ...``. The
``N = world_size · S`` streams of a run split every epoch's shards: the shard order is a permutation
seeded by ``(seed, epoch)`` (the listed order when not shuffling), and global stream ``j = rank · S + s``

* reads the shards at positions ``j, j + N, j + 2N, ...`` of that order when there are at least
  ``N`` shards (streams then differ by at most one shard: give many more shards than streams);
* otherwise reads the one shard at position ``j mod M`` (``M`` shards), keeping the samples whose index
  in the shard is ``≡ j // M`` modulo the number of streams sharing that shard. Every stream still
  reads (and skips) the whole shard, so prefer at least ``N`` shards.

Either way the samples read in an epoch by all ranks × streams are disjoint and cover the data.
An epoch in which a stream reads nothing (empty shards, as img2dataset leaves when every download of
a shard failed) is skipped: the stream goes on to its next epoch. A stream that no epoch can feed
stops the loader when it is built, in one line naming the shards (:func:`~cmpt.data.shard_plan.never_read`).

**Batches.** A stream draws samples from a shuffle buffer of ``buffer_size`` samples (a seeded
draw, the buffer refilled before each draw; ``shuffle=False``: one sample, stream order) and fills
micro-batches with the :class:`~cmpt.data.batching.TokenBudgetBatcher` rules: a micro-batch takes the
next sample unless that would exceed the vision or text budget or ``max_samples``; a sample over a
budget on its own is skipped (counted in ``oversize_skipped``) or, with ``oversize="truncate"``,
batched alone. Lengths are the :class:`~cmpt.data.pipeline.LengthIndex` estimates, computed as
samples are read (documents included, with the builder's text overhead, docs/method.md §3). The
builder is any object with ``build(record, epoch)``, ``processor``, ``tokenizer`` (a CoMP
``SampleBuilder`` or MoCa's ``DocumentBuilder``). Epochs are per stream and soft: the buffer
carries samples across the boundary, and each sample is built with the epoch in which it was read.

**Exact resume.** Every micro-batch carries its stream's state after it: the epoch, the shard being
read and the byte offset of its next sample, the draw counter, the counters of its checks (``fed``:
some epoch can feed it, so the shards are not scanned again; ``epochs_read``) and the buffer (and the
sample that did not fit, which opens the next micro-batch) as ``(epoch, shard, byte offset)`` locators
— the samples themselves are read back from the shards on resume. The loader keeps the states of the
micro-batches the caller *consumed* (not those workers prefetched), so a loader given that state yields
exactly the next unseen micro-batches, with any number of workers dividing ``S``. Bad samples
(unreadable JSON, missing image members, undecodable images, a corrupt shard tail) are skipped and
counted exactly like the map-style loader's: ``MAX_CARRIED_BAD`` of them in a row without a usable
sample come out as an empty micro-batch (``num_samples == 0``), so a stream whose data are all bad
still reports them and the trainer's one limit, ``train.max_bad_fraction`` over all ranks, decides
(docs/method.md §4).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from cmpt.data.batching import MAX_CARRIED_BAD, LoaderBase, empty_batch, worker_loader
from cmpt.data.pipeline import SampleBuilder, collate, estimate_lengths, length_overhead
from cmpt.data.shard_plan import assign_shards, never_read
from cmpt.data.sources import BadSample
from cmpt.data.webdataset import ShardList

__all__ = ["SampleStream", "StreamConfig", "StreamingLoader", "assign_shards", "never_read"]


@dataclass
class StreamConfig:
    """Budgets and shuffling of a stream (see the module docstring); ``text_cap``: text estimates
    are capped at it (``max_text_tokens`` with ``oversize="truncate"``, as the map-style loader)."""

    vision_budget: int
    text_budget: int
    max_samples: int
    oversize: str = "skip"
    text_cap: int | None = None
    shuffle: bool = True
    buffer_size: int = 256
    seed: int = 0


class _BadStretch(Exception):
    """Internal: ``MAX_CARRIED_BAD`` bad samples are waiting to be reported (docs/method.md §4)."""


class _Item:
    __slots__ = ("lengths", "loc", "record")

    def __init__(self, loc: tuple[int, int, int], record: Any, lengths: tuple[int, int]) -> None:
        self.loc, self.record, self.lengths = loc, record, lengths


class SampleStream:
    """Micro-batches of global stream ``stream`` of ``num_streams`` over ``shards`` (docs/method.md §4)."""

    def __init__(
        self,
        shards: ShardList,
        stream: int,
        num_streams: int,
        builder: SampleBuilder,
        cfg: StreamConfig,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.shards, self.stream, self.num_streams = shards, stream, num_streams
        self.builder, self.cfg = builder, cfg
        self.buffer_size = max(1, cfg.buffer_size) if cfg.shuffle else 1
        self._overhead = length_overhead(builder)
        self._plan: tuple[int, list[tuple[int, int, int]]] | None = None
        self._reader: Iterator[Any] | None = None
        self._bad: list[tuple[str, str, str]] = []
        self._fed = False  # some epoch has a sample for this stream (checked at its first empty epoch)
        self._epochs_read = 0  # epochs ended with a sample read (empty ones do not count as stuck)
        self.epoch = self.shard_pos = self.sample_idx = self.offset = self.draws = 0
        self.oversize_skipped = self.good_in_epoch = self.bad_in_epoch = 0
        self.buffer: list[_Item] = []
        self.pending: _Item | None = None
        if state:
            self._restore(state)

    # -- reading -------------------------------------------------------------------------------
    def _epoch_plan(self) -> list[tuple[int, int, int]]:
        if self._plan is None or self._plan[0] != self.epoch:
            c, n, e = self.cfg, len(self.shards), self.epoch
            self._plan = (e, assign_shards(n, self.num_streams, self.stream, e, c.seed, c.shuffle))
        return self._plan[1]

    def _item(self, loc: tuple[int, int, int], record: Any) -> _Item:
        v, t = estimate_lengths(record, self.builder.processor, self.builder.tokenizer, self._overhead)
        if self.cfg.text_cap is not None:
            t = min(t, self.cfg.text_cap)
        return _Item(loc, record, (v, t))

    def _next_shard(self) -> None:
        self.shard_pos, self.sample_idx, self.offset, self._reader = self.shard_pos + 1, 0, 0, None

    def _read(self, report: bool = True) -> _Item:
        """The next sample of this stream (bad ones are counted and skipped; with ``report``,
        :class:`_BadStretch` once ``MAX_CARRIED_BAD`` of them wait to be reported)."""
        while True:
            plan = self._epoch_plan()
            if self.shard_pos >= len(plan):
                if self.good_in_epoch or self.bad_in_epoch:
                    self._epochs_read += 1
                elif not self._fed:  # an empty epoch is skipped, unless no epoch can feed this stream
                    c = self.cfg
                    why = never_read(self.shards, self.stream, self.num_streams, c.seed, c.shuffle)
                    if why:
                        raise ValueError(why)
                    self._fed = True
                self.epoch, self.shard_pos, self.sample_idx, self.offset = self.epoch + 1, 0, 0, 0
                self.good_in_epoch, self.bad_in_epoch, self._reader = 0, 0, None
                continue
            shard, modulus, residue = plan[self.shard_pos]
            if self._reader is None:
                self._reader = self.shards.iter_shard(shard, self.offset)
            raw = next(self._reader, None)
            if raw is None:
                self._next_shard()
                continue
            index = self.sample_idx
            self.sample_idx, self.offset = index + 1, raw.next_offset
            if index % modulus != residue:
                if raw.error:
                    self._next_shard()
                continue
            try:
                record = self.shards.decode(raw, shard, index)
            except BadSample as e:
                self._bad.append((e.id, e.reason, e.detail))
                self.bad_in_epoch += 1
                if raw.error:
                    self._next_shard()
                if report and len(self._bad) >= MAX_CARRIED_BAD:
                    raise _BadStretch() from None
                continue
            self.good_in_epoch += 1
            return self._item((self.epoch, shard, raw.offset), record)

    def read(self) -> tuple[tuple[int, int, int], Any]:
        """The next sample this stream reads, unbatched: ``((epoch, shard, byte offset), Record)``."""
        item = self._read(report=False)
        return item.loc, item.record

    def _reread(self, loc: list[int] | tuple[int, int, int]) -> _Item:
        epoch, shard, offset = (int(x) for x in loc)
        return self._item((epoch, shard, offset), self.shards.read(shard, offset))

    def _draw(self) -> _Item:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._read())
        digest = hashlib.sha256(f"{self.cfg.seed}/{self.stream}/{self.draws}".encode()).digest()
        k = int.from_bytes(digest[:8], "little") % len(self.buffer)
        self.draws += 1
        item, self.buffer[k] = self.buffer[k], self.buffer[-1]
        self.buffer.pop()
        return item

    # -- batching ------------------------------------------------------------------------------
    def _stuck(self, since: int, what: str) -> None:
        if self._epochs_read >= since + 2:  # two whole epochs read without a usable sample
            raise ValueError(f"stream {self.stream}: {what} (last bad samples: {self._bad[-3:]})")

    def _fill(self) -> list[_Item]:
        c = self.cfg
        cur: list[_Item] = []
        cv = ct = 0
        epochs_read = self._epochs_read
        while True:
            if self.pending is not None:
                item, self.pending = self.pending, None
            else:
                try:
                    item = self._draw()
                except _BadStretch:
                    if cur:  # batch what was read; the bad samples are reported with it
                        return cur
                    raise
            v, t = item.lengths
            if v > c.vision_budget or t > c.text_budget:
                if c.oversize == "skip":
                    self.oversize_skipped += 1
                    self._stuck(epochs_read, "every sample is over a budget; raise the budgets")
                    continue
                if cur:
                    self.pending = item
                    return cur
                return [item]
            if cur and (cv + v > c.vision_budget or ct + t > c.text_budget):
                self.pending = item
                return cur
            cur.append(item)
            cv, ct = cv + v, ct + t
            if len(cur) >= c.max_samples:
                return cur

    def next_batch(self) -> tuple[dict[str, Any], list[tuple[str, str, str]], dict[str, Any]]:
        """``(collated micro-batch, bad samples since the last one, state after it)``; an
        :func:`~cmpt.data.batching.empty_batch` once ``MAX_CARRIED_BAD`` bad samples in a row wait."""
        while True:
            samples = []
            try:
                items = self._fill()
            except _BadStretch:
                items = []
            for item in items:
                try:
                    samples.append(self.builder.build(item.record, item.loc[0]))
                except BadSample as e:
                    self._bad.append((e.id, e.reason, e.detail))
            if not samples and len(self._bad) >= MAX_CARRIED_BAD:
                bad, self._bad = self._bad, []
                return empty_batch(len(bad)), bad, self.state_dict()
            if samples:
                bad, self._bad = self._bad, []
                return collate(samples, num_bad=len(bad)), bad, self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_idx": self.sample_idx,
            "offset": self.offset,
            "draws": self.draws,
            "good_in_epoch": self.good_in_epoch,
            "bad_in_epoch": self.bad_in_epoch,
            "oversize_skipped": self.oversize_skipped,
            "buffer": [list(it.loc) for it in self.buffer],
            "pending": list(self.pending.loc) if self.pending is not None else None,
            "fed": self._fed,
            "epochs_read": self._epochs_read,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if int(state["stream"]) != self.stream:
            raise ValueError(f"state of stream {state['stream']} given to stream {self.stream}")
        for k in ("epoch", "shard_pos", "sample_idx", "offset", "draws", "good_in_epoch", "oversize_skipped"):
            setattr(self, k, int(state[k]))
        self.bad_in_epoch = int(state.get("bad_in_epoch", 0))
        # older states lack the counters: as before, counted from the resume
        self._fed, self._epochs_read = bool(state.get("fed", False)), int(state.get("epochs_read", 0))
        self.buffer = [self._reread(loc) for loc in state["buffer"]]
        self.pending = self._reread(state["pending"]) if state.get("pending") is not None else None


class _StreamDataset(IterableDataset):
    """This rank's streams; in worker ``w`` of ``W`` the streams at global positions ``≡ w (mod W)``."""

    def __init__(self, loader: StreamingLoader, states: list[dict | None], start: int) -> None:
        self.shards, self.builder, self.cfg = loader.shards, loader.builder, loader.cfg
        self.rank, self.num_streams = loader.rank, loader.num_streams
        self.total, self.states, self.start = loader.total_streams, states, start

    def __iter__(self) -> Iterator[tuple[int, dict, list, dict]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        local = [(self.start + w + k * nw) % self.num_streams for k in range(self.num_streams // nw)]
        first = self.rank * self.num_streams
        args = (self.builder, self.cfg)
        streams = {s: SampleStream(self.shards, first + s, self.total, *args, self.states[s]) for s in local}
        while True:
            for s in local:
                batch, bad, state = streams[s].next_batch()
                yield s, batch, bad, state


class StreamingLoader(LoaderBase):
    """This rank's micro-batches from tar shards, forever, resumable exactly (docs/method.md §4).

    Same interface as :class:`~cmpt.data.batching.BatchLoader`: iterate for collated micro-batches
    (a new iterator continues where the caller stopped), ``state_dict()`` / ``load_state_dict()``,
    ``samples_seen`` / ``bad_seen`` and the bad-sample logging (no abort: the trainer decides on
    counts over all ranks, docs/method.md §4). Workers are started per iterator (not persistent),
    from the state of what was consumed.
    """

    def __init__(
        self,
        shards: ShardList,
        builder: SampleBuilder,
        cfg: StreamConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        num_streams: int = 0,
        prefetch_factor: int = 2,
        log_limit: int = 20,
    ) -> None:
        super().__init__(rank, world_size, log_limit)
        self.num_streams = num_streams or max(1, num_workers)
        if num_workers and self.num_streams % num_workers:
            raise ValueError(
                f"num_streams={self.num_streams} must be a multiple of num_workers={num_workers}"
            )
        self.shards, self.builder, self.cfg = shards, builder, cfg
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.total_streams = world_size * self.num_streams
        for s in range(self.num_streams):  # here, not in a worker: one line, no worker traceback
            why = never_read(shards, rank * self.num_streams + s, self.total_streams, cfg.seed, cfg.shuffle)
            if why:
                raise ValueError(why)
        self.states: list[dict[str, Any] | None] = [None] * self.num_streams
        self.next_stream = 0

    @property
    def epoch(self) -> int:
        """The smallest epoch any stream of this rank is in (epochs are per stream)."""
        return min(int(s["epoch"]) if s else 0 for s in self.states)

    @property
    def oversize_skipped(self) -> int:
        return sum(int(s["oversize_skipped"]) for s in self.states if s)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = _StreamDataset(self, list(self.states), self.next_stream)
        it: Any = ds
        if self.num_workers > 0:
            it = worker_loader(
                ds, self.num_workers, self.cfg.seed, persistent=False, prefetch_factor=self.prefetch_factor
            )
        for s, batch, bad, state in it:
            self.states[s], self.next_stream = state, (s + 1) % self.num_streams
            yield self._account(batch, bad)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "streams": [dict(s) if s else None for s in self.states],
            "next_stream": self.next_stream,
            "num_streams": self.num_streams,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.cfg.seed,
            "num_shards": len(self.shards),
            "samples_seen": self.samples_seen,
            "bad_seen": self.bad_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the next unseen micro-batch; the shards, seed, world size, rank and number
        of streams must be those of the run that saved it (call before iterating)."""
        if state.get("kind") != "stream":
            raise ValueError("not the state of a streaming (tar shard) loader")
        mine = {"num_streams": self.num_streams, "world_size": self.world_size, "rank": self.rank,
                "seed": self.cfg.seed, "num_shards": len(self.shards)}  # fmt: skip
        for k, v in mine.items():
            if int(state[k]) != v:
                raise ValueError(f"streaming loader state has {k}={state[k]}, this loader {v}")
        self.states = [dict(s) if s else None for s in state["streams"]]
        self.next_stream = int(state["next_stream"])
        self.samples_seen, self.bad_seen = int(state.get("samples_seen", 0)), int(state.get("bad_seen", 0))
