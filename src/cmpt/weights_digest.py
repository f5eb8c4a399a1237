"""Weight digests: ``[numel, Σx, Σx², Σw·x]`` per parameter in float64, which tell whether two
copies of a model hold the same weights without keeping or hashing their bytes (docs/method.md §4
"Verified checkpoints"; also ``cmpt encode``'s resumable shards, §7).

``w`` is a fixed pseudo-random weight of the position modulo a prime, so a permuted or transposed
tensor differs too. Sums, not a byte hash: computed on the accelerator in one pass (about 100 M
elements/s on 2 CPU cores) and independent of the device. Two digests match when every statistic
agrees within 1e-9 of the tensor's scale (``sqrt(numel·Σx²)``, which bounds ``Σ|x|``): summation
order moves them by ~1e-12 of it; a fine-tuned or re-quantized copy moves them by far more.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["digest_mismatch", "parameter_digest"]

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
def parameter_digest(module: nn.Module, *, frozen_only: bool = False) -> dict[str, list[float]]:
    """``{name: [numel, Σx, Σx², Σw·x]}`` of every parameter of ``module`` (``frozen_only``: of those
    that do not require a gradient). Full tensors: call it before a model is sharded."""
    return {name: _stats(p) for name, p in module.named_parameters() if not (frozen_only and p.requires_grad)}


def _same(a: list[float], b: list[float]) -> bool:
    if len(a) != 4 or len(b) != 4 or a[0] != b[0]:
        return False
    scale = math.sqrt(max(a[0] * a[2], 0.0)) + abs(a[2]) + 1e-30
    return all(abs(x - y) <= _RTOL * scale for x, y in zip(a[1:], b[1:]))


def digest_mismatch(saved: dict[str, list[float]], now: dict[str, list[float]]) -> list[str]:
    """Names of parameters whose digests differ (one side absent counts), sorted."""
    names = sorted(set(saved) | set(now))
    return [n for n in names if n not in saved or n not in now or not _same(saved[n], now[n])]
