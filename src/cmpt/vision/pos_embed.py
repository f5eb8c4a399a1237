"""The absolute position table of a :class:`~cmpt.vision.vit.NativeViT`, the "C" of C-RoPE
(docs/method.md §1.1 "Absolute position embedding"): the learned g×g table bicubically resized to each
image's patch grid (float32, as two matrix products), AIMv2's native 2D sin-cos table, and the
raster → merge-window reordering (§1.5: the release adds the table in raster order instead).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from .rope import patch_positions

__all__ = ["interpolate_table", "resize_matrix", "sincos_2d", "window_index"]


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """AIMv2-native 2D sin-cos table (h·w, dim) in raster order, HF layout [sin_w|cos_w|sin_h|cos_h]."""
    if dim % 4:
        raise ValueError(f"sin-cos position table needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w).outer(omega)
    cols = torch.arange(w, dtype=torch.float64).repeat(h).outer(omega)
    return torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1).float()


@cache
def resize_matrix(g: int, n: int, antialias: bool, device: torch.device) -> torch.Tensor:
    """PyTorch's 1D bicubic resize g → n (align_corners=False) as an (n, g) float32 matrix.

    Read off ``F.interpolate`` applied to the basis vectors, so it is that exact linear map (bicubic
    is separable: the 2D resize is this matrix along rows and along columns). Cached per size.
    """
    # constant along a second axis of width 2 (antialias mis-resizes width-1 inputs)
    basis = torch.eye(g).reshape(g, 1, g, 1).expand(g, 1, g, 2)
    rows = F.interpolate(basis, size=(n, 2), mode="bicubic", align_corners=False, antialias=antialias)
    return rows[:, 0, :, 0].T.contiguous().to(device)


@cache
def window_index(h: int, w: int, merge: int, device: torch.device) -> torch.Tensor:
    """Raster row of each patch in merge-window order, on ``device`` (cached: no host-to-device copy,
    which on a GPU would wait for all queued work, per image and step)."""
    rc = patch_positions([(h, w)], merge)
    return (rc[:, 0] * w + rc[:, 1]).to(device)


def interpolate_table(table: torch.Tensor, g: int, h: int, w: int, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize (align_corners=False, float32) of a g×g table (g·g, D) to (h·w, D), raster order.

    Computed as two matrix products with :func:`resize_matrix` (same numbers as ``F.interpolate``
    up to summation order): GPU bicubic kernels loop over channels per pixel and their backward
    scatters with atomics, which made them the slowest part of a packed step. Returns the table
    unchanged when (h, w) == (g, g), as Hugging Face does (docs/method.md §1, §6 precision).
    """
    if (h, w) == (g, g):
        return table
    with torch.autocast(table.device.type, enabled=False):
        grid = table.float().reshape(g, g * table.shape[-1])
        rows = resize_matrix(g, h, antialias, table.device) @ grid  # (h, g·D)
        out = resize_matrix(g, w, antialias, table.device) @ rows.reshape(h, g, -1)  # (h, w, D)
    return out.reshape(h * w, -1).to(table.dtype)
