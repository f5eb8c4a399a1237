"""Helpers shared by tests/test_processor.py and tests/test_image_io.py."""

from __future__ import annotations

import numpy as np
from PIL import Image


def textured(h: int, w: int, seed: int) -> Image.Image:
    """A gradient with noise: an image whose resizing and patching are not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    grad = np.stack([255 * y / max(h - 1, 1), 255 * x / max(w - 1, 1), 127 + 0 * x], axis=-1)
    arr = np.clip(grad + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)
