"""Token-budget micro-batches, rank split and a resumable loader (docs/method.md §4, §6).

``TokenBudgetBatcher``: each epoch a seeded permutation of the records (a different one per epoch)
is cut greedily into micro-batches: a micro-batch takes the next sample unless that would exceed
the vision-token budget, the text-token budget or ``max_samples``. A sample over a budget on its
own is skipped (counted in ``oversize_skipped``) or, with ``oversize="truncate"``, put alone in a
micro-batch (the sample builder truncates its text). The sequence depends only on
``(lengths, budgets, seed, epoch)``, never on the number of ranks.

Rank split: the micro-batches of epoch 0, 1, 2, ... form one global stream; each group of
``world_size`` consecutive micro-batches goes to the ranks in order (rank ``r`` takes the ``r``-th).
So a global step of ``world_size · grad_accum`` consecutive micro-batches is the same for any split
of that product into ranks and accumulation steps, across epoch boundaries too, and nothing is
dropped. Positions (``epoch``, ``k``) index this global stream and do not depend on the world size.

``BatchLoader``: this rank's collated micro-batches, forever (epochs roll over). Its state counts
micro-batches *consumed by the caller* (not prefetched by workers), so resuming is exact. Bad
samples are skipped, counted and logged; the loaders never decide to abort: the trainer applies the
one limit, ``train.max_bad_fraction``, to counts summed over ranks (docs/method.md §4).
``cmpt.data.loader.build_loader`` picks it for map-style sources, and :mod:`cmpt.data.streaming`
for tar shards.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cmpt.data.pipeline import SampleBuilder, collate
from cmpt.data.sources import BadSample

__all__ = [
    "MAX_CARRIED_BAD",
    "BatchLoader",
    "LoaderBase",
    "TokenBudgetBatcher",
    "empty_batch",
    "identity_collate",
    "worker_init",
    "worker_loader",
]

log = logging.getLogger("cmpt.data")
MAX_CARRIED_BAD = 64  # bad samples in a row (nothing usable) reported as one empty micro-batch


class TokenBudgetBatcher:
    """Deterministic, stateful token-budget micro-batcher (docs/method.md §4); see the module docstring.

    ``lengths[i] = (vision_tokens, text_tokens)`` of record ``i`` (e.g. a ``LengthIndex``).
    ``state_dict() = {"epoch", "position"}``: ``position`` = micro-batches of the epoch consumed
    (over all ranks); iterating the batcher itself yields the micro-batches of a single process.
    """

    def __init__(
        self,
        lengths: Sequence[tuple[int, int]],
        vision_budget: int,
        text_budget: int,
        max_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        oversize: str = "skip",
    ) -> None:
        if min(vision_budget, text_budget, max_samples) < 1:
            raise ValueError(
                f"budgets and max_samples must be >= 1, got {vision_budget}, {text_budget}, {max_samples}"
            )
        if oversize not in ("skip", "truncate"):
            raise ValueError(f"oversize must be 'skip' or 'truncate', got {oversize!r}")
        self.lengths = np.asarray(list(lengths), dtype=np.int64).reshape(-1, 2)
        if (self.lengths < 0).any():
            raise ValueError("lengths must be >= 0")
        self.vision_budget, self.text_budget, self.max_samples = (
            int(vision_budget),
            int(text_budget),
            int(max_samples),
        )
        self.shuffle, self.seed, self.oversize = bool(shuffle), int(seed), oversize
        v, t = self.lengths[:, 0], self.lengths[:, 1]
        over = (v > self.vision_budget) | (t > self.text_budget)
        self.oversize_indices: list[int] = np.nonzero(over)[0].tolist()
        self.oversize_skipped = len(self.oversize_indices) if oversize == "skip" else 0
        self._over = over
        self._cache: tuple[int, list[list[int]]] | None = None
        self.epoch, self.position = 0, 0

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All micro-batches of ``epoch`` (record indices), in order; cached for the last epoch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.num_samples
        order = (
            np.random.default_rng([self.seed, int(epoch)]).permutation(n) if self.shuffle else np.arange(n)
        )
        vb, tb, ms = self.vision_budget, self.text_budget, self.max_samples
        lens, over = self.lengths.tolist(), self._over.tolist()
        batches: list[list[int]] = []
        cur: list[int] = []
        cv = ct = 0
        for i in order.tolist():
            v, t = lens[i]
            if over[i]:
                if self.oversize == "truncate":
                    batches.append([i])
                continue
            if cur and (cv + v > vb or ct + t > tb or len(cur) >= ms):
                batches.append(cur)
                cur, cv, ct = [], 0, 0
            cur.append(i)
            cv, ct = cv + v, ct + t
        if cur:
            batches.append(cur)
        self._cache = (int(epoch), batches)
        return batches

    def global_stream(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[int]]]:
        """``(epoch, k, micro_batch)`` of the global stream from micro-batch ``start`` of ``epoch`` on."""
        while True:
            batches = self.epoch_batches(epoch)
            if not batches:
                raise ValueError(
                    f"epoch {epoch} has no micro-batch ({self.num_samples} records, "
                    f"{self.oversize_skipped} over a budget on their own): use more data or larger budgets"
                )
            for k in range(start, len(batches)):
                yield epoch, k, batches[k]
            epoch, start = epoch + 1, 0

    def iter_rank(
        self, rank: int, world_size: int, epoch: int, start: int
    ) -> Iterator[tuple[int, int, list[int], tuple[int, int]]]:
        """This rank's ``(epoch, k, micro_batch, next_position)`` from the global position
        ``(epoch, start)`` on, forever. ``next_position`` is where every rank stands after the group of
        ``world_size`` micro-batches this one belongs to: the position to resume from."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        group: list[tuple[int, int, list[int]]] = []
        for item in self.global_stream(epoch, start):
            group.append(item)
            if len(group) == world_size:
                e, k, batch = group[rank]
                yield e, k, batch, (group[-1][0], group[-1][1] + 1)
                group = []

    def __iter__(self) -> Iterator[list[int]]:
        """Single-process iteration from the current state, forever; the state follows what is yielded."""
        for _, _, batch, (epoch, position) in self.iter_rank(0, 1, self.epoch, self.position):
            self.epoch, self.position = epoch, position
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next unseen micro-batch; refuses a state made from other data or seed."""
        for k in ("seed", "num_samples"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ValueError(
                    f"batcher state has {k}={state[k]}, this batcher {getattr(self, k)}: different data"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _MicroBatchDataset(Dataset):
    """Map-style dataset whose index is a whole micro-batch ``(epoch, k, record indices)``."""

    def __init__(self, source: Any, builder: SampleBuilder) -> None:
        self.source, self.builder = source, builder

    def __getitem__(self, item: tuple) -> tuple[int, int, dict | None, list, tuple[int, int]]:
        epoch, k, indices, next_position = item
        samples, bad = [], []
        for i in indices:
            try:
                samples.append(self.builder.build(self.source[i], epoch))
            except BadSample as e:
                bad.append((e.id, e.reason, e.detail))
        batch = collate(samples, num_bad=len(bad)) if samples else None
        return epoch, k, batch, bad, next_position


class _RankSampler(Sampler):
    def __init__(self, batcher: TokenBudgetBatcher, rank: int, world_size: int) -> None:
        self.batcher, self.rank, self.world_size = batcher, rank, world_size
        self.start = (0, 0)

    def __iter__(self) -> Iterator[tuple]:
        return self.batcher.iter_rank(self.rank, self.world_size, *self.start)


def identity_collate(x: Any) -> Any:
    """DataLoader ``collate_fn`` for items that are already whole micro-batches."""
    return x


def worker_init(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs from the DataLoader's per-worker seed; one torch thread."""
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, set by the DataLoader
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)


def worker_loader(
    dataset: Any,
    num_workers: int,
    seed: int,
    *,
    sampler: Any = None,
    persistent: bool = True,
    prefetch_factor: int = 2,
    pin_memory: bool | None = None,
) -> DataLoader:
    """The DataLoader every cmpt loader runs its workers with: items are whole micro-batches
    (``batch_size=None``, :func:`identity_collate`), workers seeded by :func:`worker_init` from a
    generator seeded with ``seed`` (so a resumed run's workers draw alike), tokenizers single-threaded
    in the forked workers. ``pin_memory`` (default: when CUDA is available) puts the batches in
    page-locked memory, so their non-blocking copy to the GPU does not wait for the queued work."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers + Rust threads
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=identity_collate,
        persistent_workers=persistent,
        prefetch_factor=prefetch_factor,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(seed),
    )


def empty_batch(num_bad: int) -> dict[str, Any]:
    """A micro-batch with no usable sample that reports ``num_bad`` skipped ones (docs/method.md §4)."""
    return {"num_samples": 0, "num_bad": int(num_bad), "num_tokens": 0, "sample_ids": []}


class LoaderBase:
    """Bad-sample accounting shared by the loaders (docs/method.md §4): ``samples_seen`` /
    ``bad_seen`` counts and rate-limited logging of the ids and reasons (at most ``log_limit``
    warnings a minute). A loader never aborts on the bad fraction: the trainer decides on counts
    summed over ranks (``train.max_bad_fraction``). So that a rank whose data are (nearly) all bad
    still reports them, ``MAX_CARRIED_BAD`` bad samples in a row without a usable one are yielded
    as an :func:`empty_batch` (``num_samples == 0``); fewer ride with the next micro-batch."""

    def __init__(self, rank: int, world_size: int, log_limit: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.rank, self.world_size, self.log_limit = rank, world_size, log_limit
        self.samples_seen = self.bad_seen = 0
        self._log_window, self._log_count, self._suppressed = 0.0, 0, 0

    def _log_bad(self, bad: list[tuple[str, str, str]]) -> None:
        now = time.monotonic()
        if now - self._log_window > 60.0:
            if self._suppressed:
                log.warning(
                    "rank %d: %d more bad samples were skipped without a message", self.rank, self._suppressed
                )
            self._log_window, self._log_count, self._suppressed = now, 0, 0
        for sid, reason, detail in bad:
            if self._log_count < self.log_limit:
                log.warning("rank %d: skipping bad sample %s: %s (%s)", self.rank, sid, reason, detail)
                self._log_count += 1
            else:
                self._suppressed += 1

    def _account(self, batch: dict[str, Any], bad: list[tuple[str, str, str]]) -> dict[str, Any]:
        """Count a micro-batch about to be yielded and the bad samples reported with it."""
        self.bad_seen += len(bad)
        if bad:
            self._log_bad(bad)
        self.samples_seen += batch["num_samples"]
        return batch


class BatchLoader(LoaderBase):
    """This rank's collated micro-batches of a map-style source, forever, resumable (method.md §4, §6).

    Bad samples are dropped from their micro-batch and counted in its ``num_bad``; an all-bad
    micro-batch is skipped and its count carried into the next batch yielded, or yielded as an
    empty batch once ``MAX_CARRIED_BAD`` are carried (:class:`LoaderBase`). With
    ``num_workers > 0`` whole micro-batches are built in a persistent ``DataLoader`` (one iterator
    at a time).
    """

    def __init__(
        self,
        source: Any,
        builder: SampleBuilder,
        batcher: TokenBudgetBatcher,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        log_limit: int = 20,
    ) -> None:
        super().__init__(rank, world_size, log_limit)
        self.source, self.builder, self.batcher = source, builder, batcher
        self.num_workers = num_workers
        self.epoch, self.position = 0, 0  # global stream position after what the caller consumed
        self._dataset = _MicroBatchDataset(source, builder)
        self._sampler = _RankSampler(batcher, rank, world_size)
        self._loader: DataLoader | None = None
        if num_workers > 0:
            self._loader = worker_loader(
                self._dataset, num_workers, builder.seed, sampler=self._sampler,
                prefetch_factor=prefetch_factor, pin_memory=pin_memory,
            )  # fmt: skip

    def _raw(self) -> Iterator[tuple]:
        self._sampler.start = (self.epoch, self.position)
        if self._loader is not None:
            yield from self._loader
        else:
            for item in self._sampler:
                yield self._dataset[item]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        carried = 0
        for _, _, batch, bad, (next_epoch, next_position) in self._raw():
            self.epoch, self.position = next_epoch, next_position
            if batch is None:
                self.bad_seen += len(bad)
                if bad:
                    self._log_bad(bad)
                carried += len(bad)
                if carried >= MAX_CARRIED_BAD:  # report them: the trainer decides (docs/method.md §4)
                    yield empty_batch(carried)
                    carried = 0
                continue
            batch["num_bad"] += carried
            carried = 0
            yield self._account(batch, bad)

    def state_dict(self) -> dict[str, Any]:
        """The global stream position (micro-batches consumed over all ranks): it survives a change
        of world size when the new one divides the micro-batches consumed per step."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "samples_seen": self.samples_seen,
            "bad_seen": self.bad_seen,
            "seed": self.batcher.seed,
            "num_samples": self.batcher.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the next unseen micro-batch (call before iterating)."""
        self.batcher.load_state_dict(state)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.samples_seen, self.bad_seen = int(state.get("samples_seen", 0)), int(state.get("bad_seen", 0))
