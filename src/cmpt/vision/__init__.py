"""Native-resolution vision: processor, 2D RoPE, varlen attention, NativeViT, HF conversion (SPEC §1)."""

from .vit import NativeViT, NativeViTConfig

__all__ = ["NativeViT", "NativeViTConfig"]
