"""MoCa stage 2's contrastive loss: InfoNCE with in-batch and hard negatives (docs/method.md §3
"Stage 2").

Scores are cosine similarities of L2-normalized embeddings divided by a fixed temperature
(τ = 0.03). Each query is scored against every target of the (possibly cross-rank gathered)
batch — its own positive and the other queries' positives as in-batch negatives — and against its
own ``k`` hard negatives only, which add ``k`` columns to its row. The loss is the cross-entropy of
the positive's column. The function is pure: gathering targets across ranks happens around it
(:func:`cmpt.train.distributed.all_gather_with_grad`), and ``positives`` says where each query's
positive sits in the gathered targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["info_nce"]


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    temperature: float = 0.03,
    *,
    positives: torch.Tensor | None = None,
    hard_negative_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE of ``query (B, D)`` against ``target (M, D)`` (M ≥ B) and ``hard_negatives (B, k, D)``.

    ``positives`` ``(B,)``: the row of ``target`` holding each query's positive (default ``0..B-1``).
    ``hard_negative_mask`` ``(B, k)``: False for a slot that is not a real negative (excluded).
    ``target_mask`` ``(M,)``: False for a target that is no in-batch negative (e.g. a repeated pair).
    ``reduction``: ``"mean"`` over the B queries (default) or ``"sum"``. Computed in float32 (or
    wider); embeddings are expected L2-normalized (scores = cosine / τ).
    """
    if query.dim() != 2 or target.dim() != 2 or query.shape[1] != target.shape[1]:
        raise ValueError(
            f"query (B, D) and target (M, D) expected, got {tuple(query.shape)}, {tuple(target.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = torch.promote_types(query.dtype, torch.float32)
    q, t = query.to(dtype), target.to(dtype)
    logits = q @ t.T / temperature
    if target_mask is not None:
        keep = target_mask.to(device=logits.device, dtype=torch.bool)
        logits = logits.masked_fill(~keep[None, :], float("-inf"))
    if hard_negatives is not None:
        if (
            hard_negatives.dim() != 3
            or hard_negatives.shape[0] != q.shape[0]
            or hard_negatives.shape[2] != q.shape[1]
        ):
            raise ValueError(
                f"hard_negatives must be (B={q.shape[0]}, k, D), got {tuple(hard_negatives.shape)}"
            )
        hard = torch.einsum("bd,bkd->bk", q, hard_negatives.to(dtype)) / temperature
        if hard_negative_mask is not None:
            hard = hard.masked_fill(
                ~hard_negative_mask.to(device=hard.device, dtype=torch.bool), float("-inf")
            )
        logits = torch.cat([logits, hard], dim=1)
    if positives is None:
        positives = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, positives.to(q.device), reduction=reduction)
