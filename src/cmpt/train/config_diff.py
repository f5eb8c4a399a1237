"""Config comparison for resume: the flattened keys of two configs, which of them differ, and the
keys whose changes never block a resume (docs/architecture.md ``train/``; docs/method.md §4
"Verified checkpoints", §6 "Distributed training": the resume rules).

* :func:`flatten`: nested config → dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``);
* :func:`covered`: whether a key is one of some prefixes or below one (``train.allow_change``);
* :func:`diff_configs`: the keys that differ, ``{key: [old, new]}`` (a side absent counts);
* :data:`IGNORED_KEYS`: keys that change neither the model, the data stream nor the optimization.

:mod:`cmpt.train.resume` applies them to a checkpoint's saved config (:func:`~cmpt.train.resume.plan_resume`);
:mod:`cmpt.train.fingerprint`, :mod:`cmpt.train.frozen` and :mod:`cmpt.train.reshard` use
:func:`flatten` / :func:`covered` too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["IGNORED_KEYS", "covered", "diff_configs", "flatten"]

#: config keys (and prefixes) of the trainer's own sections that never block a resume: where the run
#: lives, logging, checkpoint cadence, the resume controls themselves, fault tolerances, and
#: implementation choices with the same mathematics (distribution wrapper, activation checkpointing,
#: compile). A recipe adds its own (attention kernels, loss chunking) as ``Task.resume_ignored_keys``.
IGNORED_KEYS: tuple[str, ...] = (
    "run.dir",
    "run.name",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "train.wandb",
    "train.save_every",
    "train.keep_last",
    "train.resume",
    "train.allow_change",
    "train.max_nonfinite",
    "train.max_bad_fraction",
    "train.bad_check_min_samples",
    "train.dist",
    "train.activation_checkpointing",
    "train.ac_every",
    "train.compile",
)
_ABSENT = "(absent)"


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists and scalars are leaves."""
    if not isinstance(cfg, dict):
        return {prefix: cfg} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def covered(key: str, prefixes: Iterable[str]) -> bool:
    """True when ``key`` is one of ``prefixes`` or below one (``a.b`` covers ``a.b.c`` and ``a.b[x]``)."""
    for p in prefixes:
        p = p.strip()
        if p and (key == p or key.startswith(p + ".") or key.startswith(p + "[")):
            return True
    return False


def diff_configs(old: dict, new: dict, ignored: Iterable[str] = IGNORED_KEYS) -> dict[str, list[Any]]:
    """Keys of the flattened configs whose values differ (one side absent counts), minus ``ignored``:
    ``{key: [old, new]}``, sorted by key."""
    a, b, ignored = flatten(old), flatten(new), tuple(ignored)
    keys = sorted(k for k in set(a) | set(b) if not covered(k, ignored))
    return {k: [a.get(k, _ABSENT), b.get(k, _ABSENT)] for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)}
