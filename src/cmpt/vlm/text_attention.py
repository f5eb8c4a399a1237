"""Attention of the language-model body: causal or bidirectional, packed or padded rows (docs/method.md §7).

The body is any Hugging Face decoder (Qwen2/2.5, Llama, SmolLM, Qwen2-VL's text model, ...). cmpt
never patches its mask code; it uses the interface every transformers ≥ 5 decoder exposes:

* a **precomputed 4-D mask** passed as ``attention_mask`` is used as is by the model's mask
  builder — a boolean ``(B, 1, T, T)`` mask for ``sdpa``, an additive float mask for ``eager``, a
  FlexAttention ``BlockMask`` for ``flex_attention``;
* for flash-attention (``flash_attention_2`` / ``_3``, kernels), which takes no dense mask, packed
  rows are described by the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments and
  padded rows by the 2-D padding mask;
* ``is_causal`` on the attention modules (read by the flash and SDPA integrations when no mask is
  given) is set to the mode, and stays set: recomputation under activation checkpointing sees it.

A micro-batch's text is described by :class:`TextLayout`: the sequence lengths, and whether they
run **packed** (one row, positions restarting at 0 per sequence, block-diagonal attention) or
**padded** (one right-padded row per sequence). Either way the body's output is returned to the
caller as one ``(N, H)`` row per real token, so losses never see the difference.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from cmpt.host_tensor import host_tensor
from cmpt.vision.attention import build_plan
from cmpt.vlm.packed_sdpa import PACKED_SDPA

__all__ = [
    "ATTENTION_MODES",
    "AttentionMode",
    "TextLayout",
    "attn_implementation",
    "body_inputs",
    "packing_unsupported_reason",
    "pad_rows",
    "run_decoder_layer",
    "set_attention_mode",
    "unpad_rows",
]

AttentionMode = Literal["causal", "bidirectional"]
ATTENTION_MODES = ("causal", "bidirectional")
_DENSE = ("sdpa", "eager")


def attn_implementation(llm: nn.Module) -> str:
    """The attention implementation the model was loaded with (``sdpa``, ``eager``, ``flex_attention``,
    ``flash_attention_2``, ...), as stored on its config by ``from_pretrained``."""
    return str(getattr(llm.config, "_attn_implementation", None) or "eager")


def _is_flash(impl: str) -> bool:
    return "flash" in impl


def packing_unsupported_reason(llm: nn.Module, body: nn.Module) -> str | None:
    """Why the body cannot run packed rows, or None when it can (docs/method.md §7).

    Packing needs per-token ``position_ids`` and an attention implementation for which cmpt can
    express a block-diagonal mask (sdpa, eager, flex_attention, flash-attention).
    """
    impl = attn_implementation(llm)
    if impl not in (*_DENSE, PACKED_SDPA, "flex_attention") and not _is_flash(impl):
        return f"its attention implementation {impl!r} takes no block-diagonal mask"
    if "position_ids" not in inspect.signature(body.forward).parameters:
        return f"{type(body).__name__}.forward takes no position_ids"
    return None


def _attention_modules(body: nn.Module) -> list[nn.Module]:
    return [m for m in body.modules() if m is not body and isinstance(getattr(m, "is_causal", None), bool)]


def set_attention_mode(body: nn.Module, mode: AttentionMode) -> None:
    """Set ``is_causal`` on every attention module of ``body`` (``mode`` stays until changed).

    Raises ``ValueError`` for an unknown mode, or for ``bidirectional`` when the body has no
    attention module with an ``is_causal`` flag (its causality could not be switched off).
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    mods = _attention_modules(body)
    if not mods and mode == "bidirectional":
        raise ValueError(
            f"{type(body).__name__} has no attention module with an `is_causal` flag: bidirectional "
            "attention is supported for transformers decoders (Qwen2/2.5, Llama, SmolLM, Qwen2-VL)"
        )
    for m in mods:
        m.is_causal = mode == "causal"


@dataclass(frozen=True)
class TextLayout:
    """The sequences of a micro-batch: their ``lengths`` and whether they run ``packed`` in one row."""

    lengths: tuple[int, ...]
    packed: bool

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor | Sequence[int], packed: bool) -> TextLayout:
        """Lengths from cumulative boundaries ``[0, l0, l0 + l1, ...]`` (one host read)."""
        cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        if not cu or cu[0] != 0 or any(b < a for a, b in itertools.pairwise(cu)):
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu}")
        return cls(tuple(int(b - a) for a, b in itertools.pairwise(cu)), packed)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def width(self) -> int:
        """Row length of the padded layout."""
        return max(self.lengths, default=0)

    @property
    def positions_computed(self) -> int:
        """Token positions the body computes: ``total`` packed, ``rows × width`` padded."""
        return self.total if self.packed else len(self.lengths) * self.width

    def sequence_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(N,)``: the index of the sequence each token belongs to."""
        lens = host_tensor(self.lengths, device)
        return torch.repeat_interleave(
            torch.arange(len(self.lengths), device=device), lens, output_size=self.total
        )

    def position_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(1, N)`` restarting at 0 per sequence (packed) or ``(B, T)`` ``0..T-1`` (padded)."""
        if not self.packed:
            return torch.arange(self.width, device=device).expand(len(self.lengths), -1)
        pos = [torch.arange(n, device=device) for n in self.lengths]
        return torch.cat(pos).unsqueeze(0) if pos else torch.zeros(1, 0, dtype=torch.long, device=device)

    def padding_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(B, T)`` long, 1 on real tokens (right padding)."""
        lens = host_tensor(self.lengths, device)
        return (torch.arange(self.width, device=device)[None, :] < lens[:, None]).long()

    def cu_seqlens(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(B + 1,)`` int32 cumulative boundaries."""
        lens = host_tensor([0, *self.lengths], device, torch.int32)
        return lens.cumsum(0, dtype=torch.int32)


def pad_rows(x: torch.Tensor, layout: TextLayout, value: float | int = 0) -> torch.Tensor:
    """``(N, ...)`` packed tokens → ``(B, T, ...)`` right-padded rows of ``layout``."""
    out = x.new_full((len(layout.lengths), layout.width, *x.shape[1:]), value)
    keep = layout.padding_mask(x.device).bool()
    out[keep] = x
    return out


def unpad_rows(x: torch.Tensor, layout: TextLayout) -> torch.Tensor:
    """``(B, T, ...)`` right-padded rows → ``(N, ...)`` real tokens (inverse of :func:`pad_rows`)."""
    return x[layout.padding_mask(x.device).bool()]


def _allowed(layout: TextLayout, causal: bool, device: torch.device) -> torch.Tensor:
    """Boolean ``(B, 1, T, T)``: query ``q`` may attend to key ``k`` (True)."""
    if layout.packed:
        seq = layout.sequence_ids(device)
        allowed = seq[:, None] == seq[None, :]
        n = seq.numel()
    else:
        n = layout.width
        allowed = layout.padding_mask(device).bool()[:, None, :].expand(-1, n, -1)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    # a padding query attends to itself only, so that no softmax row is empty
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=device)
    return allowed.reshape(-1, 1, n, n)


def _block_mask(layout: TextLayout, causal: bool, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    if layout.packed:
        seq = layout.sequence_ids(device)

        def mask_mod(b, h, q, kv):
            same = seq[q] == seq[kv]
            return same & (q >= kv) if causal else same

        rows, n = 1, seq.numel()
    else:
        valid = layout.padding_mask(device).bool()

        def mask_mod(b, h, q, kv):
            ok = valid[b, kv] & (q >= kv) if causal else valid[b, kv]
            return ok | (q == kv)

        rows, n = len(layout.lengths), layout.width
    return create_block_mask(mask_mod, rows, None, n, n, device=device)


def body_inputs(
    layout: TextLayout,
    impl: str,
    mode: AttentionMode,
    dtype: torch.dtype,
    device: torch.device,
    packed_backend: str = "auto",
) -> dict[str, Any]:
    """Keyword arguments for the body's ``forward``: ``attention_mask``, ``position_ids`` and, for
    packed rows, ``packed_plan`` (:data:`~cmpt.vlm.packed_sdpa.PACKED_SDPA`: no mask at all) or
    ``cu_seq_lens_q/k`` and ``max_length_q/k`` (flash-attention) (docs/method.md §7).
    ``packed_backend``: the ``varlen_attention`` backend of that plan."""
    causal = mode == "causal"
    kwargs: dict[str, Any] = {"position_ids": layout.position_ids(device)}
    if impl == PACKED_SDPA and layout.packed:
        plan = build_plan(list(layout.lengths), packed_backend, device, dtype)
        kwargs.update(attention_mask=None, packed_plan=plan)
    elif impl in (*_DENSE, PACKED_SDPA):
        allowed = _allowed(layout, causal, device)
        if impl == "eager":
            zero = torch.zeros((), dtype=dtype, device=device)
            allowed = torch.where(allowed, zero, torch.finfo(dtype).min)
        kwargs["attention_mask"] = allowed
    elif impl == "flex_attention":
        kwargs["attention_mask"] = _block_mask(layout, causal, device)
    elif _is_flash(impl) and layout.packed:
        cu = layout.cu_seqlens(device)
        kwargs.update(
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=layout.width, max_length_k=layout.width
        )
        kwargs["attention_mask"] = None
    elif not layout.packed and (causal or _is_flash(impl)):
        kwargs["attention_mask"] = layout.padding_mask(device)  # the model builds its own causal mask
    else:
        raise ValueError(
            f"attention implementation {impl!r}: cmpt cannot build a {'packed' if layout.packed else mode} "
            "mask for it; load the language model with attn_implementation='sdpa', 'eager' or "
            "'flex_attention'"
        )
    return kwargs


def run_decoder_layer(
    body: nn.Module, layer: nn.Module, hidden: torch.Tensor, layout: TextLayout, body_kwargs: dict[str, Any]
) -> torch.Tensor:
    """Run one decoder ``layer`` of the body's kind over ``hidden`` ``(N, H)`` with the mask and
    positions the body ran with (``body_kwargs`` from :func:`body_inputs`); returns ``(N, H)``.

    The rotary embedding is the body's own (``body.rotary_emb``, M-RoPE for Qwen2-VL), so the
    layer sees the positions of the forward it extends (MoCa's MAE decoder, docs/method.md §3).
    M-RoPE ids ``(3, rows, T)`` reach the layer only through the rotary embedding, as in the
    Qwen2-VL text model, which gives its layers no ``position_ids`` for them.
    """
    rows = hidden.unsqueeze(0) if layout.packed else pad_rows(hidden, layout)
    pos = body_kwargs["position_ids"]
    extra = {k: v for k, v in body_kwargs.items() if k not in ("position_ids", "attention_mask")}
    out = layer(
        rows,
        attention_mask=body_kwargs.get("attention_mask"),
        position_ids=None if pos.ndim == 3 else pos,
        position_embeddings=body.rotary_emb(rows, pos),
        use_cache=False,
        **extra,
    )
    out = out[0] if isinstance(out, tuple) else out
    return out[0] if layout.packed else unpad_rows(out, layout)
