"""The VLM adapter: 2×2 patch merger (docs/method.md §1 "Patch merger", official name ``PatchMerger``)."""

from __future__ import annotations

import torch
from torch import nn


class PatchMerger(nn.Module):
    """LayerNorm(D) per patch → concatenate the m×m patches of a window (m²·D) → Linear → GELU → Linear.

    Input: NativeViT patch features (N, D) in merge-window order, so a window is m² consecutive
    rows and merging is a reshape. Output: one token per window (N / m², out_dim).
    """

    def __init__(self, vision_dim: int, out_dim: int, merge_size: int = 2, eps: float = 1e-6) -> None:
        super().__init__()
        self.merge_size = merge_size
        hidden = vision_dim * merge_size**2
        self.norm = nn.LayerNorm(vision_dim, eps=eps)
        self.fc1 = nn.Linear(hidden, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self.merge_size**2
        if x.shape[0] % window:
            raise ValueError(
                f"{x.shape[0]} patch tokens is not a multiple of the {window}-patch merge window"
            )
        h = self.norm(x).reshape(x.shape[0] // window, -1)
        return self.fc2(self.act(self.fc1(h)))
