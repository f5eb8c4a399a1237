"""M-RoPE positions of a packed Qwen2-VL / Qwen2.5-VL batch (docs/method.md §3 "Backbones").

Each sequence gets the model's own ids (``get_rope_index``), computed as if it were alone, and a
packed row concatenates them. ``get_rope_index``'s signature differs between transformers versions:
from 5.x it also takes ``mm_token_type_ids`` (0 text, 1 image), passed where the signature has it.
Images are found in the text as ``<|vision_start|><|image_pad|>`` pairs (the Qwen chat format).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from cmpt.vlm.chat import IMAGE_PAD, VISION_START
from cmpt.vlm.text_attention import TextLayout

__all__ = ["images_per_sequence", "mrope_position_ids"]


def images_per_sequence(
    input_ids: torch.Tensor,
    layout: TextLayout,
    n_images: int,
    images_per_sample: torch.Tensor | None,
    sample_ids: Sequence[str] | None,
    vision_start_id: int,
    image_pad_id: int,
) -> list[int]:
    """Images of every sequence: ``<|vision_start|><|image_pad|>`` pairs, checked against
    ``images_per_sample`` (or, without it, against the batch's image count ``n_images``)."""
    starts = torch.zeros_like(input_ids, dtype=torch.long)
    starts[1:] = ((input_ids[:-1] == vision_start_id) & (input_ids[1:] == image_pad_id)).long()
    first = layout.cu_seqlens(input_ids.device)[:-1].long()
    starts[first[first < starts.numel()]] = 0  # a pair never spans two sequences
    found = [int(x) for x in torch.stack([s.sum() for s in starts.split(layout.lengths)]).tolist()]
    ids = list(sample_ids) if sample_ids is not None else [str(i) for i in range(len(found))]
    if images_per_sample is not None:
        want = [int(k) for k in images_per_sample.tolist()]
        if len(want) != len(found):
            raise ValueError(f"images_per_sample has {len(want)} entries for {len(found)} sequences")
        bad = [f"sample {ids[i]!r}: {f} vs {w}" for i, (f, w) in enumerate(zip(found, want)) if f != w]
        if bad:
            raise ValueError(
                f"images rendered in the text ({VISION_START}{IMAGE_PAD}…) vs images_per_sample: "
                f"{'; '.join(bad)}"
            )
        return want
    if sum(found) != n_images:
        raise ValueError(
            f"the text renders {sum(found)} images ({VISION_START}{IMAGE_PAD}…, per sequence {found}) "
            f"but the batch has {n_images}; pass images_per_sample"
        )
    return found


@cache
def _takes_token_types(model_cls: type) -> bool:
    return "mm_token_type_ids" in inspect.signature(model_cls.get_rope_index).parameters


def _rope_index(model: nn.Module, image_pad_id: int, ids: torch.Tensor, grid_thw: torch.Tensor) -> Tensor:
    """``(3, L)`` M-RoPE ids of one sequence ``ids`` ``(1, L)`` from ``model.get_rope_index``."""
    kwargs: dict[str, Any] = {"image_grid_thw": grid_thw}
    if _takes_token_types(type(model)):
        kwargs["mm_token_type_ids"] = (ids == image_pad_id).int()
    pos, _ = model.get_rope_index(input_ids=ids, **kwargs)
    return pos[:, 0]


def mrope_position_ids(
    model: nn.Module,
    image_pad_id: int,
    input_ids: torch.Tensor,
    layout: TextLayout,
    grid_hw: torch.Tensor | None,
    images_per_sequence: Sequence[int],
) -> torch.Tensor:
    """M-RoPE ids ``(3, rows, T)`` of the layout's rows: per sequence, restarting at every sequence
    of a packed row; ``images_per_sequence`` assigns the grids ``(n, 2)``, in order. ``model``: the
    ``*ForConditionalGeneration``'s ``.model`` (it owns ``get_rope_index``)."""
    dev = input_ids.device
    thw = None
    if grid_hw is not None and grid_hw.shape[0] > 0:
        g = torch.as_tensor(grid_hw, dtype=torch.long).reshape(-1, 2).to(dev)
        thw = torch.cat([torch.ones_like(g[:, :1]), g], dim=1)
    per_seq, start = [], 0
    for seq, k in zip(input_ids.split(layout.lengths), images_per_sequence):
        if k:
            per_seq.append(_rope_index(model, image_pad_id, seq[None], thw[start : start + k]))
        else:
            per_seq.append(torch.arange(seq.numel(), device=dev).expand(3, -1))
        start += k
    if layout.packed:
        if not per_seq:
            return torch.zeros(3, 1, 0, dtype=torch.long, device=dev)
        return torch.cat(per_seq, dim=1)[:, None]
    out = torch.zeros(3, len(per_seq), layout.width, dtype=torch.long, device=dev)
    for i, pos in enumerate(per_seq):
        out[:, i, : pos.shape[1]] = pos
    return out
