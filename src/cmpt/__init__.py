"""cmpt — continual multimodal pre-training (CoMP, MoCa) for vision foundation models."""

__version__ = "0.1.0"
