"""Parameter groups, AdamW and the learning-rate schedule (docs/method.md §2.1: AdamW, cosine with warmup).

The task names its groups with their own learning rates (``Task.param_groups``); here each
group is split in a decayed and a non-decayed half, resolved by parameter *name* so that the
groups survive wrapping and FSDP2 sharding (which replaces the parameter objects), and turned
into a ``torch.optim.AdamW`` plus a ``LambdaLR``. On resume the config's group hyper-parameters
are put back and the schedule continues at the saved step (:func:`restore_schedule`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["NO_DECAY_KEYS", "build_optimizer", "build_scheduler", "group_names", "lr_factor"]
__all__ += ["load_scheduler_state", "resolve_groups", "scheduler_state", "split_decay", "warmup_length"]
__all__ += ["restore_schedule", "snapshot_groups"]

logger = logging.getLogger("cmpt.train")

#: parameters whose name contains one of these never get weight decay (besides every ndim < 2 one)
NO_DECAY_KEYS: tuple[str, ...] = ("pos_embed", "cls_token", "register_tokens", "probe")


def group_names(model: nn.Module, groups: Iterable[dict]) -> list[dict]:
    """The task's groups with ``params`` replaced by ``param_names`` (names in ``model``).

    Frozen parameters are dropped with a warning; a parameter in two groups, or one that is not
    in ``model``, is an error. Trainable parameters in no group are reported (they get gradients
    but are never updated).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, str] = {}
    out = []
    for i, g in enumerate(groups):
        g = dict(g)
        gname = str(g.pop("name", f"group{i}"))
        pnames = []
        for p in g.pop("params"):
            if id(p) not in names:
                raise ValueError(f"param group '{gname}' holds a tensor that is not a parameter of the model")
            n = names[id(p)]
            if n in seen:
                raise ValueError(f"parameter '{n}' is in param groups '{seen[n]}' and '{gname}'")
            seen[n] = gname
            if p.requires_grad:
                pnames.append(n)
            else:
                logger.warning("param group '%s': dropping frozen parameter '%s'", gname, n)
        out.append({"name": gname, "param_names": pnames, **g})
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and n not in seen]
    if orphans:
        logger.warning(
            "%d trainable parameters are in no param group and will not be updated: %s",
            len(orphans),
            ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""),
        )
    return out


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or any(k in name for k in NO_DECAY_KEYS)


def split_decay(
    named_groups: list[dict], named_params: dict[str, torch.Tensor], cfg: OptimConfig
) -> list[dict]:
    """Resolve ``param_names`` against ``named_params`` and split each group into decay / no-decay.

    A group may set ``lr`` (default ``cfg.lr``), ``weight_decay`` (default ``cfg.weight_decay``)
    and any other AdamW option. The no-decay half is named ``<name>.no_decay``; empty halves are
    dropped.
    """
    out = []
    for g in named_groups:
        g = dict(g)
        gname, pnames = g.pop("name"), g.pop("param_names")
        g.setdefault("lr", cfg.lr)
        wd = g.pop("weight_decay", cfg.weight_decay)
        decay = [named_params[n] for n in pnames if not _no_decay(n, named_params[n])]
        plain = [named_params[n] for n in pnames if _no_decay(n, named_params[n])]
        if decay:
            out.append({**g, "name": gname, "params": decay, "weight_decay": wd})
        if plain:
            out.append({**g, "name": f"{gname}.no_decay", "params": plain, "weight_decay": 0.0})
    if not out:
        raise ValueError("the task's param groups hold no trainable parameter")
    return out


def resolve_groups(model: nn.Module, named_groups: list[dict], cfg: OptimConfig) -> list[dict]:
    """:func:`split_decay` against the current parameters of ``model`` (after wrapping/sharding)."""
    return split_decay(named_groups, dict(model.named_parameters()), cfg)


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the split groups (each keeps its ``name`` key for logging and checkpoints); the
    fused CUDA kernel when every parameter is on a GPU (same update, one launch per step)."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )


def warmup_length(cfg: OptimConfig, total_steps: int) -> int:
    """``warmup_steps`` when positive, else ``round(warmup_ratio · total_steps)``."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else round(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based), as in HF ``transformers``."""
    warmup = warmup_length(cfg, total_steps)
    if step < warmup:
        return step / max(1, warmup)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * max(0.0, shape)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`lr_factor` to every group.

    The schedule is a plain function, so ``scheduler.state_dict()`` is JSON-able data (counters and
    learning rates); the function itself is rebuilt from the config on resume.
    """

    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The scheduler's counters and learning rates (JSON-able; the schedule comes from the config)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return state


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Inverse of :func:`scheduler_state`."""
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def snapshot_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of each param group (everything but ``params``), as built from the config."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def restore_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    saved: dict[str, Any],
    fresh: list[dict[str, Any]],
) -> None:
    """After loading a checkpoint: put back the config's group hyper-parameters (``fresh``, from
    :func:`snapshot_groups` before the load) and continue the schedule at the saved step with the
    config's base learning rates, so the lr is what a fresh scheduler of this config gives at that
    step (bitwise the saved one when nothing changed)."""
    names = [g.get("name") for g in optimizer.param_groups]
    if names != [f.get("name") for f in fresh]:
        raise ValueError(
            f"the checkpoint's param groups {names} differ from the task's {[f.get('name') for f in fresh]}"
        )
    for g, f in zip(optimizer.param_groups, fresh):
        g.update(f)
    load_scheduler_state(scheduler, {**saved, "base_lrs": [f["initial_lr"] for f in fresh]})
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs
