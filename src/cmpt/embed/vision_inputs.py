"""A Qwen-VL vision tower's grid-derived inputs, built on the host (docs/method.md §7 "Batches on the
host").

From ``grid_thw`` the tower derives its rotary position ids, its attention segments (``cu_seqlens``
and their longest length) and, in Qwen2.5-VL, the window order and window segments. Computed from a
grid on the device, that reads the grids back (``.tolist()``, ``.item()``, a pageable copy), several
times per forward. transformers releases whose tower module takes these values precomputed (it
imports the ``get_vision_*`` helpers of ``transformers.vision_utils``, which pop a precomputed value
from the forward's keyword arguments) get them here: computed by those same helpers from the
host's grids, so the numbers are transformers' own, and copied to the device without waiting.
Older releases get nothing (the tower computes them itself, as before).

The segment boundaries stay on the host unless a real flash-attention kernel will read them:
cmpt's packed attention (:mod:`cmpt.embed.vision_attention`) and transformers' per-segment
SDPA / eager loops read them in Python.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from cmpt.embed.vision_attention import VISION_VARLEN
from cmpt.host_tensor import to_device_async

__all__ = ["precomputed_vision_inputs"]

_HELPERS = ("get_vision_position_ids", "get_vision_attention_seqlens")
_WINDOW_HELPER = "get_vision_window_index"


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def precomputed_vision_inputs(
    visual: nn.Module, grid_thw: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """Keyword arguments for ``visual(pixels, grid_thw=..., **kwargs)`` computed from ``grid_thw``
    ``(n, 3)`` on the host, or ``{}`` where this transformers release's tower cannot take them."""
    module = sys.modules.get(type(visual).__module__)
    windowed = hasattr(visual, "fullatt_block_indexes")  # Qwen2.5-VL's windowed blocks
    needed = (*_HELPERS, _WINDOW_HELPER) if windowed else _HELPERS
    if grid_thw.device.type != "cpu" or module is None or not all(hasattr(module, n) for n in needed):
        return {}
    impl = str(getattr(visual.config, "_attn_implementation", None) or "")
    on_device = "flash" in impl and impl != VISION_VARLEN  # a flash kernel reads the segments

    def segments(cu: torch.Tensor) -> torch.Tensor:
        return to_device_async(cu, device) if on_device else cu

    merge = visual.spatial_merge_size
    cu, _ = module.get_vision_attention_seqlens(grid_thw, visual.config)
    out: dict[str, Any] = {
        "position_ids": to_device_async(module.get_vision_position_ids(grid_thw, merge), device),
        "cu_seqlens": segments(cu),
        "max_seqlen": _longest(cu),
    }
    if windowed:
        index, cu_window = module.get_vision_window_index(
            grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
        )
        out |= {
            "window_index": to_device_async(index, device),
            "cu_window_seqlens": segments(cu_window),
            "max_window_seqlen": _longest(cu_window),
        }
    return out
