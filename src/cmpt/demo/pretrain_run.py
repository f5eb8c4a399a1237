"""A demo pretraining task run through cmpt's own :class:`~cmpt.train.Trainer` (docs/method.md §6).

:class:`ShuffledBatches` is the loader of both tasks (:mod:`cmpt.demo.vit_pretrain`,
:mod:`cmpt.demo.lm_pretrain`): a fixed in-memory dataset, shuffled per epoch, split over ranks,
resumable. :func:`train_into` runs a task in ``<part>/pretrain/`` (``config.yaml``,
``metrics.jsonl``) — the trainer owns the optimizer, the schedule (linear warmup over 10 % of the
steps, then cosine down to 10 % of the peak), clipping, the loss normalization and the logs — and
moves the task's final output (``save_final``: a Hugging Face directory) into ``<part>/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..train import OptimConfig, RunConfig, TrainConfig, Trainer

__all__ = ["RUN_DIR", "ShuffledBatches", "train_into"]

RUN_DIR = "pretrain"  # the trainer's run directory inside a built part


class ShuffledBatches:
    """Endless batches of a fixed dataset of ``n`` items: a fresh permutation per epoch (seeded by
    ``(seed, epoch)``), cut into ``batch_size`` slices that run across epoch boundaries. Rank ``r`` of
    ``W`` gets global batches ``r, r + W, ...``; ``make_batch(indices, batch_index)`` builds each.
    The state is the number of batches this rank has yielded."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        make_batch: Callable[[list[int], int], dict],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.make_batch = n, batch_size, make_batch
        self.seed, self.rank, self.world = seed, rank, world_size
        self.next_local = 0
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1]

    def indices(self, batch_index: int) -> list[int]:
        """Dataset indices of global batch ``batch_index``."""
        out: list[int] = []
        pos = batch_index * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos + len(out), self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out += self._permutation(epoch)[offset : offset + take]
        return out

    def __iter__(self) -> Iterator[dict]:
        while True:
            index = self.rank + self.world * self.next_local
            self.next_local += 1
            yield self.make_batch(self.indices(index), index)

    def state_dict(self) -> dict:
        return {"next_local": self.next_local, "rank": self.rank, "world": self.world}

    def load_state_dict(self, d: dict) -> None:
        if (d["rank"], d["world"]) != (self.rank, self.world):
            raise ValueError(f"loader state of rank {d['rank']}/{d['world']}, not {self.rank}/{self.world}")
        self.next_local = int(d["next_local"])


def train_into(
    task: Any, out: Path, *, steps: int, lr: float, weight_decay: float, seed: int, name: str
) -> dict[str, Any]:
    """Train ``task`` with the :class:`~cmpt.train.Trainer` (AdamW, 10 % warmup then cosine down to 10 % of
    ``lr``, clipping at 1, fp32, no progress bar or TensorBoard) in ``out/pretrain/``; move its
    ``final/`` into ``out``.

    The checkpoint is removed afterwards: a part is built in a temporary directory and never resumed.
    Returns the trainer's summary.
    """
    run_dir = out / RUN_DIR
    run = RunConfig(dir=str(run_dir), seed=seed, name=name)
    optim = OptimConfig(
        lr=lr, weight_decay=weight_decay, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1, clip_grad=1.0
    )
    train = TrainConfig(
        steps=steps,
        log_every=max(1, steps // 10),
        keep_last=1,
        precision="fp32",
        tensorboard=False,
        progress=False,
    )
    summary = Trainer(run, optim, train, task).fit()
    final = Path(summary["final"])
    for item in final.iterdir():
        os.replace(item, out / item.name)
    final.rmdir()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print(f"  {name}: {summary['step']} steps with cmpt.train.Trainer, last loss {summary['loss']:.3f}")
    return summary
