"""What the CPU step benchmarks share (``bench_comp_step.py``, ``bench_packing.py``,
``bench_moca_step.py``, ``bench_moca_cl.py``): a training step of a recipe's objective, the bytes
autograd saves in one forward, and the process's resident memory sampled while a function runs."""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def make_step(task: Any, lr: float = 0.0) -> tuple[Callable[[dict], Any], torch.optim.Optimizer]:
    """``step(batch)``: the task's loss terms (each its sum over its count, weighted) forward and
    backward, then AdamW (``lr`` 0 by default: the weights stay the same and every step is alike);
    returns the terms. Also the optimizer."""
    opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=lr)

    def step(batch: dict) -> Any:
        terms = task.compute_loss(task.model, batch)
        loss = sum(terms.weights.get(k, 1.0) * terms.sums[k] / max(terms.counts[k], 1) for k in terms.sums)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return terms

    return step, opt


def saved_bytes(
    task: Any, batch: dict, inside: Callable[[], bool] | None = None
) -> tuple[int, int, dict[str, float]]:
    """Bytes of the tensors autograd saves for backward in one objective forward (activations); of
    them, those saved while ``inside()`` is true (e.g. within one module); and the loss sums."""
    total, within = [0], [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        total[0] += n
        if inside is not None and inside():
            within[0] += n
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = task.compute_loss(task.model, batch)
    sum(terms.sums.values()).backward()
    task.model.zero_grad(set_to_none=True)
    return total[0], within[0], {k: float(v.detach()) for k, v in terms.sums.items()}


def current_rss() -> int:
    """Resident bytes of this process now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn: Callable[[], Any], every_s: float = 0.002) -> int:
    """Highest resident bytes sampled while ``fn`` runs (``ru_maxrss`` is the lifetime peak, which
    model loading already sets, so it cannot show a training step's peak)."""
    peak, done = [current_rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(every_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return peak[0]


def quick_defaults(ap: argparse.ArgumentParser, args: argparse.Namespace, quick: dict[str, Any]) -> None:
    """``--quick``: the smaller ``quick`` values for the options left at their defaults."""
    for name, value in quick.items():
        if getattr(args, name) == ap.get_default(name):
            setattr(args, name, value)
