"""Building blocks of :class:`cmpt.NativeViT`: norms, MLPs, attention with 2D RoPE, blocks, pooling head.

Every layer works on a packed stream (N, D) of tokens from several images; attention is
block-diagonal through :func:`cmpt.vision.attention.varlen_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionPlan, varlen_attention
from .rope import apply_rope

MLP_KINDS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")
NORM_KINDS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """LayerNorm (DINOv2, SigLIP, CLIP) or RMSNorm (AIMv2)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORM_KINDS}")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Two-layer MLP (GELU / GELU-tanh / quick-GELU) or SwiGLU (``fc1`` holds [gate; up])."""

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool = True) -> None:
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"unknown mlp {kind!r}; choose one of {MLP_KINDS}")
        self.kind = kind
        self.fc1 = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = quick_gelu(h)
        return self.fc2(h)


class LayerScale(nn.Module):
    """Per-channel residual scaling (DINOv2)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention on a packed stream, with optional 2D RoPE on q and k (docs/method.md §1)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        plan: AttentionPlan,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = varlen_attention(q, k, v, plan)
        return self.proj(out.reshape(n, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        *,
        norm: str,
        eps: float,
        mlp: str,
        qkv_bias: bool,
        proj_bias: bool,
        mlp_bias: bool,
        layerscale: float | None,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = Attention(dim, heads, qkv_bias, proj_bias)
        self.norm2 = make_norm(norm, dim, eps)
        self.mlp = Mlp(dim, hidden, mlp, mlp_bias)
        self.ls1 = LayerScale(dim, layerscale) if layerscale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, plan: AttentionPlan, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), plan, rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolHead(nn.Module):
    """SigLIP's multi-head attention pooling ("MAP") head: a learned probe attends to an image's tokens,
    then a residual MLP. One pooled vector per image."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, mlp: str) -> None:
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, dim))
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden, mlp)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        dim = self.probe.shape[-1]
        hd = dim // self.heads
        q = self.q_proj(self.probe).view(1, self.heads, 1, hd)
        pooled = []
        for t in tokens:
            k, v = self.kv_proj(t).view(t.shape[0], 2, self.heads, hd).permute(1, 2, 0, 3)
            pooled.append(F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0)).reshape(1, dim))
        h = self.out_proj(torch.cat(pooled))
        return h + self.mlp(self.norm(h))
