"""Loading images robustly for the processor (docs/method.md §1.4, §4 "Bad samples"): paths, bytes,
PIL images, numpy arrays (H×W or H×W×C) and torch tensors (C×H×W or H×W), uint8 or float in
[0, 1]; EXIF orientation applied, palette / alpha / 16-bit / float / CMYK converted to RGB (alpha
composited on white), decompression bombs, empty, truncated, corrupt and non-image data refused
with an :class:`ImageLoadError` naming the image and carrying its bad-sample reason."""

from __future__ import annotations

import io
import os
import threading
import warnings
import weakref
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageLoadError", "ImageSource", "load_image"]

#: one lock per caller's PIL image (by ``id``, dropped when the image is collected), held while
#: :func:`load_image` reads it; :data:`_LOCKS_GUARD` guards making them
_IMAGE_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | torch.Tensor


class ImageLoadError(ValueError):
    """An image that cannot be used (missing, empty, corrupt, truncated, not an image, too large).

    ``reason``: ``"zero_size_image"`` for a decoded image of zero width or height, else
    ``"unreadable_image"`` (the bad-sample reasons of docs/method.md §4).
    """

    def __init__(self, message: str, reason: str = "unreadable_image") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (str(self), self.reason))


def _label(src: Any, name: str | None) -> str:
    if name:
        return str(name)
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, Image.Image):
        return getattr(src, "filename", "") or f"<PIL {src.mode} image {src.width}x{src.height}>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<numpy {src.dtype} array {tuple(src.shape)}>"
    if isinstance(src, torch.Tensor):
        return f"<{src.dtype} tensor {tuple(src.shape)}>"
    return f"<{type(src).__name__}>"


def _fail(
    label: str,
    reason: str,
    fix: str = "re-download or re-encode it, or drop the sample",
    kind: str = "unreadable_image",
) -> ImageLoadError:
    return ImageLoadError(f"cannot load image {label!r}: {reason}; {fix}", kind)


def _decode(fp: Any, label: str, head: bytes) -> Image.Image:
    """Open and fully decode, mapping every PIL failure to an ``ImageLoadError`` naming the image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
        limit = Image.MAX_IMAGE_PIXELS  # also checked here: warning filters are process-global state
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels exceed {limit}")
        img.load()
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _fail(
            label,
            f"decompression-bomb check failed ({e})",
            "if the file is trusted raise PIL.Image.MAX_IMAGE_PIXELS, otherwise drop the sample",
        ) from None
    except UnidentifiedImageError:
        if head.lstrip()[:1] in (b"<", b"{") or (head and all(32 <= c < 127 or c in b"\t\r\n" for c in head)):
            raise _fail(label, "it holds HTML/text, not image data (a failed download?)") from None
        raise _fail(label, "not a recognized image format (corrupt header?)") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, EOFError, struct.error... on bad data
        raise _fail(label, f"image data is truncated or corrupt ({type(e).__name__}: {e})") from None


def _float_to_uint8(a: np.ndarray, label: str, what: str) -> np.ndarray:
    """Float pixels in [0, 1] → ``round(255·v)`` as uint8; any other range (or NaN/inf) is refused
    naming the range found: scaling it silently would guess the image's meaning."""
    a = np.asarray(a, dtype=np.float32)
    finite = bool(np.isfinite(a).all())
    lo, hi = (float(a.min()), float(a.max())) if finite and a.size else (0.0, 0.0)
    if not finite or lo < 0.0 or hi > 1.0:
        span = "non-finite values (NaN or inf)" if not finite else f"values from {lo:.4g} to {hi:.4g}"
        raise _fail(
            label,
            f"{what} has {span}; float images must hold values in [0, 1]",
            "scale it to [0, 1], or convert it to 8-bit (uint8 values 0-255)",
        )
    return np.rint(a * 255.0).astype(np.uint8)


def _from_array(src: np.ndarray | torch.Tensor, label: str) -> Image.Image:
    """A numpy array (H×W or H×W×C, PIL's layout) or a torch tensor (C×H×W, torchvision's layout,
    or H×W), C = 1, 3 or 4 (RGBA), uint8 0–255 or float in [0, 1], as a PIL image."""
    if isinstance(src, torch.Tensor):
        layout = "(C, H, W) or (H, W) with C = 1, 3 or 4"
        fix = "for an (H, W, C) tensor pass t.permute(2, 0, 1)"
        ok = src.dim() == 2 or (src.dim() == 3 and src.shape[0] in (1, 3, 4))
        t = src.detach()
        if ok and t.dim() == 3:
            t = t.permute(1, 2, 0)
        dtype_ok = t.dtype == torch.uint8 or t.dtype.is_floating_point
        a = (t.cpu() if t.dtype == torch.uint8 else t.float().cpu()).numpy() if ok and dtype_ok else None
    else:
        layout = "(H, W) or (H, W, C) with C = 1, 3 or 4"
        fix = "for a (C, H, W) array pass a.transpose(1, 2, 0)"
        ok = src.ndim == 2 or (src.ndim == 3 and src.shape[2] in (1, 3, 4))
        dtype_ok = src.dtype == np.uint8 or np.issubdtype(src.dtype, np.floating)
        a = src
    if not ok:
        extra = "; for several images pass a list" if len(src.shape) == 4 else ""
        raise _fail(label, f"an image array must be {layout}, got shape {tuple(src.shape)}", fix + extra)
    if not dtype_ok:
        raise TypeError(
            f"cannot load image {label!r}: dtype {src.dtype} is not an image dtype; pass uint8 "
            "(values 0-255) or a float type (values in [0, 1])"
        )
    if 0 in a.shape:
        raise _fail(
            label, f"it has zero size (shape {tuple(src.shape)})", "drop the sample", "zero_size_image"
        )
    if a.dtype != np.uint8:
        a = _float_to_uint8(a, label, f"a {src.dtype} image")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(a))  # uint8: L, RGB or RGBA by shape


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """RGB conversion: alpha/transparency composited on white (as transformers' ``convert_to_rgb``)."""
    mode = img.mode
    if mode == "RGB" and img.info.get("transparency") is None:
        return img
    if mode.startswith("I;16") or mode == "I":  # 16-bit data: PIL's convert("L") would clip, so scale
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((2 * a + 257) // 514).astype(np.uint8)).convert("RGB")  # round(v / 257)
    if mode == "F":  # 32-bit float: PIL's convert("L") would clip [0, 1] to black
        gray = _float_to_uint8(np.asarray(img), label, "a float (mode 'F') image")
        return Image.fromarray(gray).convert("RGB")
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise _fail(
            label, f"cannot convert mode {mode!r} to RGB ({e})", "convert it to RGB offline"
        ) from None


def load_image(src: ImageSource, name: str | None = None) -> Image.Image:
    """Decode ``src`` into a fully loaded RGB ``PIL.Image`` (method.md §1.4, §4 "Bad samples").

    ``src``: a path, bytes, a PIL image, a numpy array (H×W or H×W×C) or a torch tensor (C×H×W or
    H×W), C = 1, 3 or 4 (RGBA), of uint8 (0–255) or floats in [0, 1]; another dtype is a
    ``TypeError``. EXIF orientation is applied; palette/alpha images are composited on white;
    16-bit grayscale is scaled to 8 bits; float images (PIL mode ``F``, arrays) in [0, 1] are scaled
    to 0–255 and refused outside that range; CMYK and other modes are converted. Any unusable input raises
    ``ImageLoadError`` whose message names the image (``name`` or the path) and says what to do.
    """
    if isinstance(src, Image.Image):
        # the caller's object, which prefetch threads may share (one image for many inputs): PIL
        # decodes an opened file on first use and parses its EXIF in place, neither thread-safe;
        # distinct images are read in parallel
        with _lock_of(src):
            return _load(src, name)
    return _load(src, name)


def _lock_of(img: Image.Image) -> threading.Lock:
    key = id(img)
    with _LOCKS_GUARD:
        lock = _IMAGE_LOCKS.get(key)
        if lock is None:
            lock = _IMAGE_LOCKS[key] = threading.Lock()
            # the entry goes when the image does, before its id can be reused
            weakref.finalize(img, _IMAGE_LOCKS.pop, key, None)
    return lock


def _load(src: ImageSource, name: str | None) -> Image.Image:
    label = _label(src, name)
    if isinstance(src, Image.Image):
        img = src
        try:
            img.load()
        except Exception as e:
            raise _fail(label, f"image data is truncated or corrupt ({type(e).__name__}: {e})") from None
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise _fail(label, "the data is empty (0 bytes)")
        img = _decode(io.BytesIO(src), label, bytes(src[:64]))
    elif isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as f:
                head = f.read(64)
                if not head:
                    raise _fail(label, "the file is empty (0 bytes)")
                f.seek(0)
                img = _decode(f, label, head)
        except OSError as e:
            raise _fail(
                label, f"cannot read the file ({e.strerror or e})", "check the path and image root"
            ) from None
    elif isinstance(src, (np.ndarray, torch.Tensor)):
        img = _from_array(src, label)
    else:
        raise TypeError(
            f"load_image expects a path, bytes, a PIL image, a numpy array or a torch tensor, got "
            f"{type(src).__name__}"
        )
    if img.width <= 0 or img.height <= 0:
        raise _fail(
            label, f"it has zero size ({img.width}x{img.height})", "drop the sample", "zero_size_image"
        )
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img, label)
