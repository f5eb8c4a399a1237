"""Block-diagonal ("varlen") attention over a packed stream, behind one function (docs/architecture.md).

Backends, all giving the same numbers within floating-point tolerance:

* ``sdpa``  — PyTorch scaled-dot-product attention run per segment; segments of equal length
  are batched together, so a batch of same-size images costs one call. On the CPU it is one
  operator, ``cmpt::varlen_sdpa`` (:mod:`cmpt.vision.varlen_op`), that ``torch.compile`` does not
  guard on. CPU default.
* ``flex``  — FlexAttention with a document mask (opt-in; compiled once per process).
* ``flash`` — ``flash_attn_varlen_func`` from the flash-attn package (CUDA, fp16/bf16).
* ``varlen`` — PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (the same flash kernel,
  shipped with torch >= 2.10; CUDA, fp16/bf16), for GPUs without the flash-attn package.

``auto`` picks ``flash``, then ``varlen``, when usable for the inputs (CUDA and a half-precision
compute dtype, autocast included), else ``sdpa``. Whether a backend can run is one rule,
:func:`backend_problem`: :func:`check_backend` applies it before a run is built (a ``ValueError``
naming the option, one line and exit 2 on the command line) and :func:`resolve_backend` when
attention runs (a ``RuntimeError``). Every backend takes ``causal`` (the packed text
of §7 runs here too), a ``scale`` and fewer key/value heads than query heads (grouped queries).
The per-batch bookkeeping (lengths, ``cu_seqlens``, masks) is built once on the host by
:func:`build_plan` and shared by every layer (docs/method.md §6: no per-layer host syncs).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cmpt.host_tensor import host_tensor

from .varlen_op import varlen_sdpa

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

BACKENDS = ("auto", "sdpa", "flex", "flash", "varlen")


@cache
def flash_available() -> bool:
    """True when the flash-attn package is importable."""
    return importlib.util.find_spec("flash_attn") is not None


try:  # torch >= 2.10; its keyword arguments changed between releases: read once, outside compiled code
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn

    _VARLEN_OPTIONS = frozenset(inspect.signature(_torch_varlen_attn).parameters)
except ImportError:
    _torch_varlen_attn, _VARLEN_OPTIONS = None, frozenset()


def torch_varlen_available() -> bool:
    """True when this torch ships ``torch.nn.attention.varlen.varlen_attn``."""
    return _torch_varlen_attn is not None


@dataclass
class AttentionPlan:
    """Host-side description of the packed sequence, computed once per batch."""

    lengths: list[int]
    backend: str
    device: torch.device
    cu_seqlens: torch.Tensor = field(init=False)
    max_seqlen: int = field(init=False)
    groups: list[tuple[int, list[int]]] = field(init=False)
    _block_masks: dict[bool, object] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        self.starts = starts
        self.total = starts[-1]
        self.cu_seqlens = host_tensor(starts, self.device, torch.int32)
        self.max_seqlen = max(self.lengths, default=0)
        by_len: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            by_len.setdefault(n, []).append(i)
        self.groups = sorted(by_len.items())

    def block_mask(self, causal: bool = False) -> BlockMask:
        """FlexAttention document mask (causal within each segment or not), built once per plan."""
        if causal not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = torch.repeat_interleave(
                torch.arange(len(self.lengths), device=self.device),
                host_tensor(self.lengths, self.device),
                output_size=self.total,  # without it, a read-back of the device
            )

            def same_doc(b, h, q_idx, kv_idx):
                same = doc[q_idx] == doc[kv_idx]
                return same & (q_idx >= kv_idx) if causal else same

            self._block_masks[causal] = create_block_mask(
                same_doc, B=None, H=None, Q_LEN=self.total, KV_LEN=self.total, device=self.device
            )
        return self._block_masks[causal]


#: what each kernel backend needs besides CUDA and a float16/bfloat16 compute dtype, and how it
#: reads when it is missing
_NEEDS = {
    "flash": ("the flash-attn package", "flash-attn is not installed"),
    "varlen": ("torch >= 2.10 (torch.nn.attention.varlen)", f"this torch ({torch.__version__}) lacks it"),
}


class BackendUnavailableError(ValueError):
    """An attention backend the run's device cannot use, named before anything is built: the
    user's choice, so the command line reports it in one line (exit status 2)."""


def backend_problem(backend: str, device_type: str, half: bool | None = None) -> str | None:
    """Why ``backend`` cannot run on a ``device_type`` device, or None when it can: the one
    availability rule behind :func:`check_backend` (before a run) and :func:`resolve_backend`
    (when attention runs). ``flash`` and ``varlen`` are CUDA kernels in float16/bfloat16 (``half``:
    whether the compute dtype is; None when not known yet) that need :data:`_NEEDS`; ``auto``,
    ``sdpa`` and ``flex`` run anywhere (docs/method.md §1.1)."""
    if backend not in _NEEDS:
        return None
    needs, missing = _NEEDS[backend]
    installed = flash_available() if backend == "flash" else torch_varlen_available()
    here = [] if installed else [missing]
    if device_type != "cuda":
        here.append(f"the device is {device_type}")
    elif half is False:
        here.append("the compute dtype is not float16/bfloat16")
    if not here:
        return None
    return f"attention backend {backend!r} needs {needs} on CUDA in float16/bfloat16 (here {', '.join(here)})"


def check_backend(backend: str, device_type: str, key: str = "attn", half: bool | None = None) -> None:
    """Refuse, before any model is built, an attention ``backend`` (the value of the option or
    config ``key``, e.g. ``model.attn``) that cannot run where the work runs (``device_type``;
    ``half`` as in :func:`backend_problem`): a :class:`BackendUnavailableError` naming the key,
    why, and what works here. ``auto`` always passes (it picks what works, docs/method.md §1.1)."""
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"{key}={backend!r}: unknown attention backend; use one of {BACKENDS}")
    problem = backend_problem(backend, device_type, half)
    if problem:
        raise BackendUnavailableError(f"{key}={backend}: {problem}; use auto, sdpa or flex here")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``auto`` into a concrete backend and validate explicit choices (:func:`backend_problem`:
    a ``RuntimeError`` for one that cannot run here). Under autocast the compute dtype is
    autocast's, not the (float32) residual stream's."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "auto":
        usable = [b for b in ("flash", "varlen") if backend_problem(b, device.type, half) is None]
        return usable[0] if usable else "sdpa"
    if problem := backend_problem(backend, device.type, half):
        raise RuntimeError(f"{problem}; use attn='sdpa' or 'flex' here")
    return backend


def build_plan(lengths: list[int], backend: str, device: torch.device, dtype: torch.dtype) -> AttentionPlan:
    """Plan for a packed sequence made of segments of ``lengths`` tokens."""
    return AttentionPlan([int(n) for n in lengths], resolve_backend(backend, device, dtype), device)


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, causal: bool, scale: float | None
) -> torch.Tensor:
    """Per-segment SDPA: one ``cmpt::varlen_sdpa`` operator on the CPU, a loop elsewhere (CUDA in
    float32)."""
    if q.device.type != "cpu":
        return sdpa_loop(q, k, v, plan, causal, scale)
    return varlen_sdpa(q, k, v, plan.cu_seqlens, causal, q.shape[-1] ** -0.5 if scale is None else scale)[0]


def sdpa_loop(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, causal: bool, scale: float | None
) -> torch.Tensor:
    """``scaled_dot_product_attention`` per group of equal-length segments, in Python (what
    ``torch.compile`` guards on). Segments are taken with ``split`` and batched with ``stack``, whose
    backward passes are single concatenations: slicing instead would zero a full-size gradient per
    segment. Empty segments (an empty text) get an empty output without a kernel call, which not
    every CUDA kernel accepts."""
    gqa = k.shape[1] != q.shape[1]
    qs, ks, vs = (t.split(plan.lengths) for t in (q, k, v))
    outs: list[torch.Tensor | None] = [None] * len(plan.lengths)
    for length, members in plan.groups:
        # (G, L, H, d) -> (G, H, L, d); a lone segment needs no copy
        if length == 0:
            for i in members:
                outs[i] = v.new_empty((0, q.shape[1], v.shape[-1]))
            continue
        if len(members) == 1:
            qg, kg, vg = (seg[members[0]].unsqueeze(0).transpose(1, 2) for seg in (qs, ks, vs))
        else:
            qg, kg, vg = (torch.stack([seg[i] for i in members]).transpose(1, 2) for seg in (qs, ks, vs))
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale, enable_gqa=gqa)
        for i, o in zip(members, out.transpose(1, 2).unbind(0)):
            outs[i] = o
    return torch.cat(outs)


def _expand_heads(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(N, H_kv, D)`` → ``(N, H_q, D)``: each key/value head repeated for its group of query heads."""
    return kv if kv.shape[1] == q.shape[1] else kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)


def _torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, causal: bool, scale: float | None
) -> torch.Tensor:
    """torch's ``varlen_attn``, whichever of its signatures (``is_causal`` in 2.10/2.11,
    ``window_size``, ``scale`` and ``enable_gqa`` later) this torch has."""
    kwargs: dict = {}
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6 * scale:  # not the default
        if "scale" not in _VARLEN_OPTIONS:
            raise RuntimeError("this torch's varlen_attn takes no scale; use attn='sdpa' or upgrade torch")
        kwargs["scale"] = scale
    if "enable_gqa" in _VARLEN_OPTIONS:
        kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
    else:
        k, v = _expand_heads(k, q), _expand_heads(v, q)
    if "window_size" in _VARLEN_OPTIONS:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        kwargs["is_causal"] = True
    m = plan.max_seqlen
    return _torch_varlen_attn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, m, m, **kwargs)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention where each token sees only its own segment (and, ``causal``, only the tokens
    before it there). ``q`` ``(N, heads, head_dim)``; ``k, v`` ``(N, kv_heads, head_dim)`` with
    ``heads`` a multiple of ``kv_heads``; ``scale`` defaults to ``1/sqrt(head_dim)``. Under autocast
    the three are cast to its dtype first, as autocast does for SDPA (rotary embeddings leave
    query and key in float32 beside a low-precision value; the varlen kernels take one dtype)."""
    if torch.is_autocast_enabled(q.device.type):
        low = torch.get_autocast_dtype(q.device.type)
        q, k, v = (t.to(low) for t in (q, k, v))
    if plan.backend == "sdpa":
        return _sdpa(q, k, v, plan, causal, scale)
    if plan.backend == "flex":
        out = _compiled_flex()(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            block_mask=plan.block_mask(causal),
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.squeeze(0).transpose(0, 1)
    if plan.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        m = plan.max_seqlen
        return flash_attn_varlen_func(
            q, k, v, plan.cu_seqlens, plan.cu_seqlens, m, m, softmax_scale=scale, causal=causal
        )
    if plan.backend == "varlen":
        return _torch_varlen(q, k, v, plan, causal, scale)
    raise ValueError(f"unresolved attention backend {plan.backend!r}")
