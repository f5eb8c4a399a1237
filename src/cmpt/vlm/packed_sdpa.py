"""Packed rows without an N×N mask: SDPA per sequence, as a transformers attention function
(docs/method.md §7 "How the mask reaches the decoder").

A block-diagonal mask handed to SDPA as a dense ``(1, 1, N, N)`` tensor makes packing *slower* than
padding: every layer attends over the whole row and keeps its own copy of the mask for backward
(measured: 0.47× the padded throughput on the tiny stage-II step, 678 MiB of mask per micro-batch
at CoMP-MM stage-II shapes). Instead, a body whose implementation is ``sdpa`` switches, while its
text runs packed, to :data:`PACKED_SDPA`, registered with transformers' public
``AttentionInterface``: given ``packed_lengths`` it runs ``scaled_dot_product_attention`` on each
sequence's slice of the row (causal or not, from the module's ``is_causal``), so the work is
``Σ lᵢ²`` and no mask exists; without them (generation, padded rows) it is transformers' own SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["PACKED_SDPA", "implementation_for", "packed_sdpa_forward", "standard_attention"]

PACKED_SDPA = "cmpt_packed_sdpa"


def packed_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    packed_lengths: Sequence[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``(1, H, N, D)`` query / ``(1, H_kv, N, D)`` key and value of one packed row → ``(1, N, H, D)``.

    Without ``packed_lengths`` this is transformers' ``sdpa_attention_forward`` unchanged.
    """
    if packed_lengths is None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    if query.shape[0] != 1 or sum(packed_lengths) != query.shape[2]:
        raise ValueError(f"packed_lengths {list(packed_lengths)} do not cut a row of {query.shape[2]} tokens")
    causal = bool(getattr(module, "is_causal", True)) if is_causal is None else is_causal
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    outs, start = [], 0
    for n in packed_lengths:
        if n == 0:
            continue
        sl = slice(start, start + n)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, sl], key[:, :, sl], value[:, :, sl], dropout_p=p, is_causal=causal,
                scale=scaling, enable_gqa=gqa,
            )
        )  # fmt: skip
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)


def implementation_for(impl: str, packed: bool) -> str:
    """The implementation a body should run with: :data:`PACKED_SDPA` for packed ``sdpa``, ``sdpa``
    again when packing is off, anything else unchanged."""
    if packed and impl == "sdpa":
        return PACKED_SDPA
    if not packed and impl == PACKED_SDPA:
        return "sdpa"
    return impl


@contextlib.contextmanager
def standard_attention(body: nn.Module) -> Iterator[None]:
    """Run transformers' own SDPA inside (e.g. ``generate``, which builds its own padding masks)."""
    packed = body.config._attn_implementation == PACKED_SDPA
    if packed:
        body.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if packed:
            body.set_attn_implementation(PACKED_SDPA)
