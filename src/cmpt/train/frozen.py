"""Frozen-weight digests: a resumed run must sit on the frozen weights it was trained on
(docs/method.md §4 "Verified checkpoints").

Checkpoints leave frozen parameters out (a frozen LLM in CoMP stage I, the untied LM head in MoCa
CL, a LoRA base): on resume they come from the task's initialisation again (``model.init``,
``model.vision``, ``model.llm``, a backbone path). If that source now holds other weights — a
re-downloaded hub revision, an edited file, another path — the trainable weights of the checkpoint
would continue on top of a different model without any error. So every checkpoint stores, per
frozen parameter, ``[numel, Σx, Σx², Σw·x]`` in float64 (``w``: a fixed pseudo-random weight of the
position modulo a prime, so a permuted or transposed tensor differs too), computed once per launch
by rank 0 from the full weights before they are sharded (about 100 M elements/s on 2 CPU cores),
and a resume compares them.

Sums, not a byte hash: computed on the accelerator in one pass and independent of the device. Two
digests match when every statistic agrees within 1e-9 of the tensor's scale (``sqrt(numel·Σx²)``,
which bounds ``Σ|x|``): summation order moves them by ~1e-12 of it; a fine-tuned or re-quantized
copy moves them by far more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = ["FROZEN_KEY", "check_frozen", "frozen_digest", "frozen_mismatch"]

#: the ``trainer_state.json`` key, and the ``--allow-change`` name that accepts other frozen weights
FROZEN_KEY = "frozen_weights"
_PERIOD = 4093  # a prime: the position weight repeats with it, and no row length is a multiple of it
_ROWS = 4096  # rows of _PERIOD elements per float64 pass: bounds the temporary copy (128 MiB)
_RTOL = 1e-9


def _weights(n: int, device: torch.device) -> torch.Tensor:
    j = torch.arange(n, device=device, dtype=torch.int64)
    return (j * 40503 % 65537).to(torch.float64) / 65537.0


def _stats(p: torch.Tensor) -> list[float]:
    x = p.detach().reshape(-1)
    n, w = x.numel(), _weights(_PERIOD, x.device)
    acc = torch.zeros(3, dtype=torch.float64, device=x.device)
    for start in range(0, n, _ROWS * _PERIOD):
        c = x[start : start + _ROWS * _PERIOD].to(torch.float64)
        full = c.numel() // _PERIOD * _PERIOD
        column = c[:full].view(-1, _PERIOD).sum(0)
        tail = c[full:]
        weighted = column @ w + tail @ w[: tail.numel()]
        acc += torch.stack([c.sum(), torch.dot(c, c), weighted])
    return [float(n), *acc.tolist()]


@torch.no_grad()
def frozen_digest(module: nn.Module) -> dict[str, list[float]]:
    """``{name: [numel, Σx, Σx², Σw·x]}`` of every parameter of ``module`` that does not require a
    gradient (full tensors: call it before the model is sharded). Empty when everything trains."""
    return {name: _stats(p) for name, p in module.named_parameters() if not p.requires_grad}


def _same(a: list[float], b: list[float]) -> bool:
    if len(a) != 4 or len(b) != 4 or a[0] != b[0]:
        return False
    scale = math.sqrt(max(a[0] * a[2], 0.0)) + abs(a[2]) + 1e-30
    return all(abs(x - y) <= _RTOL * scale for x, y in zip(a[1:], b[1:]))


def frozen_mismatch(saved: dict[str, list[float]], now: dict[str, list[float]]) -> list[str]:
    """Names of frozen parameters whose digests differ (one side absent counts), sorted."""
    names = sorted(set(saved) | set(now))
    return [n for n in names if n not in saved or n not in now or not _same(saved[n], now[n])]


def _sources(config: dict) -> str:
    from .config_diff import flatten

    keys = [
        k for k, v in flatten(config).items() if k.startswith("model.") and isinstance(v, str) and "/" in v
    ]
    return ", ".join(keys) or "the model section"


def check_frozen(
    checkpoint: str | Path, digest: dict[str, list[float]], config: dict, allow: Iterable[str]
) -> str | None:
    """Rank 0, before a resume loads ``checkpoint``: compare its stored frozen-weight digest with
    ``digest`` (this launch's, :func:`frozen_digest`). Returns a warning to log (differences accepted
    by ``--allow-change frozen_weights``, or a checkpoint from before the digest existed) or None;
    raises :class:`~cmpt.train.resume.ResumeError` naming the parameters and the config keys that
    load them."""
    from .config_diff import covered
    from .resume import ResumeError

    path = Path(checkpoint) / "trainer_state.json"
    saved = json.loads(path.read_text(encoding="utf-8")).get(FROZEN_KEY)
    if saved is None:
        return (
            f"{checkpoint} stores no digest of the frozen weights (an older cmpt): they were not compared"
            if digest
            else None
        )
    bad = frozen_mismatch(saved, digest)
    if not bad:
        return None
    names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    what = f"{len(bad)} frozen parameter(s) differ from those the checkpoint was trained with ({names})"
    if covered(FROZEN_KEY, allow):
        return f"{what}: continuing on the new ones (--allow-change {FROZEN_KEY})"
    raise ResumeError(
        f"cannot resume from {checkpoint}: {what}. Checkpoints do not store frozen weights: they are "
        f"loaded again from the config ({_sources(config)}), which now gives other values. Point it at "
        f"the weights the run started from (run.dir/history/ holds its first config), or add "
        f"--allow-change {FROZEN_KEY} to continue on these"
    )
