"""``cmpt::varlen_sdpa``: block-diagonal attention on the CPU as one PyTorch operator with its own
backward (docs/method.md §6 "Compiled blocks").

Run as a Python loop over segments, ``torch.compile`` guards each compiled block on the number and
lengths of the segments of every batch and recompiles until dynamo's limit, after which the blocks
run eagerly. As an operator the loop is opaque to the compiler: the segments' boundaries are a
tensor (``cu_seqlens``, whose values are never guarded on) and the blocks compile once for dynamic
shapes. Forward and backward call PyTorch's CPU flash-attention kernels
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``, what
``scaled_dot_product_attention`` itself runs on the CPU without a mask), one call per run of
consecutive equal-length segments (a batch of same-size images: one call), on views of the
inputs (nothing is copied but the results). The forward keeps the log-sum-exp the backward kernel needs, so
nothing is recomputed.

Layout: ``q`` ``(N, H, D)``, ``k, v`` ``(N, H_kv, D)`` (``H`` a multiple of ``H_kv``: the kernels
group query heads natively), ``cu_seqlens`` ``(B + 1,)`` integer boundaries, ``cu_seqlens[-1] == N``.
"""

from __future__ import annotations

import itertools

import torch

__all__ = ["varlen_sdpa"]

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The kernels' log-sum-exp dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _runs(cu_seqlens: torch.Tensor, total: int) -> list[tuple[int, int, int]]:
    """``[(start, count, length), ...]``: maximal runs of consecutive non-empty segments of one length."""
    cu = cu_seqlens.tolist()
    if not cu or cu[0] != 0 or cu[-1] != total or any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(f"cu_seqlens {cu} do not cut {total} tokens into segments")
    runs: list[tuple[int, int, int]] = []
    for a, b in itertools.pairwise(cu):
        if b == a:
            continue
        if runs and runs[-1][2] == b - a and runs[-1][0] + runs[-1][1] * (b - a) == a:
            start, count, n = runs[-1]
            runs[-1] = (start, count + 1, n)
        else:
            runs.append((a, 1, b - a))
    return runs


def _gather(x: torch.Tensor, start: int, count: int, n: int) -> torch.Tensor:
    """``(N, H, ...)`` → ``(count, H, n, ...)``: a run of segments, as a view (no copy)."""
    return x[start : start + count * n].unflatten(0, (count, n)).transpose(1, 2)


def _scatter(dst: torch.Tensor, src: torch.Tensor, start: int, count: int, n: int) -> None:
    """Inverse of :func:`_gather`: ``src`` ``(count, H, n, ...)`` into the rows of ``dst``."""
    dst[start : start + count * n].unflatten(0, (count, n)).copy_(src.transpose(1, 2))


@torch.library.custom_op("cmpt::varlen_sdpa", mutates_args=(), device_types="cpu")
def varlen_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each token to its own segment: ``(out (N, H, D), lse (N, H))``."""
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:2], dtype=_lse_dtype(q))
    for run in _runs(cu_seqlens, q.shape[0]):
        o, m = _FORWARD(*(_gather(t, *run) for t in (q, k, v)), 0.0, causal, scale=scale)
        _scatter(out, o, *run)
        _scatter(lse, m, *run)
    return out, lse


@varlen_sdpa.register_fake
def _varlen_sdpa_fake(q, k, v, cu_seqlens, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=_lse_dtype(q))


@torch.library.custom_op("cmpt::varlen_sdpa_backward", mutates_args=(), device_types="cpu")
def varlen_sdpa_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`varlen_sdpa` with respect to ``q, k, v``."""
    grads = tuple(t.new_empty(t.shape) for t in (q, k, v))
    for run in _runs(cu_seqlens, q.shape[0]):
        seg = [_gather(t, *run) for t in (grad_out, q, k, v, out)]
        m = _gather(lse, *run).contiguous()
        for dst, g in zip(grads, _BACKWARD(*seg, m, 0.0, causal, scale=scale)):
            _scatter(dst, g, *run)
    return grads


@varlen_sdpa_backward.register_fake
def _varlen_sdpa_backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, causal, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = varlen_sdpa_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


varlen_sdpa.register_autograd(_backward, setup_context=_setup_context)
