"""cmpt — continual multimodal pre-training (CoMP, MoCa) for vision foundation models.

Public API (docs/architecture.md): :class:`NativeViT`, :class:`ImageProcessor` → :class:`PackedImages`,
:class:`PatchMerger`, :class:`VisionLanguageModel`, :class:`Embedder`, ``cmpt.vision.smart_resize``,
``cmpt.losses``. Importing cmpt registers its directories with transformers' ``AutoConfig`` /
``AutoModel`` (:mod:`cmpt.hf_auto`).
"""

from . import losses, vision
from .embed.embedder import Embedder
from .hf_auto import register_auto_classes
from .vision import ImageProcessor, NativeViT, NativeViTConfig, PackedImages
from .vlm.merger import PatchMerger
from .vlm.model import VisionLanguageModel, VLMConfig

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "Embedder",
    "ImageProcessor",
    "NativeViT",
    "NativeViTConfig",
    "PackedImages",
    "PatchMerger",
    "VLMConfig",
    "VisionLanguageModel",
    "losses",
    "vision",
]
