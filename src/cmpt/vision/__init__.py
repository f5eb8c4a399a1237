"""Native-resolution vision: processor, 2D RoPE, varlen attention, NativeViT, HF conversion (method.md §1)."""

from .image_io import ImageLoadError, load_image
from .processor import ImageProcessor, PackedImages, smart_resize, unpatchify
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
