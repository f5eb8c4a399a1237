"""Token-budget micro-batches, rank split and a resumable loader (SPEC §4, §6).

``TokenBudgetBatcher``: each epoch a seeded permutation of the records (a different one per epoch)
is cut greedily into micro-batches: a micro-batch takes the next sample unless that would exceed
the vision-token budget, the text-token budget or ``max_samples``. A sample over a budget on its
own is skipped (counted in ``oversize_skipped``) or, with ``oversize="truncate"``, put alone in a
micro-batch (the sample builder truncates its text). The sequence depends only on
``(lengths, budgets, seed, epoch)``, never on the number of ranks.

Rank split: a global step consumes ``world_size · grad_accum`` consecutive micro-batches; rank ``r``
takes micro-batches ``r, r + world_size, ...``. One process with ``grad_accum · world_size`` sees the
same micro-batches in the same order. A trailing remainder (fewer than ``world_size``) is dropped so
every rank has the same number per epoch.

``BatchLoader``: this rank's collated micro-batches, forever (epochs roll over). Its state counts
micro-batches *consumed by the caller* (not prefetched by workers), so resuming is exact.
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

from cmpt.data.config import DataConfig
from cmpt.data.pipeline import LengthIndex, SampleBuilder, collate
from cmpt.data.sources import BadSample, LlavaSource

__all__ = ["BatchLoader", "TokenBudgetBatcher", "TooManyBadSamples", "build_loader"]

log = logging.getLogger("cmpt.data")


class TokenBudgetBatcher:
    """Deterministic, stateful token-budget micro-batcher (SPEC §4); see the module docstring.

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

    def micro_batches_for_rank(self, rank: int, world_size: int, epoch: int | None = None) -> list[list[int]]:
        """Rank ``rank``'s micro-batches of ``epoch`` (default: the current one): ``r, r + world, ...``;
        the trailing ``len % world_size`` micro-batches are dropped."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        batches = self.epoch_batches(self.epoch if epoch is None else epoch)
        usable = len(batches) // world_size * world_size
        return batches[rank:usable:world_size]

    def iter_rank(
        self, rank: int, world_size: int, epoch: int, start: int
    ) -> Iterator[tuple[int, int, list[int]]]:
        """``(epoch, k, micro_batch)`` for this rank from its ``k = start`` of ``epoch`` on, forever."""
        while True:
            mine = self.micro_batches_for_rank(rank, world_size, epoch)
            if not mine:
                raise ValueError(
                    f"epoch {epoch} has fewer micro-batches than world_size={world_size} "
                    f"({self.num_samples} records, {self.oversize_skipped} oversize): "
                    "use more data or smaller budgets"
                )
            for k in range(start, len(mine)):
                yield epoch, k, mine[k]
            epoch, start = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        """Single-process iteration from the current state, forever; the state follows what is yielded."""
        for epoch, k, batch in self.iter_rank(0, 1, self.epoch, self.position):
            self.epoch, self.position = epoch, k + 1
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


class TooManyBadSamples(RuntimeError):
    """More than ``max_bad_fraction`` of the samples seen were bad (SPEC §4)."""


class _MicroBatchDataset(Dataset):
    """Map-style dataset whose index is a whole micro-batch ``(epoch, k, record indices)``."""

    def __init__(self, source: Any, builder: SampleBuilder, pad_id: int) -> None:
        self.source, self.builder, self.pad_id = source, builder, pad_id

    def __getitem__(self, item: tuple[int, int, list[int]]) -> tuple[int, int, dict | None, list]:
        epoch, k, indices = item
        samples, bad = [], []
        for i in indices:
            try:
                samples.append(self.builder.build(self.source[i], epoch))
            except BadSample as e:
                bad.append((e.id, e.reason, e.detail))
        return epoch, k, (collate(samples, self.pad_id, num_bad=len(bad)) if samples else None), bad


class _RankSampler(Sampler):
    def __init__(self, batcher: TokenBudgetBatcher, rank: int, world_size: int) -> None:
        self.batcher, self.rank, self.world_size = batcher, rank, world_size
        self.start = (0, 0)

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        return self.batcher.iter_rank(self.rank, self.world_size, *self.start)


def _identity(x: Any) -> Any:
    return x


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, set by the DataLoader
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)


class BatchLoader:
    """This rank's collated micro-batches, forever, resumable exactly (SPEC §4, §6).

    Bad samples are dropped from their micro-batch and counted in its ``num_bad``; an all-bad
    micro-batch is skipped and its count carried into the next batch yielded. Ids and reasons are
    logged (at most ``log_limit`` warnings a minute). Above ``max_bad_fraction`` of bad samples
    among those seen (checked once 200 samples were seen, and at every epoch end)
    ``TooManyBadSamples`` is raised; ``None`` disables the check. With ``num_workers > 0`` whole
    micro-batches are built in a persistent ``DataLoader`` (one iterator at a time).
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
        pad_id: int = 0,
        max_bad_fraction: float | None = 0.01,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        log_limit: int = 20,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.source, self.builder, self.batcher = source, builder, batcher
        self.rank, self.world_size, self.num_workers, self.pad_id = rank, world_size, num_workers, pad_id
        self.max_bad_fraction, self.log_limit = max_bad_fraction, log_limit
        self.epoch, self.position = 0, 0  # position: this rank's micro-batches of `epoch` consumed
        self.samples_seen = self.bad_seen = 0
        self._dataset = _MicroBatchDataset(source, builder, pad_id)
        self._sampler = _RankSampler(batcher, rank, world_size)
        self._log_window, self._log_count, self._suppressed = 0.0, 0, 0
        self._loader: DataLoader | None = None
        if num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers + Rust threads
            self._loader = DataLoader(
                self._dataset,
                batch_size=None,
                sampler=self._sampler,
                num_workers=num_workers,
                collate_fn=_identity,
                persistent_workers=True,
                prefetch_factor=prefetch_factor,
                pin_memory=pin_memory,
                worker_init_fn=_worker_init,
                generator=torch.Generator().manual_seed(builder.seed),
            )

    def _raw(self) -> Iterator[tuple[int, int, dict | None, list]]:
        self._sampler.start = (self.epoch, self.position)
        if self._loader is not None:
            yield from self._loader
        else:
            for item in self._sampler:
                yield self._dataset[item]

    def _log_bad(self, bad: list[tuple[str, str, str]]) -> None:
        now = time.monotonic()
        if now - self._log_window > 60.0:
            if self._suppressed:
                log.warning("%d more bad samples were skipped without a message", self._suppressed)
            self._log_window, self._log_count, self._suppressed = now, 0, 0
        for sid, reason, detail in bad:
            if self._log_count < self.log_limit:
                log.warning("skipping bad sample %s: %s (%s)", sid, reason, detail)
                self._log_count += 1
            else:
                self._suppressed += 1

    def _check_bad_fraction(self, final: bool) -> None:
        total = self.samples_seen + self.bad_seen
        if self.max_bad_fraction is None or total == 0 or (total < 200 and not final):
            return
        if self.bad_seen / total > self.max_bad_fraction:
            raise TooManyBadSamples(
                f"{self.bad_seen} of {total} samples seen on rank {self.rank} were bad "
                f"(> max_bad_fraction={self.max_bad_fraction}); run `cmpt data check` on the data"
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        carried = 0
        for epoch, k, batch, bad in self._raw():
            if epoch != self.epoch:
                self._check_bad_fraction(final=True)
            self.epoch, self.position = epoch, k + 1
            self.bad_seen += len(bad)
            if bad:
                self._log_bad(bad)
            if batch is None:
                carried += len(bad)
                continue
            batch["num_bad"] += carried
            carried = 0
            self.samples_seen += batch["num_samples"]
            self._check_bad_fraction(final=False)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``position`` is global (micro-batches consumed over all ranks), so it survives a change of
        world size when divisible by the new one."""
        return {
            "epoch": self.epoch,
            "position": self.position * self.world_size,
            "world_size": self.world_size,
            "samples_seen": self.samples_seen,
            "bad_seen": self.bad_seen,
            "seed": self.batcher.seed,
            "num_samples": self.batcher.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with the next unseen micro-batch (call before iterating)."""
        self.batcher.load_state_dict({**state, "position": 0})
        pos = int(state["position"])
        if pos % self.world_size:
            log.warning("resume position %d is not a multiple of world_size=%d", pos, self.world_size)
        self.epoch, self.position = int(state["epoch"]), pos // self.world_size
        self.batcher.epoch, self.batcher.position = self.epoch, self.position * self.world_size
        self.samples_seen, self.bad_seen = int(state.get("samples_seen", 0)), int(state.get("bad_seen", 0))


def build_loader(
    cfg: DataConfig,
    processor: Any,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> BatchLoader:
    """Source → length index → batcher → builder → loader, as configured (SPEC §4).

    ``tokenizer`` must already have the vision tokens (``ensure_vision_tokens``, then resize the
    LLM's embeddings). With ``oversize="truncate"`` the text estimates are capped at
    ``max_text_tokens`` (the builder truncates to it), so long samples still pack with others;
    with ``"skip"`` a sample over a budget on its own is skipped (``loader.batcher.oversize_skipped``).
    """
    source = LlavaSource(cfg.path, cfg.image_root or None)
    lengths = LengthIndex.build(source, processor, tokenizer, cache_dir=cache_dir).lengths
    if cfg.oversize == "truncate":
        lengths = [(v, min(t, cfg.max_text_tokens)) for v, t in lengths]
    batcher = TokenBudgetBatcher(
        lengths,
        cfg.vision_budget,
        cfg.text_budget,
        cfg.max_samples_per_batch,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        oversize=cfg.oversize,
    )
    if batcher.oversize_skipped:
        log.warning(
            "%s: %d sample(s) over a budget on their own are skipped", cfg.path, batcher.oversize_skipped
        )
    builder = SampleBuilder(
        processor,
        tokenizer,
        max_text_tokens=cfg.max_text_tokens,
        caption_max_tokens=cfg.caption_max_tokens,
        shuffle_caption=cfg.shuffle_caption,
        seed=cfg.seed,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return BatchLoader(
        source,
        builder,
        batcher,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        pad_id=pad_id,
        max_bad_fraction=cfg.max_bad_fraction,
    )
