"""Native-resolution vision: processor, 2D RoPE, varlen attention, NativeViT, HF conversion (method.md §1)."""

from .processor import ImageLoadError, ImageProcessor, PackedImages, load_image, smart_resize, unpatchify
from .vit import NativeViT, NativeViTConfig

__all__ = [
    "ImageLoadError",
    "ImageProcessor",
    "NativeViT",
    "NativeViTConfig",
    "PackedImages",
    "load_image",
    "smart_resize",
    "unpatchify",
]
