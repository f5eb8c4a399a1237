"""Mean pooling of token streams, shared by the models (pooled embeddings) and the losses
(docs/method.md §2: the vision feature ``F_v`` and the caption feature ``F_t``; §3: MoCa's
mean-pooled embeddings). Plain functions on tensors: no model, no loss.

- :func:`segment_mean` — a packed stream ``(N, D)`` cut into consecutive segments;
- :func:`masked_mean` — a padded batch ``(B, T, D)`` under a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cmpt.host_tensor import to_device_async

__all__ = ["masked_mean", "segment_mean"]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden (B, T, D)`` over the positions where ``mask (B, T)`` is nonzero.

    Used for the caption feature ``F_t`` (docs/method.md §2: mean over non-pad tokens). Accumulated in
    float32 (or wider); the result has dtype ``promote(hidden.dtype, float32)``. A row without
    any valid position gives a zero vector.
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (B, T, D) and mask (B, T), got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.to(device=hidden.device, dtype=dtype)
    total = torch.einsum("btd,bt->bd", hidden.to(dtype), m)
    return total / m.sum(dim=1, keepdim=True).clamp(min=1.0)


def segment_mean(tokens: torch.Tensor, lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Per-segment mean of a packed stream ``tokens (N, D)`` cut into consecutive ``lengths``.

    Used for the vision feature ``F_v`` (docs/method.md §2: mean of a sample's merged vision tokens).
    ``sum(lengths)`` must equal ``N``; a zero-length segment gives a zero vector. Accumulated and
    returned in ``promote(tokens.dtype, float32)``; differentiable w.r.t. ``tokens``. Lengths given
    as a list (or a CPU tensor) are checked on the host, so a GPU stream is not synchronised.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, D), got shape {tuple(tokens.shape)}")
    lens = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    if bool((lens < 0).any()):
        raise ValueError("lengths must be non-negative")
    total_len = int(lens.sum())
    if total_len != tokens.shape[0]:
        raise ValueError(f"sum(lengths) = {total_len} does not match the number of tokens {tokens.shape[0]}")
    lens = to_device_async(lens, tokens.device)
    dtype = torch.promote_types(tokens.dtype, torch.float32)
    n_seg = lens.numel()
    seg_ids = torch.repeat_interleave(torch.arange(n_seg, device=tokens.device), lens, output_size=total_len)
    sums = torch.zeros(n_seg, tokens.shape[1], dtype=dtype, device=tokens.device)
    sums = sums.index_add(0, seg_ids, tokens.to(dtype))
    return sums / lens.clamp(min=1).to(dtype).unsqueeze(1)
