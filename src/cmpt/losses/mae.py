"""MoCa's masked-window reconstruction loss ``L_MAE`` (docs/method.md §3 "Stage 1").

A masked unit is one merged ``m×m`` window: its target is the concatenation of the window's
``m²`` normalized patch rows (the processor's pixels, not normalized per patch), predicted from the
MAE decoder's output at that window's image token. The loss is the mean squared error over every
element of every masked window; the function returns the *sum* and the element count so that a
trainer normalizes by the global count across ranks and micro-batches (docs/method.md §6
"Loss normalization").
"""

from __future__ import annotations

import torch

from cmpt.host_tensor import to_device_async

__all__ = ["mae_loss", "window_targets"]


def window_targets(patches: torch.Tensor, window_mask: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Targets of the masked windows: ``(n_masked, m²·row)`` from packed ``patches (P, row)`` in
    merge-window order (window ``k`` = rows ``k·m² … (k+1)·m² − 1``) and ``window_mask (P / m²,)``."""
    m2 = merge_size * merge_size
    if patches.dim() != 2 or patches.shape[0] != window_mask.numel() * m2:
        raise ValueError(
            f"patches {tuple(patches.shape)} must have {m2} rows per window for {window_mask.numel()} windows"
        )
    windows = patches.reshape(window_mask.numel(), m2 * patches.shape[1])
    masked = window_mask.to(torch.bool).nonzero().flatten()  # where the mask is: the host reads it freely
    return windows.index_select(0, to_device_async(masked, patches.device))


def mae_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(Σ (pred − target)², number of elements)`` in float32 (or wider); ``target`` carries no
    gradient. With no masked window the sum is ``0 · pred.sum()`` (still connected to the graph)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    if pred.numel() == 0:
        return pred.sum().to(dtype) * 0.0, 0
    diff = pred.to(dtype) - target.detach().to(dtype)
    return (diff * diff).sum(), int(diff.numel())
