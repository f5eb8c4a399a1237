"""Host values as a device tensor without waiting for the device (docs/method.md §7).

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait
until the GPU's stream has caught up (``torch.cuda.set_sync_debug_mode`` reports it as a
synchronisation). Per-micro-batch metadata that the host already knows (sequence lengths, image
grids, positions of sequence ends) goes through pinned memory and a non-blocking copy instead;
torch keeps the pinned block alive until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["host_tensor"]


def host_tensor(
    values: Sequence, device: torch.device | str | None, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``; on CUDA copied from pinned memory
    without synchronising, elsewhere created there directly."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
