"""2D rotary position embedding for packed patch streams (docs/method.md §1, "2D RoPE").

Layout = Qwen2-VL's vision RoPE. For head dim ``d``::

    inv_freq[i] = theta ** (-2i / (d/2))            for i < d/4
    freqs       = [row * inv_freq, col * inv_freq]  (length d/2)
    angles      = [freqs, freqs]                    (length d)
    rope(x)     = x * cos(angles) + rotate_half(x) * sin(angles)

where ``rotate_half`` pairs dimension ``j`` with ``j + d/2``. Everything is computed in float32.
Prefix tokens (CLS, registers) get the identity rotation (cos = 1, sin = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/(d/2))`` for ``i < d/4`` (float32, length ``d/4``)."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    return 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)


@lru_cache(maxsize=512)
def _grid_positions(h: int, w: int, merge: int) -> torch.Tensor:
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    pos = torch.stack([rows, cols], dim=-1)  # (h, w, 2) raster
    if merge > 1:
        pos = pos.view(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4)
    return pos.reshape(h * w, 2)


def patch_positions(grid_hw: Sequence[Sequence[int]], merge_size: int = 1) -> torch.Tensor:
    """(row, col) of every patch of a packed stream, in token order (N, 2) int64.

    ``merge_size > 1`` gives merge-window order (docs/method.md §1 "Input packing"); 1 gives raster order.
    """
    parts = [_grid_positions(int(h), int(w), merge_size) for h, w in grid_hw]
    return torch.cat(parts) if parts else torch.zeros(0, 2, dtype=torch.long)


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    identity: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, head_dim) float32 for (row, col) ``positions`` (N, 2).

    Rows where the boolean ``identity`` mask is set (prefix tokens) get cos = 1, sin = 0.
    """
    inv = rope_inv_freq(head_dim, theta).to(device)
    pos = positions.to(device=device, dtype=torch.float32)
    freqs = torch.cat([pos[:, :1] * inv, pos[:, 1:2] * inv], dim=-1)  # (N, d/2)
    angles = torch.cat([freqs, freqs], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if identity is not None:
        keep = (~identity.to(device)).unsqueeze(-1)
        cos = torch.where(keep, cos, torch.ones_like(cos))
        sin = torch.where(keep, sin, torch.zeros_like(sin))
    return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Pairs dim ``j`` with ``j + d/2``: ``[x1, x2] -> [-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (N, heads, d) by per-token tables (N, d); computed in float32, returned in x's dtype."""
    xf = x.float()
    out = xf * cos.unsqueeze(-2) + rotate_half(xf) * sin.unsqueeze(-2)
    return out.to(x.dtype)
