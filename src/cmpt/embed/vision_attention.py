"""Packed attention for a Hugging Face Qwen2-VL / Qwen2.5-VL vision tower (docs/method.md §6
"Vision attention of Qwen-VL backbones").

transformers runs the tower's attention segments (each image in the full-attention blocks; each
window — 8×8 patches, cut at image edges — in Qwen2.5-VL's windowed blocks) as one SDPA call per
segment, after copying their lengths to the host in every block, unless the implementation is
flash-attn: a 1,024-patch image is 16 windows, so a Qwen2.5-VL-3B micro-batch of 8 such images runs
128 tiny SDPA calls in each of 28 blocks. Only an implementation whose name contains "flash" is
handed the segments' ``cu_seqlens``, so :data:`VISION_VARLEN` is registered under such a name with
transformers' public ``AttentionInterface`` and runs cmpt's
:func:`~cmpt.vision.attention.varlen_attention` instead: one varlen kernel on CUDA in half
precision (flash-attn, or torch's own), equal-length segments batched into one SDPA call elsewhere.
The plan (segment lengths on the host) is made once per ``cu_seqlens`` tensor — the tower makes one
for its windows and one for its images per forward — and reused by every block.
"""

from __future__ import annotations

import math
import weakref
from collections import deque

import torch
from torch import nn
from transformers import AttentionInterface

from ..vision.attention import BACKENDS, AttentionPlan, build_plan, varlen_attention

__all__ = ["VISION_VARLEN", "set_vision_attention", "vision_varlen_forward"]

#: the registered implementation; "flash" in the name makes transformers pass ``cu_seqlens``
VISION_VARLEN = "cmpt_flash_varlen"
_BACKEND = "cmpt_attn_backend"  # attribute of each attention module: its varlen_attention backend
_HF_IMPL = "cmpt_hf_attn_implementation"  # attribute of the tower: transformers' own implementation
_PLANS: deque[tuple[weakref.ref, tuple, AttentionPlan]] = deque(maxlen=4)


def _plan(cu_seqlens: torch.Tensor | None, total: int, backend: str, query: torch.Tensor) -> AttentionPlan:
    """The plan of the segments ``cu_seqlens`` marks (one segment of ``total`` tokens when None)."""
    key = (backend, query.device, query.dtype, torch.is_autocast_enabled(query.device.type), total)
    for ref, k, plan in _PLANS:
        if cu_seqlens is not None and ref() is cu_seqlens and k == key:
            return plan
    lengths = [total] if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    plan = build_plan(lengths, backend, query.device, query.dtype)
    if cu_seqlens is not None:
        _PLANS.append((weakref.ref(cu_seqlens), key, plan))
    return plan


@torch.compiler.disable  # host-side plan and one kernel: nothing to fuse, and no guards on the plan
def vision_varlen_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``(1, heads, N, head_dim)`` query / key / value of the packed patches → ``(1, N, heads,
    head_dim)``, each patch attending within its segment of ``cu_seq_lens_q``."""
    n, d = query.shape[2], query.shape[3]
    if attention_mask is not None or is_causal or (dropout and module.training):
        raise ValueError(f"{VISION_VARLEN} runs unmasked, non-causal attention without dropout")
    if scaling is not None and not math.isclose(scaling, d**-0.5, rel_tol=1e-6):
        raise ValueError(f"{VISION_VARLEN} uses the scale 1/sqrt(head_dim), got {scaling}")
    same = cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q  # what transformers passes
    if not (same or torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise ValueError(f"{VISION_VARLEN}: query and key segments differ")
    plan = _plan(cu_seq_lens_q, n, getattr(module, _BACKEND, "auto"), query)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, head_dim)
    return varlen_attention(q, k, v, plan).unsqueeze(0), None


AttentionInterface.register(VISION_VARLEN, vision_varlen_forward)


def set_vision_attention(visual: nn.Module, backend: str | None) -> None:
    """Run the attention of the tower ``visual`` (``model.visual``) through :data:`VISION_VARLEN` with
    ``backend`` (one of :data:`cmpt.vision.attention.BACKENDS`), or ``None``: transformers' own
    implementation again. The implementation is set on the tower's config, which its blocks share
    (transformers' ``set_attn_implementation`` refuses a name with "flash" it does not know); it is
    not written by ``save_pretrained``."""
    config = visual.config
    if not hasattr(visual, _HF_IMPL):
        setattr(visual, _HF_IMPL, config._attn_implementation)
    if backend is None:
        config._attn_implementation = getattr(visual, _HF_IMPL)
        return
    if backend not in BACKENDS:
        raise ValueError(f"unknown vision attention backend {backend!r}; choose one of {BACKENDS}")
    config._attn_implementation = VISION_VARLEN
    for m in visual.modules():
        if getattr(m, "config", None) is config and hasattr(m, "scaling"):  # the attention modules
            setattr(m, _BACKEND, backend)
