"""M-RoPE positions of a packed Qwen2-VL / Qwen2.5-VL batch (docs/method.md §3 "Backbones").

Each sequence gets the ids transformers' ``get_rope_index`` gives it alone, and a packed row
concatenates them; :func:`mrope_position_ids` computes them for the whole micro-batch in one pass
on the device (``get_rope_index`` runs per sequence and reads several values back from the device
per image). Images are counted in the text as ``<|vision_start|><|image_pad|>`` pairs (the Qwen
chat format).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from cmpt.host_tensor import host_tensor
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
    first = [s for s in itertools.accumulate(layout.lengths[:-1], initial=0) if s < starts.numel()]
    starts[host_tensor(first, input_ids.device)] = 0  # a pair never spans two sequences
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


def mrope_position_ids(
    input_ids: torch.Tensor,
    layout: TextLayout,
    grid_hw: torch.Tensor | Sequence[Sequence[int]] | None,
    merge_size: int,
    image_pad_id: int,
) -> torch.Tensor:
    """M-RoPE ids ``(3, rows, T)`` (temporal, height, width) of the layout's rows, restarting at
    every sequence of a packed row (docs/method.md §3 "Backbones"); padding positions are 0.

    A text token takes the running position ``p`` in all three rows and advances it by one. Image
    ``i`` (``grid_hw[i] = (h, w)`` patches, ``h/m × w/m`` merged tokens after ``m = merge_size``)
    is the next run of ``image_pad_id`` tokens, in order: its token ``r · w/m + c`` gets ``(p, p + r,
    p + c)``, and the text after it continues at ``p + max(h/m, w/m)``. These are the ids of
    transformers' Qwen2-VL / Qwen2.5-VL ``get_rope_index`` for still images (tests compare them),
    computed for the whole micro-batch in one pass on ``input_ids``' device, with the grids read
    once on the host. The caller checks that the text holds ``Σ h·w/m²`` image tokens
    (:meth:`cmpt.vlm.backbone.BackboneMixin._check_placeholders`)."""
    dev, n = input_ids.device, input_ids.numel()
    rows, width = (1, n) if layout.packed else (len(layout.lengths), layout.width)
    if n == 0:
        return torch.zeros(3, rows, width, dtype=torch.long, device=dev)
    lengths = host_tensor(layout.lengths, dev)
    seq_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths, output_size=n)
    step = torch.ones(n, dtype=torch.long, device=dev)  # how far each token moves the running position
    row = col = torch.zeros_like(step)
    merged = [] if grid_hw is None else [(h // merge_size, w // merge_size) for h, w in _host_pairs(grid_hw)]
    if merged:
        is_img = input_ids.reshape(-1) == image_pad_id
        img, rank = _image_token_places(is_img, merged)
        hw = host_tensor(merged, dev)[img]  # (n, 2) merged rows, cols
        size, wide = hw.prod(-1), hw[:, 1]
        step = torch.where(is_img, torch.where(rank == size - 1, hw.amax(-1), 0), 1)
        row = torch.where(is_img, torch.div(rank, wide, rounding_mode="floor"), 0)
        col = torch.where(is_img, rank % wide, 0)
    running = torch.cumsum(step, 0) - step  # before each token, counted from the row's start
    cur = running - running[seq_start]  # ... from its sequence's start
    pos = torch.stack([cur, cur + row, cur + col])
    if layout.packed:
        return pos[:, None]
    flat = layout.sequence_ids(dev) * width + torch.arange(n, device=dev) - seq_start
    out = torch.zeros(3, rows * width, dtype=torch.long, device=dev)
    out[:, flat] = pos
    return out.reshape(3, rows, width)


def _host_pairs(grid_hw: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``(n, 2)`` grids as host integers (one read-back for a device tensor)."""
    return [(int(h), int(w)) for h, w in torch.as_tensor(grid_hw).reshape(-1, 2).tolist()]


def _image_token_places(
    is_img: torch.Tensor, merged: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token: the image its ``image_pad`` belongs to and its place in that image's raster
    of merged tokens (meaningless on text tokens). The k-th image token belongs to the image whose
    run of ``h·w`` tokens covers k (images in order)."""
    dev = is_img.device
    sizes = host_tensor([h * w for h, w in merged], dev)
    total = sum(h * w for h, w in merged)
    image_of = torch.repeat_interleave(torch.arange(len(merged), device=dev), sizes, output_size=total)
    k = (torch.cumsum(is_img, 0) - 1).clamp_(0, total - 1)  # index among the image tokens
    img = image_of[k]
    return img, k - (torch.cumsum(sizes, 0) - sizes)[img]
