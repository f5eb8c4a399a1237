"""``train.compile``: ``torch.compile`` of each FSDP unit (transformer block), as the trainer and the
GPU benchmarks apply it (docs/method.md §6 "Compiled blocks").

Dynamo keeps at most ``recompile_limit`` (8) compiled versions per Python frame and runs a frame
eagerly from then on. transformers' layers all enter through one frame,
``GradientCheckpointingLayer.__call__``: a Qwen-VL backbone's vision blocks and text layers (other
ranks, argument counts, grad and no-grad calls, static then dynamic shapes) share its budget and
measured 12 versions on the tiny MoCa CPT step — past the limit, so some blocks silently ran
eagerly. The limit is raised to 8 per distinct block class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch._dynamo
from torch import nn

__all__ = ["compile_units"]

PER_CLASS = 8


def compile_units(units: Sequence[nn.Module], **options: Any) -> None:
    """``unit.compile(**options)`` for every unit, with dynamo's recompile limit at least
    :data:`PER_CLASS` per distinct unit class."""
    classes = len({type(u) for u in units})
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, PER_CLASS * classes)
    for unit in units:
        unit.compile(**options)
