"""A tiny deterministic Task for the trainer tests (the trainer never knows which recipe it runs).

Model: a frozen token embedding + a learned ``pos_embed`` row, two residual MLP blocks (the FSDP
units), a regression head. Data: an endless stream of micro-batches ``m0, m1, ...`` of variable
size (1-4 samples), each generated from ``(seed, index)`` alone; rank ``r`` of ``W`` gets
``m(r), m(r+W), m(r+2W), ...`` so that one process with ``grad_accum = W·A`` sees exactly the
micro-batches of ``W`` ranks with ``grad_accum = A``. Every sample has a token-like ``count``
(1-5) that weights its squared error, so per-rank averaging would differ from the global
normalization (docs/method.md §6); an ``aux`` term only exists for flagged samples (count 0 in some
micro-batches).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import torch
from torch import nn

from cmpt.train import LossTerms

DIM, VOCAB, SEQ = 16, 32, 3


class Block(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.tanh(self.fc1(self.norm(x)))))


class ToyModel(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.embed.requires_grad_(False)  # frozen part
        self.pos_embed = nn.Parameter(torch.zeros(1, DIM))
        self.proj = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList([Block(DIM, dropout), Block(DIM, dropout)])
        self.head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.embed(tok).mean(1) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


def make_micro_batch(seed: int, index: int, nan: bool = False, bad: int = 0) -> dict:
    """Global micro-batch ``index`` of the stream (pure function of ``seed`` and ``index``)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    teacher = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, 2, generator=teacher) / DIM**0.5
    n = int(torch.randint(1, 5, (), generator=g))
    x = torch.randn(n, DIM, generator=g)
    tok = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(n, 2, generator=g)
    if nan:
        y[0, 0] = float("nan")
    count = torch.randint(1, 6, (n,), generator=g)
    flag = torch.rand(n, generator=g) < 0.4
    return {
        "x": x,
        "tok": tok,
        "y": y,
        "count": count,
        "flag": flag,
        "num_samples": n,
        "num_bad": bad,
        "num_tokens": int(count.sum()),
    }


class ToyLoader:
    """Rank ``rank``'s share of the stream; state = index of its next local micro-batch.

    ``nan_at``: global micro-batch indices whose target holds a NaN. ``bad_every``: every k-th
    global micro-batch reports one skipped bad sample. ``signal_at``: a global micro-batch index at
    which a helper thread sends SIGTERM to this process (then the loader waits for it).
    """

    def __init__(
        self,
        seed: int,
        rank: int,
        world_size: int,
        nan_at: frozenset[int] = frozenset(),
        bad_every: int = 0,
        signal_at: int | None = None,
    ) -> None:
        self.seed, self.rank, self.world = seed, rank, world_size
        self.nan_at, self.bad_every, self.signal_at = nan_at, bad_every, signal_at
        self.next_local = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            index = self.rank + self.world * self.next_local
            self.next_local += 1
            if index == self.signal_at:
                t = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
                t.start()
                t.join()
            bad = int(self.bad_every > 0 and index % self.bad_every == 0)
            yield make_micro_batch(self.seed, index, nan=index in self.nan_at, bad=bad)

    def state_dict(self) -> dict:
        return {"next_local": self.next_local, "rank": self.rank, "world": self.world}

    def load_state_dict(self, d: dict) -> None:
        assert (d["rank"], d["world"]) == (self.rank, self.world)
        self.next_local = int(d["next_local"])


class ToyTask:
    """The Task contract of :mod:`cmpt.train` on :class:`ToyModel` (terms ``mse`` and ``aux``)."""

    def __init__(
        self,
        seed: int = 0,
        lr: float = 3e-3,
        dropout: float = 0.0,
        nan_at: frozenset[int] = frozenset(),
        bad_every: int = 0,
        signal_at: int | None = None,
    ) -> None:
        torch.manual_seed(seed)  # identical initialisation on every rank
        self.model = ToyModel(dropout)
        self.seed, self.lr = seed, lr
        self.loader_kw = {"nan_at": frozenset(nan_at), "bad_every": bad_every, "signal_at": signal_at}

    def param_groups(self) -> list[dict]:
        m = self.model
        body = [m.pos_embed, *m.proj.parameters(), *m.blocks.parameters()]
        return [
            {"name": "body", "params": body, "lr": self.lr},
            {"name": "head", "params": list(m.head.parameters()), "lr": 2 * self.lr},
        ]

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def build_loader(self, rank: int, world_size: int) -> ToyLoader:
        return ToyLoader(self.seed, rank, world_size, **self.loader_kw)

    def compute_loss(self, model: nn.Module, batch: dict) -> LossTerms:
        pred = model(batch["x"], batch["tok"])
        err = (pred - batch["y"]).pow(2).sum(-1)
        mse = (err * batch["count"]).sum()
        flag = batch["flag"]
        aux = (pred[:, 1] - batch["y"][:, 1]).abs()[flag].sum() + 0.0 * pred.sum()
        return LossTerms(
            sums={"mse": mse, "aux": aux},
            counts={"mse": int(batch["count"].sum()), "aux": int(flag.sum())},
            weights={"mse": 1.0, "aux": 0.5},
            metrics={"pred_mean": float(pred.detach().mean())},
        )


class ToyTaskPrecount(ToyTask):
    """Same task with ``loss_counts``: the trainer streams forward → backward per micro-batch."""

    def loss_counts(self, batch: dict) -> dict[str, int]:
        return {"mse": int(batch["count"].sum()), "aux": int(batch["flag"].sum())}
