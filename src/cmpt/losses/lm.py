"""Next-token loss ``L_dec`` without full-vocabulary logits (docs/method.md §2, §6 "LM-head memory").

Logits are only ever computed for *supervised* positions: labels are shifted, the hidden
states at supervised positions are gathered first, and the LM head is applied to them in chunks
of ``chunk_size`` rows. With ``checkpoint=True`` (default) each chunk's logits are recomputed in
the backward pass instead of being kept alive, so peak memory is one chunk of ``chunk × V``
float32 logits whatever the number of supervised tokens. With ``impl="liger"`` (or ``"auto"`` on
CUDA with liger-kernel installed) the supervised rows go to Liger's fused linear cross-entropy
instead (:mod:`cmpt.losses.fused_ce`): same rows, same targets, same sum.

The function returns the *sum* of the token losses and the token count, so that a trainer can
normalize by the global number of supervised tokens across ranks (docs/method.md §6 "Loss normalization").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from cmpt.host_tensor import host_tensor, to_device_async
from cmpt.losses.fused_ce import fused_linear_ce_sum, resolve_lm_impl

__all__ = ["next_token_loss", "shift_labels"]


def _chunk_ce_sum(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Summed cross-entropy of one chunk; logits upcast to (at least) float32 before the softmax."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum")


def _chunked_ce_sum(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_size: int,
    checkpoint: bool,
) -> torch.Tensor:
    """Summed cross-entropy of the rows ``(n ≥ 1, H)`` in chunks of ``chunk_size`` rows, each chunk
    recomputed in backward when ``checkpoint`` and gradients are on and there is more than one."""
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    use_ckpt = checkpoint and needs_grad and hidden.shape[0] > chunk_size
    total: torch.Tensor | None = None
    for start in range(0, hidden.shape[0], chunk_size):
        h_chunk, y_chunk = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if use_ckpt:
            part = _checkpoint(_chunk_ce_sum, h_chunk, y_chunk, weight, bias, use_reentrant=False)
        else:
            part = _chunk_ce_sum(h_chunk, y_chunk, weight, bias)
        total = part if total is None else total + part
    assert total is not None
    return total


def shift_labels(labels: torch.Tensor, lengths: Sequence[int], ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets of packed sequences: ``out[t] = labels[t + 1]`` inside each sequence and
    ``ignore_index`` at each sequence's last token (docs/method.md §7), so a packed row gives the
    same (position, target) pairs as one padded row per sequence.

    ``labels`` ``(N,)`` holds the sequences of ``lengths`` (summing to ``N``) back to back.
    """
    if labels.dim() != 1 or labels.numel() != sum(lengths):
        raise ValueError(
            f"labels must be (N,) with N = sum(lengths) = {sum(lengths)}, got {tuple(labels.shape)}"
        )
    out = labels.new_full(labels.shape, ignore_index)
    out[:-1] = labels[1:]
    ends, pos = [], 0
    for n in lengths:
        pos += int(n)
        if n > 0:
            ends.append(pos - 1)
    out[host_tensor(ends, labels.device)] = ignore_index
    return out


def next_token_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    shift: bool = True,
    reduction: str = "sum",
    checkpoint: bool = True,
    impl: str = "chunked",
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the LM head on supervised positions only (docs/method.md §2 ``L_dec``).

    Args:
        hidden: ``(B, T, H)`` or ``(T, H)`` final hidden states of the language model.
        labels: ``(B, T)`` or ``(T,)`` token ids, ``ignore_index`` where unsupervised; on the
            host or on ``hidden``'s device (on the host, finding and checking the supervised
            positions never waits for the device, docs/method.md §7).
        lm_head_weight: ``(V, H)`` LM-head weight; ``lm_head_bias``: optional ``(V,)``.
        ignore_index: label value of unsupervised positions.
        chunk_size: at most this many rows of logits are built at once.
        shift: if True, position ``t`` predicts ``labels[t + 1]`` (causal LM); if False the
            label is at the same position (e.g. masked LM).
        reduction: ``"sum"`` (default) — summed loss; ``"mean"`` — sum / max(count, 1).
        checkpoint: recompute each chunk's logits in backward (memory-bounded) when more than
            one chunk is needed and gradients are enabled.
        impl: ``"chunked"`` (the loop above), ``"liger"`` (Liger's fused kernel, CUDA only) or
            ``"auto"`` (liger on CUDA when it imports); see :mod:`cmpt.losses.fused_ce`.

    Returns:
        ``(loss, count)``: scalar loss (float32, or float64 for float64 inputs) and the number of
        supervised tokens. Logits are computed in the LM head's dtype (bf16 in mixed-precision
        training) and upcast to float32 for the cross-entropy. With no
        supervised token the loss is ``0 · (hidden.sum() + weight.sum() [+ bias.sum()])`` — a
        zero still connected to the graph so that DDP/FSDP see every parameter used.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, H) or (T, H), got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden shape without the last dim "
            f"{tuple(hidden.shape[:-1])}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be (V, H={hidden.shape[-1]}), got shape {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must be ({vocab},), got shape {tuple(lm_head_bias.shape)}")
    resolved = resolve_lm_impl(impl, hidden.device)

    h3 = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    y2 = labels if labels.dim() == 2 else labels.unsqueeze(0)
    if shift:  # position t predicts labels[t + 1]: hidden row t keeps its index
        y2 = y2[:, 1:]
    # the supervised rows, found where the labels are (on the host when the batch keeps them
    # there: no device read-back), then gathered from the hidden states by index
    b, t = (y2 != ignore_index).nonzero(as_tuple=True)
    y_sel = y2[b, t].long()
    count = int(y_sel.numel())
    rows = to_device_async(b * h3.shape[1] + t, hidden.device)
    h_sel = h3.reshape(-1, h3.shape[-1]).index_select(0, rows)  # (n, H): only the rows that get logits

    if count == 0:
        zero = hidden.sum() + lm_head_weight.sum()
        if lm_head_bias is not None:
            zero = zero + lm_head_bias.sum()
        return zero.to(torch.promote_types(zero.dtype, torch.float32)) * 0.0, 0
    if bool(((y_sel < 0) | (y_sel >= vocab)).any()):
        bad = y_sel[(y_sel < 0) | (y_sel >= vocab)][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {vocab}) and is not ignore_index")
    y_sel = to_device_async(y_sel, hidden.device)
    if resolved == "liger":
        total = fused_linear_ce_sum(h_sel, y_sel, lm_head_weight, lm_head_bias)
    else:
        total = _chunked_ce_sum(h_sel, y_sel, lm_head_weight, lm_head_bias, chunk_size, checkpoint)
    if reduction == "mean":
        total = total / count
    return total, count
