"""One optimizer step with globally normalized losses (docs/method.md §6 "Loss normalization").

Before any backward, the counts of each loss term are summed over the step's micro-batches and over
ranks; each micro-batch then backpropagates ``Σ_term weight · sum · world_size / global_count``
(``world_size`` undoes the gradient averaging of DDP/FSDP), so N ranks × B samples equal one rank ×
N·B; a term with global count 0 contributes ``0 · sum``. With the task's ``loss_counts(batch)``
the counts are known before the forward and every micro-batch streams forward → backward;
otherwise all forwards run first (their graphs kept), then the backwards. Then the losses, the
non-finite flag, the stop request and the token count are all-reduced in one call, the gradient
norm is taken (and clipped), and the optimizer steps unless something was non-finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import distributed as D
from .logging import StepStats
from .task import LossTerms, Task

__all__ = ["StepResult", "StepRunner"]


@dataclasses.dataclass
class StepResult:
    """What one step did, summed over ranks (``losses`` per term: global mean, ``None`` without
    any count)."""

    losses: dict[str, float | None]
    loss: float
    grad_norm: float
    nonfinite: bool
    stop: bool
    bad: int
    samples: int
    tokens: int
    metrics: dict[str, float]


class StepRunner:
    """Runs optimizer steps of ``task`` on ``model`` (as trained: DDP wrapper, FSDP2 root or the
    module) in ``mode`` (``"none"`` | ``"ddp"`` | ``"fsdp"``); ``amp``: the autocast context factory
    of bf16 training, or ``None``."""

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        mode: str,
        device: torch.device,
        world_size: int,
        grad_accum: int,
        clip_grad: float | None,
        amp: Callable[[], Any] | None,
    ) -> None:
        self.task, self.model, self.optimizer, self.mode = task, model, optimizer, mode
        self.device, self.world_size, self.grad_accum = device, world_size, grad_accum
        self.clip_grad, self._amp = clip_grad, amp
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._term_names: list[str] | None = None

    def run(
        self, micro_batches: list[dict], bad: int, good: int, stop_requested: Callable[[], bool]
    ) -> StepResult:
        """One optimizer step on this rank's ``micro_batches``; ``bad`` / ``good``: the step's
        sample counts, already summed over ranks; ``stop_requested()``: whether this rank was asked to
        stop, read once the backwards are done (the result's ``stop`` is true when any rank was)."""
        a, ddp = len(micro_batches), self.mode == "ddp"
        counts_fn = getattr(self.task, "loss_counts", None)
        stats = StepStats()
        if counts_fn is not None:  # streaming: counts first, then forward → backward per micro-batch
            local = [{k: int(v) for k, v in counts_fn(mb).items()} for mb in micro_batches]
            gcounts = self._global_counts(local)
            for i, mb in enumerate(micro_batches):
                last = i == a - 1
                ctx = self.model.no_sync() if ddp and not last else contextlib.nullcontext()
                with ctx:
                    terms = self._forward(mb)
                    if {k: int(v) for k, v in terms.counts.items()} != local[i]:
                        raise ValueError(
                            f"compute_loss counts {terms.counts} differ from loss_counts {local[i]}"
                        )
                    self._set_fsdp_sync(last)
                    self._backward(terms, gcounts, stats, mb)
        else:  # deferred: all forwards, global counts, then the backwards
            manual = ddp and a > 1  # DDP decides syncing at forward time: reduce by hand
            outs = []
            for mb in micro_batches:
                with self.model.no_sync() if manual else contextlib.nullcontext():
                    outs.append(self._forward(mb))
            gcounts = self._global_counts([{k: int(v) for k, v in t.counts.items()} for t in outs])
            for i, (terms, mb) in enumerate(zip(outs, micro_batches)):
                self._set_fsdp_sync(i == a - 1)
                self._backward(terms, gcounts, stats, mb)
            del outs
            if manual:
                D.average_grads(self._params, self.world_size)
        return self._finish_step(stats, gcounts, bad, good, stop_requested())

    def _forward(self, batch: dict) -> LossTerms:
        batch = D.to_device(batch, self.device, keep=getattr(self.task, "host_keys", ()))
        with self._amp() if self._amp else contextlib.nullcontext():
            terms = self.task.compute_loss(self.model, batch)
        return terms

    def _set_fsdp_sync(self, sync: bool) -> None:
        if self.mode == "fsdp" and self.grad_accum > 1:
            self.model.set_requires_gradient_sync(sync)

    def _global_counts(self, local: list[dict[str, int]]) -> dict[str, int]:
        names = sorted(local[0])
        if self._term_names is None:
            everyone = D.all_gather_object(names)
            if any(n != names for n in everyone):
                raise ValueError(f"ranks return different loss terms: {everyone}")
            self._term_names = names
        for c in local:
            if sorted(c) != self._term_names:
                raise ValueError(f"loss terms {sorted(c)} differ from the first step's {self._term_names}")
        totals = D.all_reduce_sum([sum(c[n] for c in local) for n in self._term_names])
        return {n: round(v) for n, v in zip(self._term_names, totals)}

    def _backward(self, terms: LossTerms, gcounts: dict[str, int], stats: StepStats, batch: dict) -> None:
        world, loss = self.world_size, None
        for name in self._term_names:
            s, gc = terms.sums[name], gcounts[name]
            scale = float(terms.weights.get(name, 1.0)) * world / gc if gc > 0 else 0.0
            part = s.float() * scale
            loss = part if loss is None else loss + part
        if not loss.requires_grad:
            raise ValueError("compute_loss returned no loss term connected to a trainable parameter")
        stats.add(terms, loss, batch)
        loss.backward()

    def _finish_step(
        self, stats: StepStats, gcounts: dict[str, int], bad: int, samples: int, stop_here: bool
    ) -> StepResult:
        names = self._term_names
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        # the step's one read-back: loss sums, the non-finite flag and the gradient norm together
        dev = stats.nonfinite.device
        local = torch.stack([*stats.sums_for(names), stats.nonfinite, norm.to(dev, torch.float64)]).cpu()
        grad_norm, local = float(local[-1]), local[:-1]
        extra = [float(stop_here), stats.tokens]
        g = D.all_reduce_sum(torch.cat([local, torch.tensor(extra, dtype=torch.float64)]))
        sums, nonfinite = g[: len(names)], g[len(names)] > 0
        stop, tokens = g[len(names) + 1 :]
        losses = {n: (s / gcounts[n] if gcounts[n] else None) for n, s in zip(names, sums)}
        w = stats.weights
        loss = sum(w.get(n, 1.0) * v for n, v in losses.items() if v is not None)
        nonfinite = nonfinite or not math.isfinite(grad_norm) or not math.isfinite(loss)
        if not nonfinite:
            if self.clip_grad is not None:
                torch.nn.utils.clip_grads_with_norm_(self._params, self.clip_grad, norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = stats.mean_metrics()
        return StepResult(
            losses, loss, grad_norm, nonfinite, stop > 0, int(bad), int(samples), int(tokens), metrics
        )
