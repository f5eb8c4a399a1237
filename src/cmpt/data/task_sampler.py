"""Task-homogeneous, resumable batches of contrastive pairs (docs/method.md §3, §4).

:class:`TaskBatchSampler`: every **global** batch (``world_size × batch_size_per_rank`` pairs) comes
from one task, so in-batch negatives are meaningful (MoCa stage 2, as VLM2Vec v2 enforces it).

* **Passes over a task.** Pass ``r`` of task ``t`` is a permutation of its records seeded by
  ``(seed, r, t)``, cut into global batches of ``G = world_size · batch_size_per_rank`` records; with
  ``drop_last`` the remainder (fewer than ``G``) is left out of that pass, otherwise the last batch
  is completed with the first records of the same permutation. A task with fewer than ``G`` records
  has no batch with ``drop_last`` (a warning names it).
* **Epochs.** An epoch holds ``N = Σ_t n_t`` global batches (``n_t``: batches of one pass of
  ``t``). Task ``t`` gets ``c_t`` of them: ``c_t = n_t`` by default (each task exactly once per
  epoch, pass ``r`` = epoch ``r``), or ``N · w_t / Σ w`` rounded by largest remainder for explicit
  ``weights`` — a task then runs through its passes at its own rate (``c_t > n_t``: records repeat
  within an epoch, reshuffled per pass; ``c_t < n_t``: its pass continues into the next epoch). The
  order of the ``N`` slots is a permutation of that multiset seeded by ``(seed, epoch)``, so the
  share of task ``t`` is exactly ``c_t / N`` per epoch, in any window in expectation.
* **Ranks.** Rank ``r`` takes records ``[r·B, (r+1)·B)`` of every global batch; ranks are disjoint.
* **State.** ``{"epoch", "position"}``: global batches consumed in the epoch (the same on every
  rank). Resuming yields the next unseen global batch; the stream depends on ``G``, the seed, the
  weights and the tasks, not on how ``G`` splits into ranks.
* **Spares.** :meth:`TaskBatchSampler.spares` lists, per rank, records of the batch's task outside
  that global batch (disjoint across ranks): what :class:`cmpt.data.pair_loader.PairLoader` uses
  to replace bad pairs and keep every batch at ``B`` pairs.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["TaskBatchSampler"]

log = logging.getLogger("cmpt.data")


def _task_key(task: str) -> int:
    return zlib.crc32(task.encode("utf-8"))


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


class TaskBatchSampler:
    """Global batches of one task each, split by rank; see the module docstring (docs/method.md §3).

    ``tasks[i]``: the task of record ``i``. Iterating yields this rank's ``B`` record indices per
    global batch, forever (epochs roll over), and advances the state.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        batch_size_per_rank: int,
        world_size: int = 1,
        *,
        weights: dict[str, float] | None = None,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
    ) -> None:
        if batch_size_per_rank < 1 or world_size < 1:
            raise ValueError(
                f"need batch_size_per_rank >= 1 and world_size >= 1, got {batch_size_per_rank}, {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size, self.world_size, self.rank = int(batch_size_per_rank), int(world_size), int(rank)
        self.global_batch_size = self.batch_size * self.world_size
        self.seed, self.drop_last = int(seed), bool(drop_last)
        self.num_records = len(tasks)
        by_task: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            by_task.setdefault(str(t), []).append(i)
        g = self.global_batch_size
        self.records = {t: np.asarray(ix, dtype=np.int64) for t, ix in sorted(by_task.items())}
        per_pass = {t: (len(ix) // g if drop_last else -(-len(ix) // g)) for t, ix in self.records.items()}
        small = sorted(t for t, n in per_pass.items() if n == 0)
        if small:
            log.warning("task(s) %s have fewer records than one global batch of %d: never sampled", small, g)
        self.tasks = [t for t in self.records if per_pass[t] > 0]
        if not self.tasks:
            raise ValueError(
                f"no task has a full global batch of {g} pairs ({world_size} rank(s) × "
                f"{batch_size_per_rank}); "
                f"records per task: { {t: len(ix) for t, ix in self.records.items()} }"
            )
        self.per_pass = {t: per_pass[t] for t in self.tasks}
        total = sum(self.per_pass.values())
        if weights is None:
            self.weights = {t: float(self.per_pass[t]) for t in self.tasks}
            counts = [self.per_pass[t] for t in self.tasks]
        else:
            unknown = sorted(set(weights) - set(self.records))
            missing = sorted(set(self.tasks) - set(weights))
            if unknown or missing:
                raise ValueError(
                    f"task weights: unknown task(s) {unknown}, missing task(s) {missing}; the data has "
                    f"{sorted(self.records)}"
                )
            w = [float(weights[t]) for t in self.tasks]
            if any(x < 0 or not np.isfinite(x) for x in w) or sum(w) <= 0:
                raise ValueError(f"task weights must be finite, >= 0 and not all 0, got {weights}")
            self.weights = dict(zip(self.tasks, w))
            counts = _largest_remainder(total, w)
        self.per_epoch = dict(zip(self.tasks, counts))
        self.tasks = [t for t in self.tasks if self.per_epoch[t] > 0]
        self._slots = np.repeat(np.arange(len(self.tasks)), [self.per_epoch[t] for t in self.tasks])
        self._cache: dict[Any, np.ndarray] = {}
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Global batches per epoch."""
        return len(self._slots)

    # -- the global stream -------------------------------------------------------------------------
    def _perm(self, task: str, round_: int) -> np.ndarray:
        key = (task, round_)
        if key not in self._cache:
            if len(self._cache) > 4 * len(self.tasks) + 8:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, round_, _task_key(task)])
            self._cache[key] = self.records[task][rng.permutation(len(self.records[task]))]
        return self._cache[key]

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Task number of each slot of ``epoch`` and its occurrence number within the epoch."""
        key = ("order", epoch)
        if key not in self._cache:
            order = np.random.default_rng([self.seed, epoch, 0x7A5C]).permutation(self._slots)
            occ = np.zeros(len(order), dtype=np.int64)
            for t in range(len(self.tasks)):
                where = np.nonzero(order == t)[0]
                occ[where] = np.arange(len(where))
            self._cache[key] = (order, occ)
        return self._cache[key]

    def epoch_order(self, epoch: int) -> list[str]:
        """The task of each global batch of ``epoch``, in order."""
        return [self.tasks[i] for i in self._order(epoch)[0].tolist()]

    def global_batch(self, epoch: int, k: int) -> tuple[str, np.ndarray]:
        """``(task, G record indices)`` of global batch ``k`` of ``epoch``."""
        order, occ = self._order(epoch)
        task = self.tasks[int(order[k])]
        pos = epoch * self.per_epoch[task] + int(occ[k])  # batches of the task consumed before this one
        round_, b = divmod(pos, self.per_pass[task])
        perm, g = self._perm(task, round_), self.global_batch_size
        idx = perm[b * g : (b + 1) * g]
        if len(idx) < g:  # drop_last=False: complete the last batch from the start of the pass
            idx = np.concatenate([idx, np.resize(perm, g - len(idx))])
        return task, idx

    def rank_slice(self, batch: np.ndarray, rank: int | None = None) -> list[int]:
        r = self.rank if rank is None else rank
        return batch[r * self.batch_size : (r + 1) * self.batch_size].tolist()

    def spares(self, epoch: int, k: int, rank: int | None = None, limit: int = 64) -> list[int]:
        """Up to ``limit`` records of batch ``(epoch, k)``'s task outside that global batch, for this
        rank (rank ``r`` gets positions ``r, r + W, ...`` of a permutation seeded by
        ``(seed, epoch, k)``: disjoint across ranks), in the order to try them."""
        r = self.rank if rank is None else rank
        task, batch = self.global_batch(epoch, k)
        rng = np.random.default_rng([self.seed, epoch, k, 0x5BA2E])
        rest = np.setdiff1d(self.records[task], batch)
        rest = rest[rng.permutation(len(rest))]
        return rest[r :: self.world_size][:limit].tolist()

    def iter_from(
        self, epoch: int, position: int
    ) -> Iterator[tuple[int, int, str, list[int], tuple[int, int]]]:
        """``(epoch, k, task, this rank's indices, next state)`` from ``(epoch, position)`` on, forever."""
        while True:
            for k in range(position, len(self)):
                task, batch = self.global_batch(epoch, k)
                nxt = (epoch, k + 1) if k + 1 < len(self) else (epoch + 1, 0)
                yield epoch, k, task, self.rank_slice(batch), nxt
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, _, idx, (epoch, position) in self.iter_from(self.epoch, self.position):
            self.epoch, self.position = epoch, position
            yield idx

    # -- state ---------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What the stream depends on (checked on resume)."""
        return {
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_records": self.num_records,
            "drop_last": self.drop_last,
            "tasks": {t: len(self.records[t]) for t in self.records},
            "per_epoch": dict(self.per_epoch),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next unseen global batch; refuses a state made from other data, seed,
        global batch size or weights."""
        mine = self.fingerprint()
        diff = [k for k in mine if k in state and state[k] != mine[k]]
        if diff:
            raise ValueError(
                "task sampler state from a different stream: "
                + ", ".join(f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in diff)
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
