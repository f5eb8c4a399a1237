"""MoCa's input corruption as pure functions: MLM token masks and MAE window masks (docs/method.md §3).

Both draw from a caller-supplied ``torch.Generator`` so that a sample's masks depend only on the
generator's seed (the sample builder seeds it with ``(seed, epoch, id)``, docs/method.md §4):

* :func:`mlm_mask` — one uniform draw per token, masked when below ``p`` and not protected. A draw
  is made for *every* position, protected or not, so the masks of the unprotected tokens do not
  depend on which tokens are protected.
* :func:`window_mask` — one Bernoulli(``p``) per merged ``m×m`` window (= per merged vision token).

:func:`apply_mlm` turns an MLM mask into the corrupted ids and the unshifted labels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cmpt.vlm.vision_tokens import IGNORE_INDEX

__all__ = ["apply_mlm", "mlm_mask", "window_mask"]


def _check_p(p: float, what: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {p}")
    return p


def mlm_mask(
    ids: torch.Tensor,
    protected_ids: torch.Tensor | Iterable[int],
    p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask of the positions of ``ids`` to replace by the mask token (docs/method.md §3).

    Each position is drawn independently (``U[0, 1) < p``); positions holding one of
    ``protected_ids`` (special, chat, vision, pad/eos/bos tokens) are never selected.
    """
    p = _check_p(p, "mlm probability")
    protected = torch.as_tensor(list(protected_ids) if not torch.is_tensor(protected_ids) else protected_ids)
    draw = torch.rand(ids.shape, generator=generator) < p
    if protected.numel() == 0:
        return draw
    return draw & ~torch.isin(ids, protected.to(ids.dtype))


def window_mask(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` independent Bernoulli(``p``) draws, one per merged window (docs/method.md §3, MAE)."""
    p = _check_p(p, "mae probability")
    if n < 0:
        raise ValueError(f"the number of windows must be >= 0, got {n}")
    return torch.rand(int(n), generator=generator) < p


def apply_mlm(ids: torch.Tensor, mask: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(corrupted ids, labels)``: masked positions become ``mask_id`` (always, no random/keep
    split) and keep their original id as label; every other label is ``-100`` (not shifted)."""
    if mask.shape != ids.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(ids.shape)}")
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[mask] = ids[mask]
    return ids.masked_fill(mask, int(mask_id)), labels
