"""Block-diagonal ("varlen") attention over a packed stream, behind one function (DESIGN.md).

Backends, all giving the same numbers within floating-point tolerance:

* ``sdpa``  — PyTorch scaled-dot-product attention run per image; images of equal length are
  batched together, so a batch of same-size images costs one call. CPU default.
* ``flex``  — FlexAttention with a document mask (opt-in; compiled once per process).
* ``flash`` — ``flash_attn_varlen_func`` from the flash-attn package (CUDA, fp16/bf16).
* ``varlen`` — PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (the same flash kernel,
  shipped with torch >= 2.10; CUDA, fp16/bf16), for GPUs without the flash-attn package.

``auto`` picks ``flash``, then ``varlen``, when usable for the inputs (CUDA and a half-precision
compute dtype, autocast included), else ``sdpa``.
The per-batch bookkeeping (lengths, ``cu_seqlens``, masks) is built once on the host by
:func:`build_plan` and shared by every layer (docs/method.md §6: no per-layer host syncs).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash", "varlen")


@cache
def flash_available() -> bool:
    """True when the flash-attn package is importable."""
    return importlib.util.find_spec("flash_attn") is not None


@cache
def torch_varlen_available() -> bool:
    """True when this torch ships ``torch.nn.attention.varlen.varlen_attn``."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class AttentionPlan:
    """Host-side description of the packed sequence, computed once per batch."""

    lengths: list[int]
    backend: str
    device: torch.device
    cu_seqlens: torch.Tensor = field(init=False)
    max_seqlen: int = field(init=False)
    groups: list[tuple[int, list[int]]] = field(init=False)
    _block_mask: object = field(init=False, default=None)

    def __post_init__(self) -> None:
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        self.starts = starts
        self.total = starts[-1]
        self.cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=self.device)
        self.max_seqlen = max(self.lengths, default=0)
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            by_len.setdefault(n, []).append(i)
        self.groups = sorted(by_len.items())

    def block_mask(self):
        """FlexAttention document mask, built once per plan."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = torch.repeat_interleave(
                torch.arange(len(self.lengths), device=self.device),
                torch.tensor(self.lengths, device=self.device),
            )

            def same_doc(b, h, q_idx, kv_idx):
                return doc[q_idx] == doc[kv_idx]

            self._block_mask = create_block_mask(
                same_doc, B=None, H=None, Q_LEN=self.total, KV_LEN=self.total, device=self.device
            )
        return self._block_mask


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``auto`` into a concrete backend and validate explicit choices. Under autocast the
    compute dtype is autocast's, not the (float32) residual stream's."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    half_on_cuda = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        if half_on_cuda and flash_available():
            return "flash"
        return "varlen" if half_on_cuda and torch_varlen_available() else "sdpa"
    if backend == "flash" and not flash_available():
        raise RuntimeError("attention backend 'flash' needs the flash-attn package: pip install flash-attn")
    if backend == "varlen" and not (torch_varlen_available() and half_on_cuda):
        raise RuntimeError(
            f"attention backend 'varlen' needs torch >= 2.10 on CUDA in float16/bfloat16 (got {device.type}, "
            f"{dtype}); use attn='sdpa' or 'flex' here"
        )
    return backend


def build_plan(lengths: list[int], backend: str, device: torch.device, dtype: torch.dtype) -> AttentionPlan:
    """Plan for a packed sequence made of segments of ``lengths`` tokens."""
    return AttentionPlan([int(n) for n in lengths], resolve_backend(backend, device, dtype), device)


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Per-image SDPA. Segments are taken with ``split`` and equal-length ones batched with ``stack``, whose
    backward passes are single concatenations: slicing instead would zero a full-size gradient per image."""
    if len(plan.lengths) == 1:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return out.transpose(0, 1)
    qs, ks, vs = (t.split(plan.lengths) for t in (q, k, v))
    outs: list[torch.Tensor | None] = [None] * len(plan.lengths)
    for _, members in plan.groups:
        # (G, L, H, d) -> (G, H, L, d); a lone image needs no copy
        if len(members) == 1:
            qg, kg, vg = (seg[members[0]].unsqueeze(0).transpose(1, 2) for seg in (qs, ks, vs))
        else:
            qg, kg, vg = (torch.stack([seg[i] for i in members]).transpose(1, 2) for seg in (qs, ks, vs))
        out = F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2)
        for i, o in zip(members, out.unbind(0)):
            outs[i] = o
    return torch.cat(outs)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Attention where each token sees only its own segment. q, k, v: (N, heads, head_dim)."""
    if plan.backend == "sdpa":
        return _sdpa(q, k, v, plan)
    if plan.backend == "flex":
        out = _compiled_flex()(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            block_mask=plan.block_mask(),
        )
        return out.squeeze(0).transpose(0, 1)
    if plan.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen
        )
    if plan.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen)
    raise ValueError(f"unresolved attention backend {plan.backend!r}")
