"""cmpt — continual multimodal pre-training (CoMP, MoCa) for vision foundation models."""

from . import vision
from .vision import NativeViT, NativeViTConfig
from .vlm.merger import PatchMerger

__version__ = "0.1.0"

__all__ = ["NativeViT", "NativeViTConfig", "PatchMerger", "vision"]
