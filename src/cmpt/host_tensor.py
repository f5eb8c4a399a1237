"""Host values as a device tensor without waiting for the device, and device outputs read back
to the host a window at a time (docs/method.md §7).

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait
until the GPU's stream has caught up (``torch.cuda.set_sync_debug_mode`` reports it as a
synchronisation). Per-micro-batch metadata that the host already knows (sequence lengths, image
grids, positions of sequence ends) goes through pinned memory and a non-blocking copy instead;
torch keeps the pinned block alive until the copy has run. :func:`to_device_async` does the same
for a tensor the host holds (a batch's token ids and labels, kept on the host so that checks and
index building read them there: the trainer's ``Task.host_keys``). :func:`read_back_in_windows`
reads inference outputs back once for several batches instead of after every forward, so the
device runs the next forwards while the host waits for none of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch

__all__ = ["READBACK_WINDOW", "host_tensor", "read_back_in_windows", "readback_window", "to_device_async"]

K = TypeVar("K")
#: batches whose outputs are read back from an accelerator together (docs/method.md §7)
READBACK_WINDOW = 8


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


def readback_window(device: torch.device | str) -> int:
    """How many batches' outputs to read back together from ``device``: :data:`READBACK_WINDOW`
    from an accelerator; 1 from the CPU, where they already are on the host (concatenating them
    would only copy)."""
    return 1 if torch.device(device).type == "cpu" else READBACK_WINDOW


def read_back_in_windows(
    outputs: Iterable[tuple[K, tuple[torch.Tensor, ...]]], window: int
) -> Iterator[tuple[K, tuple[torch.Tensor, ...]]]:
    """``(key, tensors)`` of each batch with its tensors as float32 on the host, in order, read back
    ``window`` batches at a time: each position's tensors of a window are concatenated on their
    device and copied back in one read-back (a wait for the device), then split per batch again.
    ``outputs`` is consumed lazily, so its forwards for a window are all queued on the device
    before the host waits. Every batch gives the same number of tensors, each split along dim 0."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    queued: list[tuple[K, tuple[torch.Tensor, ...]]] = []
    for item in outputs:
        queued.append(item)
        if len(queued) == window:
            yield from _on_host(queued)
            queued = []
    yield from _on_host(queued)


def _on_host(
    queued: list[tuple[K, tuple[torch.Tensor, ...]]],
) -> Iterator[tuple[K, tuple[torch.Tensor, ...]]]:
    if not queued:
        return
    columns = list(zip(*(tensors for _, tensors in queued), strict=True))
    host = [
        (col[0] if len(col) == 1 else torch.cat(col)).float().cpu().split([t.shape[0] for t in col])
        for col in columns
    ]
    for i, (key, _) in enumerate(queued):
        yield key, tuple(h[i] for h in host)
