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
    """InfoNCE of ``query (B, D)`` against ``target (M, D)`` and ``hard_negatives (B, k, D)``
    (docs/method.md §3 "Stage 2").

    ``positives`` ``(B,)`` integers: the row of ``target`` holding each query's positive (default
    ``0..B-1``, which needs M ≥ B). ``hard_negative_mask`` ``(B, k)``: False for a slot that is not a
    real negative (excluded). ``target_mask`` ``(M,)``: False for a target that is no in-batch
    negative (e.g. a repeated pair); it must keep every query's own positive. ``reduction``:
    ``"mean"`` over the B queries (default) or ``"sum"``. Computed in float32 (or wider);
    embeddings are expected L2-normalized (scores = cosine / τ). With B = 0 the loss is a zero still
    connected to ``query`` and ``target``.

    Shapes are always checked. The values of ``positives`` (in ``0..M-1``) and of ``target_mask``
    (true at each positive) are checked only for CPU tensors: on an accelerator the check would
    wait for the device in every step (the training objective, whose masks keep its positives by
    construction, passes device tensors).
    """
    positives = _checked_positives(
        query, target, hard_negatives, temperature, positives, hard_negative_mask, target_mask, reduction
    )
    b = query.shape[0]
    dtype = torch.promote_types(query.dtype, torch.float32)
    if b == 0:  # no query: a zero that keeps the inputs in the graph (as alignment_loss, mae_loss)
        zero = query.sum() + target.sum()
        if hard_negatives is not None:
            zero = zero + hard_negatives.sum()
        return zero.to(dtype) * 0.0
    q, t = query.to(dtype), target.to(dtype)
    logits = q @ t.T / temperature
    if target_mask is not None:
        keep = target_mask.to(device=logits.device, dtype=torch.bool)
        logits = logits.masked_fill(~keep[None, :], float("-inf"))
    if hard_negatives is not None:
        hard = torch.einsum("bd,bkd->bk", q, hard_negatives.to(dtype)) / temperature
        if hard_negative_mask is not None:
            hard = hard.masked_fill(
                ~hard_negative_mask.to(device=hard.device, dtype=torch.bool), float("-inf")
            )
        logits = torch.cat([logits, hard], dim=1)
    return F.cross_entropy(logits, positives.to(q.device), reduction=reduction)


def _checked_positives(
    query: torch.Tensor,
    target: torch.Tensor,
    hard_negatives: torch.Tensor | None,
    temperature: float,
    positives: torch.Tensor | None,
    hard_negative_mask: torch.Tensor | None,
    target_mask: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """Check :func:`info_nce`'s arguments (one-line errors naming the argument) and return the
    positives' target rows (default ``0..B-1``)."""
    if query.dim() != 2 or target.dim() != 2 or query.shape[1] != target.shape[1]:
        raise ValueError(
            f"query (B, D) and target (M, D) expected, got {tuple(query.shape)}, {tuple(target.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    b, m = query.shape[0], target.shape[0]
    if positives is None:
        if m < b:
            raise ValueError(
                f"target has {m} rows for {b} queries: by default query i's positive is target row i, "
                "so give at least one target per query, or pass positives= (the target row of each "
                "query's positive)"
            )
        positives = torch.arange(b, device=query.device)
    elif positives.shape != (b,) or positives.dtype.is_floating_point or positives.dtype == torch.bool:
        raise ValueError(
            f"positives must be a ({b},) integer tensor (one target row per query), got "
            f"{positives.dtype} of shape {tuple(positives.shape)}"
        )
    elif positives.device.type == "cpu" and b and (int(positives.min()) < 0 or int(positives.max()) >= m):
        raise ValueError(
            f"positives must index the {m} target rows (0..{m - 1}), got values from "
            f"{int(positives.min())} to {int(positives.max())}"
        )
    if target_mask is not None:
        if target_mask.shape != (m,):
            raise ValueError(
                f"target_mask must be ({m},), one flag per target row, got shape {tuple(target_mask.shape)}"
            )
        if target_mask.device.type == "cpu" and positives.device.type == "cpu" and b:
            hidden = (~target_mask.to(torch.bool)[positives]).nonzero().flatten().tolist()
            if hidden:
                raise ValueError(
                    f"target_mask hides the positive of queries {hidden[:8]} (target rows "
                    f"{positives[hidden[:8]].tolist()}): their loss would be infinite; keep each "
                    "query's positive in target_mask (it only removes in-batch negatives)"
                )
    if hard_negatives is not None:
        if (
            hard_negatives.dim() != 3
            or hard_negatives.shape[0] != b
            or hard_negatives.shape[2] != query.shape[1]
        ):
            raise ValueError(
                f"hard_negatives must be (B={b}, k, D={query.shape[1]}), got {tuple(hard_negatives.shape)}"
            )
        if hard_negative_mask is not None and hard_negative_mask.shape != hard_negatives.shape[:2]:
            raise ValueError(
                f"hard_negative_mask must be {tuple(hard_negatives.shape[:2])} (B, k), got shape "
                f"{tuple(hard_negative_mask.shape)}"
            )
    return positives
