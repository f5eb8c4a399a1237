"""Host values as a device tensor without waiting for the device (docs/method.md §7).

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait
until the GPU's stream has caught up (``torch.cuda.set_sync_debug_mode`` reports it as a
synchronisation). Per-micro-batch metadata that the host already knows (sequence lengths, image
grids, positions of sequence ends) goes through pinned memory and a non-blocking copy instead;
torch keeps the pinned block alive until the copy has run. :func:`to_device_async` does the same
for a tensor the host holds (a batch's token ids and labels, kept on the host so that checks and
index building read them there: the trainer's ``Task.host_keys``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["host_tensor", "to_device_async"]


def host_tensor(
    values: Sequence, device: torch.device | str | None, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``; on CUDA copied from pinned memory
    without synchronising, elsewhere created there directly."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def to_device_async(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait: a CPU tensor bound for CUDA is copied from
    pinned memory (pinned first if it is not: a host copy, no device wait) with ``non_blocking``;
    any other move is ``t.to(device)`` (none when ``t`` is already there)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
