"""NativeViT: one configurable ViT that reads packed images at native resolution with C-RoPE (method.md §1).

C-RoPE = the checkpoint's learned absolute position table, bicubically interpolated to each image's
patch grid and put in the patches' (merge-window) order (:mod:`cmpt.vision.pos_embed`, §1.1), plus
2D RoPE on q/k in every layer (:mod:`cmpt.vision.rope`). Images of any size are packed into one
sequence with block-diagonal attention.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import build_plan
from .layers import AttentionPoolHead, Block, make_norm
from .pos_embed import interpolate_table, resize_matrix, sincos_2d, window_index
from .rope import patch_positions, rope_cos_sin
from .vit_config import RUNTIME_FIELDS, NativeViTConfig

if TYPE_CHECKING:
    from .processor import ImageProcessor

# the config lives in vit_config.py, the position-table helpers in pos_embed.py; importing them from
# here keeps working
__all__ = [
    "CONFIG_NAME", "RUNTIME_FIELDS", "WEIGHTS_NAME", "NativeViT", "NativeViTConfig",
    "interpolate_table", "resize_matrix", "sincos_2d", "window_index",
]  # fmt: skip

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"  # a NativeViT directory (vit_io.py)


def _positive_int(v: object) -> bool:
    return (
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v == int(v) and v > 0
    )


def _grids(grid_hw: torch.Tensor | Sequence[Sequence[int]], n_rows: int, what: str) -> list[tuple[int, int]]:
    """``grid_hw`` as ``[(h, w), ...]`` in patches, checked: an ``(n, 2)`` tensor or a sequence of
    pairs of positive integers whose ``Σ h·w`` is ``n_rows``, the rows of ``what`` (docs/method.md §1
    "Input packing"). The values are read on the host either way (the model needs them to split the
    stream), so the check costs nothing beyond that read."""
    if torch.is_tensor(grid_hw):
        shape = f"shape {tuple(grid_hw.shape)}"
        pairs = grid_hw.tolist() if grid_hw.dim() == 2 and grid_hw.shape[1] == 2 else None
    elif isinstance(grid_hw, Iterable) and not isinstance(grid_hw, (str, bytes)):
        pairs = [
            [*g] if isinstance(g, Iterable) and not isinstance(g, (str, bytes)) else None for g in grid_hw
        ]
        shape = f"{len(pairs)} entries {[g if g is None else len(g) for g in pairs][:4]} long"
        pairs = pairs if all(g is not None and len(g) == 2 for g in pairs) else None
    else:
        shape, pairs = type(grid_hw).__name__, None
    if pairs is None:
        raise ValueError(
            f"grid_hw must be (n, 2), one (h, w) row per image in patches (ImageProcessor's "
            f"PackedImages.grid_hw), got {shape}; for one image pass [[h, w]]"
        )
    pairs = [[v.item() if hasattr(v, "item") else v for v in g] for g in pairs]  # numpy / 0-d tensors
    if not all(_positive_int(v) for g in pairs for v in g):
        raise ValueError(f"grid_hw must hold positive integers (patch rows and columns), got {pairs}")
    grids = [(int(h), int(w)) for h, w in pairs]
    total = sum(h * w for h, w in grids)
    if total != n_rows:
        raise ValueError(
            f"grid_hw={grids} describes {total} patches (sum of h*w) but {what} has {n_rows} rows; pass "
            "the patches and grid_hw of the same PackedImages"
        )
    return grids


class NativeViT(nn.Module):
    """Native-resolution ViT with C-RoPE over packed images.

    ``forward(patches (N, 3·p·p), grid_hw (n, 2)) -> (N, D)``: patches in merge-window order,
    block-diagonal attention, prefix tokens (if kept) attend inside their image and are dropped
    from the output. ``forward_images`` takes a list of (3, H, W) tensors and returns per-image
    ``(P + h·w, D)`` features, prefix tokens first, patches in raster order.
    """

    def __init__(self, config: NativeViTConfig) -> None:
        super().__init__()
        self.config = c = config
        d, p = c.hidden_size, c.patch_size
        self.grad_checkpointing = False
        self.patch_embed = nn.Linear(3 * p * p, d, bias=c.patch_bias)
        self.patch_norm = make_norm(c.norm, d, c.norm_eps) if c.patch_norm else None
        self.cls_token = nn.Parameter(torch.zeros(1, d)) if c.cls_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(c.num_register_tokens, d)) if c.num_register_tokens else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(c.pos_grid**2, d)) if c.pos_embed == "learned" else None
        self.cls_pos = nn.Parameter(torch.zeros(1, d)) if c.pos_embed == "learned" and c.pos_cls else None
        self.pre_norm = make_norm(c.norm, d, c.norm_eps) if c.pre_norm else None
        self.blocks = nn.ModuleList(
            Block(
                d,
                c.num_heads,
                c.intermediate_size,
                norm=c.norm,
                eps=c.norm_eps,
                mlp=c.mlp,
                qkv_bias=c.qkv_bias,
                proj_bias=c.proj_bias,
                mlp_bias=c.mlp_bias,
                layerscale=c.layerscale_init,
            )
            for _ in range(c.num_layers)
        )
        self.norm = make_norm(c.norm, d, c.norm_eps) if c.final_norm else None
        self.pool_norm = make_norm(c.norm, d, c.norm_eps) if c.pool_norm else None
        self.head = (
            AttentionPoolHead(
                d, c.num_heads, c.head_intermediate_size or c.intermediate_size, c.norm_eps, c.mlp
            )
            if c.pool == "map"
            else None
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Fresh initialisation (truncated normal 0.02, zero biases) for models built from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for prm in (self.cls_token, self.register_tokens, self.pos_embed, self.cls_pos):
            if prm is not None:
                nn.init.trunc_normal_(prm, std=0.02)

    # ------------------------------------------------------------------ positions
    def _abs_pos(self, grids: list[tuple[int, int]], merge: int) -> torch.Tensor:
        """Absolute position rows for every patch, in token order (the "C" of C-RoPE)."""
        c, cache, parts = self.config, {}, []
        for h, w in grids:
            if (h, w) not in cache:
                if c.pos_embed == "learned":
                    table = interpolate_table(self.pos_embed, c.pos_grid, h, w, c.pos_antialias)
                else:
                    table = sincos_2d(h, w, c.hidden_size).to(self.patch_embed.weight)
                if merge > 1 and c.pos_embed_order == "window":
                    table = table[window_index(h, w, merge, table.device)]
                cache[(h, w)] = table
            parts.append(cache[(h, w)])
        return torch.cat(parts)

    def _prefix(self) -> torch.Tensor:
        parts = []
        if self.cls_token is not None:
            parts.append(self.cls_token + self.cls_pos if self.cls_pos is not None else self.cls_token)
        if self.register_tokens is not None:
            parts.append(self.register_tokens)
        return torch.cat(parts)

    # ------------------------------------------------------------------ core
    def encode(
        self,
        patches: torch.Tensor,
        grid_hw: torch.Tensor | Sequence[Sequence[int]],
        merge_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the packed stream; returns (patch tokens (N, D), prefix tokens (n, P, D) or None).

        ``grid_hw``: ``(n, 2)``, each image's ``(h, w)`` in patches (rows, columns), ``Σ h·w = N``,
        checked (a ``ValueError`` naming ``grid_hw``); no image (``n = 0``, ``N = 0``) gives empty
        outputs. ``merge_size`` is the patch order of the input: ``config.merge_size`` (window order)
        by default, 1 for raster order (docs/method.md §1 "Input packing").
        """
        c = self.config
        merge = c.merge_size if merge_size is None else merge_size
        if patches.ndim != 2 or patches.shape[1] != 3 * c.patch_size**2:
            raise ValueError(
                f"patches must be (N, 3*{c.patch_size}^2 = {3 * c.patch_size**2}), got {tuple(patches.shape)}"
            )
        grids = _grids(grid_hw, patches.shape[0], "patches")
        if merge > 1 and any(h % merge or w % merge for h, w in grids):
            raise ValueError(
                f"grid_hw={grids} is not divisible by merge_size={merge}; resize images to multiples of "
                f"patch_size*merge_size={c.patch_size * merge} (cmpt.ImageProcessor does) or use merge_size=1"
            )
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        P = c.num_prefix_tokens
        if not grids:  # no image (ImageProcessor([])): empty outputs of the right shapes
            return x, (x.new_zeros(0, P, x.shape[1]) if P else None)
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        if c.pos_embed != "none":
            x = x + self._abs_pos(grids, merge)
        sizes = [h * w for h, w in grids]
        if P:
            prefix = self._prefix()[:P]
            x = torch.cat([t for chunk in x.split(sizes) for t in (prefix, chunk)])
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        plan = build_plan([P + s for s in sizes], c.attn, x.device, x.dtype)
        rope = self._rope(grids, merge, P, x.device) if c.rope else None
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, plan, rope, use_reentrant=False)
            else:
                x = blk(x, plan, rope)
        if self.norm is not None:
            x = self.norm(x)
        if not P:
            return x, None
        pieces = x.split([n for s in sizes for n in (P, s)])  # split: cheap backward, unlike slicing
        return torch.cat(pieces[1::2]), torch.stack(pieces[0::2])

    def _rope(self, grids, merge: int, P: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = patch_positions(grids, merge)
        if P:
            zeros = torch.zeros(P, 2, dtype=torch.long)
            pos = torch.cat([t for chunk in pos.split([h * w for h, w in grids]) for t in (zeros, chunk)])
            ident = torch.zeros(len(pos), dtype=torch.bool)
            starts = torch.tensor([0] + [P + h * w for h, w in grids[:-1]]).cumsum(0)
            ident[(starts[:, None] + torch.arange(P)).reshape(-1)] = True
        else:
            ident = None
        head_dim = self.config.hidden_size // self.config.num_heads
        return rope_cos_sin(pos, head_dim, self.config.rope_theta, ident, device)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that :meth:`forward` never touches: the pooling head and norm, and the prefix
        tokens when they are not kept. Training freezes them (DDP needs every trainable one used)."""
        mods = [self.head, self.pool_norm]
        params = [p for m in mods if m is not None for p in m.parameters()]
        if not self.config.keep_prefix_tokens:
            params += [p for p in (self.cls_token, self.cls_pos, self.register_tokens) if p is not None]
        return params

    def forward(self, patches: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """Packed patches (N, 3·p·p) in merge-window order + grids (n, 2) → patch features (N, D).

        ``grid_hw`` rows are each image's ``(h, w)`` in patches (rows, columns; ``Σ h·w = N``), as in
        ``ImageProcessor``'s ``PackedImages`` (docs/method.md §1 "Input packing"); a mismatch is a
        ``ValueError`` naming ``grid_hw``. No image (``(0, 3·p·p)``, ``(0, 2)``) gives ``(0, D)``."""
        return self.encode(patches, grid_hw)[0]

    def pool(
        self, patch_tokens: torch.Tensor, prefix: torch.Tensor | None, grid_hw: torch.Tensor | Sequence
    ) -> torch.Tensor:
        """One vector per image (n, D): CLS (DINOv2, CLIP + post-norm), MAP head (SigLIP) or patch mean.

        With ``pool == "cls"`` but prefix tokens dropped, the patch mean is used. ``patch_tokens``
        ``(N, D)``, ``prefix`` and ``grid_hw`` are :meth:`encode`'s outputs and input (checked: a
        ``ValueError`` naming ``grid_hw``); no image gives ``(0, D)``.
        """
        if patch_tokens.dim() != 2:
            raise ValueError(f"patch_tokens must be (N, D), got shape {tuple(patch_tokens.shape)}")
        grids = _grids(grid_hw, patch_tokens.shape[0], "patch_tokens")
        if prefix is not None and prefix.shape[0] != len(grids):
            raise ValueError(
                f"prefix holds {prefix.shape[0]} images but grid_hw {len(grids)}; pass encode's outputs "
                "for the same grid_hw"
            )
        chunks = patch_tokens.split([h * w for h, w in grids])
        if not grids:
            out = patch_tokens.new_zeros(0, patch_tokens.shape[1])
        elif self.config.pool == "cls" and prefix is not None and self.cls_token is not None:
            out = prefix[:, 0]
        elif self.head is not None:
            seqs = chunks if prefix is None else [torch.cat([pre, ch]) for pre, ch in zip(prefix, chunks)]
            out = self.head(list(seqs))
        else:
            out = torch.stack([chunk.mean(0) for chunk in chunks])
        return self.pool_norm(out) if self.pool_norm is not None else out

    def forward_images(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalized (3, H, W) images, H and W multiples of the patch size, any grid (odd ones too)
        → per image (P + h·w, D): prefix tokens first, then patches in raster order.

        A tower with ``pos_embed_order: official`` (a CoMP release, docs/method.md §1.1, §8 #1) runs
        as released: its patches in merge-window order under the raster-order table, so H and W must
        be multiples of patch_size·merge_size; the output is put back in raster order."""
        c = self.config
        p, merge = c.patch_size, c.merge_size if c.pos_embed_order == "official" else 1
        patches, grids, orders = [], [], []
        if not images:
            return []
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] % (p * merge) or img.shape[2] % (p * merge):
                why = " (an official-order tower sees merge windows)" if merge > 1 else ""
                raise ValueError(
                    f"image {i}: expected (3, H, W) with H, W multiples of {p * merge}{why}, "
                    f"got {tuple(img.shape)}"
                )
            h, w = img.shape[1] // p, img.shape[2] // p
            raster = img.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p)
            order = window_index(h, w, merge, img.device) if merge > 1 else None
            patches.append(raster if order is None else raster[order])
            grids.append((h, w))
            orders.append(order)
        tokens, prefix = self.encode(torch.cat(patches), grids, merge_size=merge)
        chunks = [
            t if order is None else torch.empty_like(t).index_copy_(0, order, t)
            for t, order in zip(tokens.split([h * w for h, w in grids]), orders)
        ]
        if prefix is None:
            return list(chunks)
        return [torch.cat([pre, chunk]) for pre, chunk in zip(prefix, chunks)]

    # ------------------------------------------------------------------ I/O (vision/vit_io.py)
    def save_pretrained(
        self,
        directory: str | Path,
        *,
        model_card: bool = True,
        processor: ImageProcessor | None = None,
        push_to_hub: bool = False,
    ) -> None:
        """Write the NativeViT directory (:func:`cmpt.vision.vit_io.save_vit`; ``processor``: the
        ``ImageProcessor`` saved beside it, by default the ViT's native-resolution one).
        ``push_to_hub=True`` is refused: cmpt writes a local directory, ``hf upload`` publishes it."""
        from .vit_io import save_vit

        save_vit(self, directory, model_card=model_card, processor=processor, push_to_hub=push_to_hub)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        *,
        weights: bool = True,
        **overrides,
    ) -> NativeViT:
        """Load a NativeViT directory, its hub id or a CoMP-VFM tower of the official release
        (:func:`cmpt.vision.vit_io.load_vit_dir`); ``overrides`` replace the config fields of
        :data:`RUNTIME_FIELDS` (``rope``, ``attn``, ``keep_prefix_tokens``, ...); a changed
        architecture field (``hidden_size``, ...) is a ``ValueError`` naming it."""
        from .vit_io import load_vit_dir

        return load_vit_dir(cls, directory, device, weights=weights, **overrides)

    @classmethod
    def from_hf(
        cls,
        name_or_path: str | Path,
        rope: bool | None = None,
        keep_prefix_tokens: bool = True,
        attn: str = "auto",
        weights: bool = True,
        **overrides,
    ) -> NativeViT:
        """Convert an HF DINOv2 / SigLIP / AIMv2 / CLIP vision checkpoint (method.md §1 "Families");
        a hub id missing offline is one line naming the download command (:mod:`cmpt.hub`).
        ``weights=False``: a meta-device skeleton from the configs alone (FSDP2 ranks > 0)."""
        from cmpt.hub import resolving

        from .convert import load_hf_vit

        with resolving(name_or_path, "vision checkpoint"):
            return load_hf_vit(
                name_or_path,
                rope=bool(rope),
                keep_prefix_tokens=keep_prefix_tokens,
                attn=attn,
                weights=weights,
                **overrides,
            )

    def num_flops_per_token(self, seq_len: int) -> float:
        """Approximate forward FLOPs per token (2·params matmuls + attention), for throughput reports."""
        c = self.config
        d, f = c.hidden_size, c.intermediate_size * (3 if c.mlp == "swiglu" else 2)
        per_layer = 2 * (4 * d * d + f * d) + 4 * seq_len * d
        return c.num_layers * per_layer + 2 * 3 * c.patch_size**2 * d

    def extra_repr(self) -> str:
        c = self.config
        src = c.source or "scratch"
        return f"{src}: {c.num_layers}×{c.hidden_size}, rope={c.rope}, prefix={c.num_prefix_tokens}"
