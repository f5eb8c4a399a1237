"""Image loading, resolution policy and patch packing (docs/method.md §1 "Input packing", §1.4).

Every image goes: ``load_image`` (decode fully, EXIF orientation, RGB on white) → resize
(``smart_resize`` once, or the official fixed-size "force_resize"; ``resize="official"`` adds the
release's first resize, docs/method.md §1.4) → normalize → ``p×p`` patches in merge-window order,
packed over the batch into ``PackedImages(patches (N, 3·p·p), grid_hw (n, 2))``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .image_io import ImageSource, _label, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
CONFIG_NAME = "preprocessor_config.json"
#: Defaults of qwen-vl-utils' ``fetch_image``, the first of the release's two resizes (docs/method.md
#: §1.4): its own ``smart_resize`` with factor 28 and [4·28², 16384·28²] pixels, then PIL's default
#: filter for RGB (bicubic).
FETCH_FACTOR, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS = 28, 4 * 28 * 28, 16384 * 28 * 28
#: ``single``: one ``smart_resize`` (cmpt default); ``official``: ``fetch_image`` first, then it.
RESIZE_MODES = ("single", "official")


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Target ``(height, width)`` of the Qwen2-VL resolution policy (docs/method.md §1.4).

    Both sides become multiples of ``factor`` (at least ``factor``; Python ``round``, i.e. half to
    even), the area is kept within ``[min_pixels, max_pixels]`` and the aspect ratio is kept as
    closely as possible. Raises ``ValueError`` for non-positive sizes and aspect ratios above 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if factor <= 0 or min_pixels > max_pixels:
        raise ValueError(
            f"need factor > 0 and min_pixels <= max_pixels, got {factor}, {min_pixels}, {max_pixels}"
        )
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {width}x{height} (WxH) has aspect ratio {ratio:.1f} > {MAX_ASPECT_RATIO}; "
            f"crop or pad it to an aspect ratio of at most {MAX_ASPECT_RATIO}, or drop the sample"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


@dataclass
class PackedImages:
    """A batch of images as one patch sequence (docs/method.md §1 "Input packing").

    ``patches``: (N, 3·p·p) float32, each image's patches in merge-window order, images concatenated.
    ``grid_hw``: (n, 2) int64, rows and columns in patches of each image.
    """

    patches: torch.Tensor
    grid_hw: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.grid_hw.shape[0])

    @property
    def tokens_per_image(self) -> list[int]:
        return [int(h) * int(w) for h, w in self.grid_hw.tolist()]

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative patch counts (n + 1,) int32 on the CPU, for varlen attention."""
        counts = torch.tensor([0, *self.tokens_per_image], dtype=torch.int64)
        return counts.cumsum(0).to(torch.int32)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedImages:
        """Move both tensors to ``device``; ``dtype`` (if given) applies to ``patches`` only."""
        return PackedImages(self.patches.to(device=device, dtype=dtype), self.grid_hw.to(device))

    def __len__(self) -> int:
        """Number of images (not patches)."""
        return self.num_images


class ImageProcessor:
    """Resize, normalize and patchify images into ``PackedImages`` (docs/method.md §1, §1.4).

    ``policy="native"``: ``smart_resize(h, w, factor=patch_size·merge_size, min_pixels, max_pixels)``
    then one PIL bicubic resize. ``policy="fixed"`` (official CoMP ``force_resize``): resize to
    ``fixed_size×fixed_size`` first, then ``smart_resize`` (a no-op when ``fixed_size`` is a multiple
    of the factor; otherwise a second resize, as the official code does).

    ``resize="official"`` (native policy only; docs/method.md §1.4): the release's two resizes —
    qwen-vl-utils' ``fetch_image`` (``smart_resize`` with factor 28 within [4·28², 16384·28²]
    pixels, PIL bicubic) and then the ``smart_resize`` above on its output. It changes the grid of
    roughly 20–30 % of the images above ``max_pixels`` (measured over uniform size grids; none whose
    single resize stays within the cap); ``"single"`` (default) resizes once. :meth:`target_size`
    follows the same steps, so length indexes agree with the built samples.
    """

    def __init__(
        self,
        patch_size: int = 14,
        merge_size: int = 2,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        min_pixels: int = 56 * 56,
        max_pixels: int = 14 * 14 * 4 * 1280,
        policy: str = "native",
        fixed_size: int | None = None,
        resize: str = "single",
    ) -> None:
        factor = patch_size * merge_size if _is_pos_int(patch_size) and _is_pos_int(merge_size) else 0
        for ok, msg in (
            (
                factor > 0,
                f"patch_size and merge_size must be positive integers, got {patch_size}, {merge_size}",
            ),
            (
                len(mean) == 3 and len(std) == 3 and all(s > 0 for s in std),
                f"need 3 means and 3 stds > 0, got {mean}, {std}",
            ),
            (
                0 <= min_pixels <= max_pixels and max_pixels >= factor * factor,
                "need 0 <= min_pixels <= "
                f"max_pixels >= {factor * factor} (one merge window), got {min_pixels}, {max_pixels}",
            ),
            (policy in ("native", "fixed"), f"policy must be 'native' or 'fixed', got {policy!r}"),
            (
                policy != "fixed" or _is_pos_int(fixed_size),
                f"policy='fixed' needs fixed_size > 0 (pixels), got {fixed_size!r}",
            ),
            (policy != "native" or fixed_size is None, "fixed_size needs policy='fixed'; set it or drop it"),
            (resize in RESIZE_MODES, f"resize must be one of {RESIZE_MODES}, got {resize!r}"),
        ):
            if not ok:
                raise ValueError(f"ImageProcessor: {msg}")
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.policy, self.fixed_size = policy, None if fixed_size is None else int(fixed_size)
        self.resize = resize
        # (x / 255 - mean) / std == x * scale + bias, fused into one op per image
        std32, mean32 = np.asarray(self.std, np.float32), np.asarray(self.mean, np.float32)
        self._scale = (1.0 / (255.0 * std32)).reshape(3, 1, 1)
        self._bias = (-mean32 / std32).reshape(3, 1, 1)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    def _first_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the step before ``smart_resize``: force_resize, ``fetch_image`` or none."""
        if self.policy == "fixed":
            return self.fixed_size, self.fixed_size
        if self.resize == "official":
            return smart_resize(height, width, FETCH_FACTOR, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS)
        return height, width

    def _last_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Final ``(height, width)`` in pixels for an image of the given size (no decoding needed)."""
        return self._last_size(*self._first_size(height, width))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of an image of the given size; ``rows·cols`` is its token count."""
        h, w = self.target_size(height, width)
        return h // self.patch_size, w // self.patch_size

    def prepare(self, image: ImageSource, name: str | None = None) -> Image.Image:
        """``load_image`` + the resize policy: the RGB image whose pixels get patchified."""
        img = load_image(image, name)
        try:
            for step in (self._first_size, self._last_size):
                h, w = step(img.height, img.width)
                if (w, h) != img.size:
                    img = img.resize((w, h), Image.Resampling.BICUBIC)
        except ValueError as e:
            raise ValueError(f"image {_label(image, name)!r}: {e}") from None
        return img

    def _patchify_into(self, img: Image.Image, out: torch.Tensor) -> None:
        p, m = self.patch_size, self.merge_size
        gh, gw = img.height // p, img.width // p
        # PIL keeps RGB as RGBX: export it as one uint32 per pixel (a plain copy), move whole pixels
        # into window order (cheap 4-byte moves), then split channels while casting to float32.
        # Single-threaded numpy on purpose: a 2-thread torch op is ~3x slower on a busy 2-core host.
        pix = np.frombuffer(img.tobytes("raw", "RGBX"), dtype=np.uint32)
        win = np.ascontiguousarray(pix.reshape(gh // m, m, p, gw // m, m, p).transpose(0, 3, 1, 4, 2, 5))
        rgb = np.moveaxis(win.view(np.uint8).reshape(gh // m, gw // m, m, m, p, p, 4)[..., :3], -1, 4)
        dst = out.view(gh // m, gw // m, m, m, 3, p, p).numpy()
        np.copyto(dst, rgb)  # uint8 -> float32, (C, p, p) inside each patch
        np.multiply(dst, self._scale, out=dst)  # (x / 255 - mean) / std as x * scale + bias
        np.add(dst, self._bias, out=dst)

    def preprocess(self, image: ImageSource, name: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image → (patches (h·w, 3·p·p) float32 in merge-window order, (h, w) in patches)."""
        packed = self([image], names=None if name is None else [name])
        h, w = packed.grid_hw[0].tolist()
        return packed.patches, (h, w)

    def __call__(
        self, images: Sequence[ImageSource] | ImageSource, names: Sequence[str] | None = None
    ) -> PackedImages:
        """Images (PIL, paths, bytes, arrays or tensors: :func:`load_image`) → ``PackedImages``;
        ``names`` label images in error messages. One image (any :data:`ImageSource`, an array or a
        tensor too) is a batch of one; a list of images is the batch."""
        if isinstance(images, ImageSource):
            images = [images]
        prepared = [self.prepare(im, None if names is None else names[i]) for i, im in enumerate(images)]
        grids = [(im.height // self.patch_size, im.width // self.patch_size) for im in prepared]
        out = torch.empty((sum(h * w for h, w in grids), self.patch_dim), dtype=torch.float32)
        start = 0
        for img, (h, w) in zip(prepared, grids):
            self._patchify_into(img, out[start : start + h * w])
            start += h * w
        return PackedImages(out, torch.tensor(grids, dtype=torch.int64).view(-1, 2))

    def to_dict(self) -> dict[str, Any]:
        return dict(
            image_processor_type="cmpt.ImageProcessor",
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            image_mean=list(self.mean),
            image_std=list(self.std),
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            policy=self.policy,
            fixed_size=self.fixed_size,
            resize=self.resize,
            resample=3,
        )  # resample 3 = PIL bicubic

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> ImageProcessor:
        keys = ("patch_size", "merge_size", "min_pixels", "max_pixels", "policy", "fixed_size", "resize")
        kw: dict[str, Any] = {k: d[k] for k in keys if k in d}
        for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
            if ours in d or theirs in d:
                kw[ours] = d.get(ours, d.get(theirs))
        return cls(**{**kw, **overrides})

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` (readable by ``from_hf`` / ``from_dict``)."""
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def for_vit(cls, config: Any, **overrides: Any) -> ImageProcessor:
        """The native-resolution processor of a ``NativeViTConfig`` (or of a ``NativeViT``: its
        ``config``): its patch and merge size, image
        mean and std, the default pixel bounds (docs/method.md §1.4); ``overrides`` that are not None
        win. What a NativeViT directory's ``preprocessor_config.json`` holds unless saved with
        another processor (:func:`cmpt.vision.vit_io.save_vit`)."""
        from .vit import NativeViT

        if isinstance(config, NativeViT):
            config = config.config
        missing = [
            k for k in ("patch_size", "merge_size", "image_mean", "image_std") if not hasattr(config, k)
        ]
        if missing:
            raise TypeError(
                f"ImageProcessor.for_vit takes a NativeViT or its NativeViTConfig, got "
                f"{type(config).__name__} (no {', '.join(missing)})"
            )
        kw = {k: v for k, v in overrides.items() if v is not None}
        return cls(config.patch_size, config.merge_size, mean=config.image_mean, std=config.image_std, **kw)

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        """The image processor of a model, local or by hub id (docs/method.md §1.4):

        * a cmpt VLM directory (``vlm_config.json``; also a MoCa Embedder over one): its
          ``processor/``, else its tower's settings (``vision/config.json``);
        * a cmpt NativeViT directory (``save_pretrained``, ``cmpt export --vfm-only``, a run's
          ``final/vit``): its ``preprocessor_config.json``, else (one written before cmpt saved it)
          its config's patch and merge size, mean and std (:meth:`for_vit`);
        * anything else: :meth:`from_hf` (a Hugging Face checkpoint, a directory holding a
          ``preprocessor_config.json``, or the file itself).

        ``overrides`` win over everything read."""
        from cmpt.hub import CONFIG_FILES, local_model_dir, read_json
        from cmpt.vlm.io import VLM_CONFIG_NAME

        d = local_model_dir(path_or_dir, "image processor", allow_patterns=CONFIG_FILES)
        if (d / VLM_CONFIG_NAME).is_file():
            d = d / "processor" if (d / "processor").is_dir() else d / "vision"
        vit_config = d / "config.json"
        if not (d / CONFIG_NAME).is_file() and vit_config.is_file():
            raw = read_json(vit_config)
            if raw.get("cmpt_model") == "NativeViT":
                from .vit import NativeViTConfig

                return cls.for_vit(NativeViTConfig.from_dict(raw), **overrides)
        return cls.from_hf(d if d.exists() else path_or_dir, **overrides)

    @classmethod
    def from_hf(cls, path_or_dir: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        """Build from a Hugging Face ``preprocessor_config.json``: a directory, its hub id (the cached
        or downloaded snapshot's configs, :func:`cmpt.hub.local_model_dir`) or the file itself.

        Qwen2-VL style configs (``min_pixels``/``max_pixels`` or ``size: {shortest_edge,
        longest_edge}`` in pixels) give ``policy="native"``; fixed-resolution checkpoints (CLIP,
        SigLIP, DINOv2: ``size: {height, width}``, ``crop_size`` or ``shortest_edge``) give
        ``policy="fixed"`` at the checkpoint's input side. ``patch_size`` falls back to the
        ``config.json`` next to it, then 14. ``overrides`` win over everything read.
        """
        from cmpt.hub import CONFIG_FILES, local_model_dir, missing_path_error

        path = local_model_dir(path_or_dir, "image processor", allow_patterns=CONFIG_FILES)
        file = path / CONFIG_NAME if path.is_dir() else path
        fix = f"pass the directory or hub id of a checkpoint with a {CONFIG_NAME}, or the JSON file itself"
        if not path.exists():
            raise missing_path_error(path_or_dir, "image processor", fix)
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(path_or_dir)!r}: {fix}")
        cfg = json.loads(file.read_text())
        if cfg.get("image_processor_type") == "cmpt.ImageProcessor":
            return cls.from_dict(cfg, **overrides)
        kw: dict[str, Any] = {}
        if cfg.get("do_normalize", True):
            for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
                if (val := cfg.get(theirs)) is not None:
                    kw[ours] = [float(val)] * 3 if isinstance(val, (int, float)) else list(val)
        else:
            kw["mean"], kw["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        model_cfg_file = file.parent / "config.json"
        model_cfg = json.loads(model_cfg_file.read_text()) if model_cfg_file.is_file() else {}
        patch = cfg.get("patch_size") or model_cfg.get("patch_size")
        kw["patch_size"] = int(patch or (model_cfg.get("vision_config") or {}).get("patch_size") or 14)
        kw["merge_size"] = int(cfg.get("merge_size", 2))
        size = cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
        qwen_keys = ("min_pixels", "max_pixels", "merge_size")
        if any(k in cfg for k in qwen_keys) or ("shortest_edge" in size and "longest_edge" in size):
            kw["min_pixels"] = int(cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
            kw["max_pixels"] = int(cfg.get("max_pixels") or size.get("longest_edge") or 14 * 14 * 4 * 1280)
        else:  # fixed-resolution checkpoint: its final input side (crop if it crops, else the resize)
            crop = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
            sides = [
                d if isinstance(d, int) else (d or {}).get("height") or (d or {}).get("shortest_edge")
                for d in (crop, cfg.get("size"))
            ]
            if side := next((x for x in sides if x), None):
                kw["policy"], kw["fixed_size"] = "fixed", int(side)
        if overrides.get("policy") == "native" and "fixed_size" not in overrides:
            kw.pop("fixed_size", None)
        return cls(**{**kw, **overrides})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "image_processor_type")
        return f"ImageProcessor({args})"


def unpatchify(
    patches: torch.Tensor, grid_hw: torch.Tensor | Sequence[Sequence[int]], patch_size: int, merge_size: int
) -> list[torch.Tensor]:
    """Inverse of the packing (method.md §1): packed (N, 3·p·p) patches → one (3, H, W) tensor per image."""
    p, m = patch_size, merge_size
    grids = grid_hw.tolist() if isinstance(grid_hw, torch.Tensor) else [list(g) for g in grid_hw]
    if sum(gh * gw for gh, gw in grids) != patches.shape[0]:
        raise ValueError(f"grid_hw {grids} does not cover the {patches.shape[0]} rows of patches")
    images, start = [], 0
    for gh, gw in grids:
        x = patches[start : start + gh * gw].reshape(gh // m, gw // m, m, m, 3, p, p)
        images.append(x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p))
        start += gh * gw
    return images
