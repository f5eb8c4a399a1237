"""Pair sources and the resumable, task-homogeneous pair loader of MoCa stage 2 (docs/method.md §3, §4).

**Sources.** Pair records (:mod:`cmpt.data.pairs`) come from any source of
:func:`cmpt.data.open.open_source` — LLaVA-style JSON/JSONL files, Hugging Face datasets (a split
as ``PATH#SPLIT``, or ``split:`` in a mixture), mixtures — and from tar shards, read here as a
:class:`~cmpt.data.tar_index.TarIndexSource` (map-style: the task sampler needs every record's task
up front; sample offsets cached by content, as in mixtures). A record without a ``task`` (or whose
JSON cannot be read) belongs to its source's default task: the file or dataset name without
extension (``caption2image.jsonl`` → ``caption2image``), for tar shards the name of each shard's
directory; in a mixture, each member's own.

**Loader.** :class:`PairLoader` yields this rank's collated batches (:func:`~cmpt.data.pairs.collate_pairs`)
of the :class:`~cmpt.data.task_sampler.TaskBatchSampler`'s global batches, forever, one per global
batch on every rank (lockstep: every batch carries ``epoch`` and ``batch_index``). **Bad pairs** are
skipped, counted in ``num_bad`` and logged with their id and reason (:class:`cmpt.data.batching.LoaderBase`);
to keep the batch at ``B`` pairs each one is replaced by the next good *spare* of the same task
(:meth:`~cmpt.data.task_sampler.TaskBatchSampler.spares`: records outside the global batch, disjoint
across ranks, up to ``max_spares`` tried; bad spares are counted too). **When a batch loses pairs**
— the spares run out or are bad (a task with at most one global batch of records, or a broken
task) — its good pairs are repeated up to ``B`` (every rank keeps the shape the cross-rank gather
needs): ``num_pairs == B``, ``num_samples`` = the real pairs, ``pair_mask`` False on the copies
(an objective that honours it drops their rows and columns; one that does not sees a duplicate).
When nothing of it is usable, an empty batch (``num_samples == num_pairs == 0``, only ``num_bad``)
is yielded in its place so the ranks stay on the same global batch (``lockstep``: the trainer then
drops that global batch on every rank, :mod:`cmpt.train.bad_data`). The state counts global
batches consumed by the caller (not prefetched by workers), so resuming continues with the next
unseen one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler

from cmpt.data.batching import LoaderBase, worker_loader
from cmpt.data.config import DataConfig
from cmpt.data.documents import check_data_kind
from cmpt.data.hf_source import HFSource
from cmpt.data.mixture import MixtureSource, map_style
from cmpt.data.open import iter_records, open_source
from cmpt.data.pairs import PairBuilder, collate_pairs
from cmpt.data.sources import BadSample, set_follow_symlinks
from cmpt.data.tar_index import TarIndexSource
from cmpt.data.task_sampler import TaskBatchSampler

__all__ = ["PairLoader", "TarPairSource", "build_pair_loader", "open_pair_source", "record_tasks"]

log = logging.getLogger("cmpt.data")


def _stem(path: str) -> str:
    name = os.path.basename(os.fspath(path).rstrip(os.sep))
    for ext in (".jsonl", ".json", ".parquet", ".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


#: The map-style view of tar shards the pair loader reads (the name it had before it became
#: :class:`~cmpt.data.tar_index.TarIndexSource`, the one implementation).
TarPairSource = TarIndexSource


def open_pair_source(
    path: str | os.PathLike | list, image_root: str | os.PathLike | None = None, *, split: str | None = None
) -> Any:
    """A map-style source of pair records: :func:`~cmpt.data.open.open_source` (``split`` and
    ``PATH#SPLIT`` as there: a Hugging Face dataset's split), with tar shards (or an all-tar
    mixture, its ids kept) opened as a :class:`~cmpt.data.tar_index.TarIndexSource` (offsets cached
    by content; :func:`cmpt.data.mixture.map_style`)."""
    return map_style(open_source(path, image_root, split=split))


def _valid(task: Any) -> bool:
    return isinstance(task, str) and bool(task.strip())


def record_tasks(source: Any) -> list[str]:
    """The task of every record of a map-style source (see the module docstring for the default)."""
    if isinstance(source, MixtureSource):
        per_member = [record_tasks(s) for s in source.sources]
        return [per_member[k][j] for k, j in zip(source.member.tolist(), source.record_index.tolist())]
    if isinstance(source, TarIndexSource):  # each shard's directory (or file) name
        paths = source.shards.paths
        names = [os.path.basename(os.path.dirname(p)) or _stem(p) for p in paths]
        defaults = [names[source.shard_of(i)] for i in range(len(source))]
    else:
        name = getattr(source, "path", "") or getattr(source, "name", "") or "pairs"
        defaults = [_stem(name)] * len(source)
    if isinstance(source, HFSource):  # the task column alone, no row decoded
        values = source.column("task") or [None] * len(source)
    else:
        values = [None if isinstance(r, BadSample) else r.meta.get("task") for r in iter_records(source)]
    return [t if _valid(t) else d for t, d in zip(values, defaults)]


class _PairBatches(Dataset):
    """Map-style dataset whose index is one global batch ``(epoch, k, task, indices, next)``."""

    def __init__(self, source: Any, builder: PairBuilder, sampler: TaskBatchSampler, max_spares: int) -> None:
        self.source, self.builder, self.sampler, self.max_spares = source, builder, sampler, max_spares

    def _build(self, i: int, epoch: int, task: str, bad: list) -> Any:
        try:
            sample = self.builder.build(self.source[i], epoch)
        except BadSample as e:
            bad.append((e.id, e.reason, e.detail))
            return None
        sample.task = task
        return sample

    def __getitem__(self, item: tuple) -> tuple:
        epoch, k, task, indices, nxt = item
        bad: list[tuple[str, str, str]] = []
        good = [s for i in indices if (s := self._build(i, epoch, task, bad)) is not None]
        if len(good) < len(indices):
            for i in self.sampler.spares(epoch, k, limit=self.max_spares):
                s = self._build(i, epoch, task, bad)
                if s is not None:
                    good.append(s)
                    if len(good) == len(indices):
                        break
        batch = collate_pairs(good, num_bad=len(bad), pad_to=len(indices)) if good else None
        return epoch, k, task, batch, bad, nxt


class _Stream(Sampler):
    def __init__(self, sampler: TaskBatchSampler) -> None:
        self.sampler, self.start = sampler, (0, 0)

    def __iter__(self) -> Iterator[tuple]:
        return self.sampler.iter_from(*self.start)


class PairLoader(LoaderBase):
    """This rank's collated pair batches, forever, resumable (docs/method.md §3, §4); see the module
    docstring for bad pairs. ``num_workers > 0`` builds whole batches in a persistent ``DataLoader``."""

    lockstep = True  # the ranks' i-th batches are the slices of one global batch

    def __init__(
        self,
        source: Any,
        builder: PairBuilder,
        sampler: TaskBatchSampler,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        log_limit: int = 20,
        max_spares: int = 64,
    ) -> None:
        super().__init__(sampler.rank, sampler.world_size, log_limit)
        self.source, self.builder, self.sampler = source, builder, sampler
        self.epoch, self.position = sampler.epoch, sampler.position
        self._dataset = _PairBatches(source, builder, sampler, max_spares)
        self._stream = _Stream(sampler)
        self._warned_tasks: set[str | None] = set()
        self._loader: DataLoader | None = None
        if num_workers > 0:
            self._loader = worker_loader(
                self._dataset, num_workers, sampler.seed, sampler=self._stream,
                prefetch_factor=prefetch_factor, pin_memory=pin_memory,
            )  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._stream.start = (self.epoch, self.position)
        items = self._loader if self._loader is not None else map(self._dataset.__getitem__, self._stream)
        for epoch, k, task, batch, bad, (next_epoch, next_position) in items:
            self.epoch, self.position = next_epoch, next_position
            self.sampler.epoch, self.sampler.position = next_epoch, next_position
            if batch is None:  # nothing usable: an empty batch keeps the ranks in step
                batch = {"num_samples": 0, "num_pairs": 0, "num_bad": len(bad), "num_tokens": 0}
                batch.update(sample_ids=[], task=task)
            batch["epoch"], batch["batch_index"] = epoch, k
            self._note_missing_negatives(batch)
            yield self._account(batch, bad)

    def _note_missing_negatives(self, batch: dict[str, Any]) -> None:
        """Warn once per task whose pairs come without hard negatives although the loss expects
        ``k`` of them: they train on in-batch negatives only (docs/method.md §3 "Stage 2")."""
        mask = batch.get("neg_mask")
        task = batch.get("task")
        if mask is None or mask.numel() == 0 or bool(mask.any()) or task in self._warned_tasks:
            return
        self._warned_tasks.add(task)
        log.warning(
            "rank %d: task %r: no pair of global batch %d has a hard negative although "
            "loss.num_hard_negatives = %d; its pairs train on in-batch negatives only (give them "
            "'neg_text' / 'neg_image_path', or set loss.num_hard_negatives=0)",
            self.rank, task, batch["batch_index"], mask.shape[1],
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.sampler.fingerprint(),
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "samples_seen": self.samples_seen,
            "bad_seen": self.bad_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the next unseen global batch (call before iterating)."""
        self.sampler.load_state_dict(state)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.samples_seen, self.bad_seen = int(state.get("samples_seen", 0)), int(state.get("bad_seen", 0))


def build_pair_loader(
    cfg: DataConfig,
    processor: Any,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int,
    num_hard_negatives: int = 2,
    task_weights: dict[str, float] | None = None,
    max_text_tokens: int | None = None,
) -> PairLoader:
    """Source → tasks → :class:`~cmpt.data.task_sampler.TaskBatchSampler` →
    :class:`~cmpt.data.pairs.PairBuilder` → :class:`PairLoader` (docs/method.md §3, §4).

    ``cfg.path``: pair records from JSON/JSONL, tar shards, a Hugging Face dataset or a mixture;
    ``cfg.image_root``, ``cfg.seed`` and ``cfg.num_workers`` as for the other loaders.
    ``batch_size``: pairs per rank (``B``); the global batch is ``world_size · B``, all of one task.
    ``max_text_tokens``: per input (default ``cfg.max_text_tokens``; the release uses 1280).
    ``tokenizer`` must already hold the vision tokens. Data whose first records are all MoCa
    documents (stage ``cpt``'s) are refused up front in one line
    (:func:`~cmpt.data.documents.check_data_kind`), before any task is read.
    """
    set_follow_symlinks(cfg.follow_symlinks)
    source = open_pair_source(cfg.path, cfg.image_root or None)
    check_data_kind(source, "pairs", cfg.path)
    sampler = TaskBatchSampler(
        record_tasks(source), batch_size, world_size, weights=task_weights, seed=cfg.seed, rank=rank
    )
    builder = PairBuilder(
        processor,
        tokenizer,
        max_text_tokens=cfg.max_text_tokens if max_text_tokens is None else max_text_tokens,
        num_hard_negatives=num_hard_negatives,
    )
    return PairLoader(source, builder, sampler, num_workers=cfg.num_workers)
