"""Packed rows without an N×N mask: block-diagonal attention as a transformers attention function
(docs/method.md §7 "How the mask reaches the decoder").

A block-diagonal mask handed to SDPA as a dense ``(1, 1, N, N)`` tensor makes packing *slower* than
padding: every layer attends over the whole row and keeps its own copy of the mask for backward
(measured: 0.47× the padded throughput on the tiny stage-II step, 678 MiB of mask per micro-batch
at CoMP-MM stage-II shapes). Instead, a body whose implementation is ``sdpa`` switches, while its
text runs packed, to :data:`PACKED_SDPA`, registered with transformers' public
``AttentionInterface``: given ``packed_plan`` (the sequences' boundaries, made once per forward) it
runs :func:`cmpt.vision.attention.varlen_attention`, causal or not from the module's ``is_causal``
— one varlen kernel on CUDA in half precision, one ``cmpt::varlen_sdpa`` operator on the CPU, so
the work is ``Σ lᵢ²``, no mask exists and ``torch.compile`` does not guard on the lengths
(§6 "Compiled blocks"). Without a plan (generation, padded rows) it is transformers' own SDPA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from cmpt.vision.attention import AttentionPlan, varlen_attention

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
    packed_plan: AttentionPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``(1, H, N, D)`` query / ``(1, H_kv, N, D)`` key and value of one packed row → ``(1, N, H, D)``.

    Without ``packed_plan`` this is transformers' ``sdpa_attention_forward`` unchanged.
    """
    if packed_plan is None:
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
    if dropout and module.training:
        raise ValueError(
            f"packed text runs attention without dropout, but the model's attention dropout is {dropout}: "
            "set the language model's attention_dropout to 0, or data.packing: false"
        )
    window = kwargs.get("sliding_window")
    if window is not None and packed_plan.max_seqlen > window:
        raise ValueError(
            f"packed text attends over whole sequences, but this layer has a sliding window of {window} "
            f"tokens and a sequence of {packed_plan.max_seqlen}: set data.packing: false"
        )
    causal = bool(getattr(module, "is_causal", True)) if is_causal is None else is_causal
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, head_dim)
    return varlen_attention(q, k, v, packed_plan, causal=causal, scale=scaling).unsqueeze(0), None


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
