"""The trainer's start-up summary: what is about to be trained, on what, how (docs/architecture.md, "Logs").

Printed once by rank 0 before the first step, so a log answers at a glance: which parts of the
model train (parameters per top-level part, trainable / total), how many records the data has and
how many could not be indexed, how many micro-batches and at most how many tokens make a step,
the world size, the distribution mode and the precision.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["parameter_table", "startup_lines"]


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def parameter_table(module: nn.Module) -> list[tuple[str, int, int]]:
    """``(part, trainable, total)`` per top-level child of ``module`` (sharded parameters count in
    full: a DTensor's ``numel`` is its global size), in definition order; parameters owned by the
    module itself are the part ``"(root)"``. A module whose parameters all sit in one child (a
    wrapper) is looked through."""
    while True:  # a wrapper (an objective around the VLM, a peft model): count its parts instead
        children = [c for c in module.children() if any(True for _ in c.parameters())]
        own = any(True for _ in module.parameters(recurse=False))
        if len(children) != 1 or own:
            break
        module = children[0]
    parts: dict[str, list[int]] = {}
    for name, p in module.named_parameters():
        part = name.split(".", 1)[0] if "." in name else "(root)"
        acc = parts.setdefault(part, [0, 0])
        acc[1] += p.numel()
        if p.requires_grad:
            acc[0] += p.numel()
    return [(k, v[0], v[1]) for k, v in parts.items()]


def startup_lines(
    module: nn.Module,
    *,
    world_size: int,
    mode: str,
    precision: str,
    device: str,
    grad_accum: int,
    loader: Any = None,
    budgets: tuple[int, int] | None = None,
) -> list[str]:
    """The summary's lines. ``loader.length_index`` (map-style loaders, :mod:`cmpt.data.batching`)
    gives the record count; ``budgets``: ``(text, vision)`` tokens per micro-batch when the loader
    tells them (``loader.token_budgets``)."""
    table = parameter_table(module)
    trainable, total = sum(t for _, t, _ in table), sum(n for _, _, n in table)
    parts = ", ".join(f"{k} {_count(t)}/{_count(n)}" for k, t, n in table)
    lines = [
        f"start-up: world size {world_size} ({mode}), precision {precision}, device {device}",
        f"parameters trainable/total: {_count(trainable)}/{_count(total)} ({parts})",
    ]
    info = getattr(loader, "length_index", None)
    if isinstance(info, dict):
        unreadable = info.get("unreadable")
        bad = f", {unreadable} could not be indexed (counted as bad when read)" if unreadable else ""
        lines.append(f"data: {info['records']} records{bad}; length index {info['how']}")
    else:
        lines.append("data: streamed; records and bad ones are counted as they are read")
    micro = grad_accum * world_size
    step = f"step: {grad_accum} micro-batch(es) × {world_size} rank(s) = {micro} micro-batches"
    if budgets is not None:
        text, vision = budgets
        step += f", at most {micro * text:,} text + {micro * vision:,} vision tokens"
    lines.append(step)
    return lines
