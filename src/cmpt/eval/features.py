"""Frozen-feature extraction for the probes and the record/model plumbing evaluations share (method.md §5).

``extract_features`` returns one vector per image for the linear probe (DINOv2 protocol, scaled
down); ``extract_patch_maps`` returns last-layer patch tokens in raster order for the segmentation
probe. Images run at native resolution (the processor's ``smart_resize`` policy), packed into
batches of at most ``batch_tokens`` patches, without gradients, in eval mode.

Decisions:

* **Feature settings.** ``features``: ``"cls"`` (the CLS token), ``"mean"`` (mean of the patch
  tokens) or ``"cls+mean"`` (both, concatenated). ``layers``: ``"last"`` or ``"last4"``. As in
  DINOv2's ``create_linear_input``, ``last4`` concatenates the CLS tokens of the last four blocks
  and, with ``mean``, adds the patch mean of the *last* block only. Without a CLS token in the
  stream (no CLS, or ``keep_prefix_tokens=False`` as in the CoMP recipes) the setting falls back
  to ``"mean"`` and ``last4`` concatenates the patch means of the last four blocks; the returned
  setting says so (``"features": "mean"``, ``"requested"`` and a ``"note"``). A model with fewer
  than four blocks uses all of them for ``last4`` (``"n_blocks"`` and a note say so).
* **Intermediate layers** come from forward hooks on ``vit.blocks[i]``; the model's final norm is
  applied to them (DINOv2 ``get_intermediate_layers(norm=True)``), so the last block's hooked
  output equals ``vit.encode``'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cmpt.data.llava_source import LlavaSource
from cmpt.encode import budget_batches, default_processor, load_vision_model, to_raster
from cmpt.host_tensor import read_back_in_windows, readback_window, to_device_async
from cmpt.prefetch import ordered_map
from cmpt.vision.image_io import ImageLoadError
from cmpt.vision.processor import ImageProcessor, load_image
from cmpt.vision.vit import NativeViT

__all__ = [
    "EvalRecord",
    "extract_features",
    "extract_patch_maps",
    "feature_setting",
    "first_images",
    "load_records",
    "load_vision",
    "model_device",
    "processor_with",
    "resolve_split_files",
]

log = logging.getLogger("cmpt.eval")

_SYNTH_HINT = "generate one with `cmpt data synth --kind scenes --n N --out DIR`"
FEATURES = ("cls", "mean", "cls+mean")
LAYERS = {"last": 1, "last4": 4}
ImageInput = str | os.PathLike | Image.Image


# ----------------------------------------------------------------------------- records & models
class EvalRecord(dict):
    """A LLaVA record (``id``, ``conversations``, ``meta``) plus ``images``: absolute image paths."""

    @property
    def meta(self) -> dict[str, Any]:
        return self.get("meta") or {}


def load_records(
    path: str | os.PathLike, limit: int | None = None, image_root: str | os.PathLike | None = None
) -> list[EvalRecord]:
    """Records of a LLaVA JSON / JSONL file, image paths resolved against ``image_root``
    (``--image-root``; default: the file's directory) and kept inside it (docs/method.md §4;
    ``--image-root /`` lets absolute paths through, docs/data.md).

    Unreadable records raise (an evaluation must not silently drop samples); ``limit`` keeps the
    first records.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    src = LlavaSource(path, image_root or None)
    n = len(src) if limit is None else min(len(src), int(limit))
    out = []
    for i in range(n):
        rec = src[i]
        images = [rec.image_path(k) for k in range(len(rec.images))]
        body = dict(rec.meta)
        out.append(EvalRecord(body, id=rec.id, images=images, conversations=rec.conversations))
    return out


def first_images(records: Sequence[dict], path: str | os.PathLike) -> list[str]:
    """The first image of every record; a record without one, or whose image cannot be opened
    (missing, not an image), is an :class:`~cmpt.vision.image_io.ImageLoadError` naming the record,
    the image and the fix (the probes must not drop samples, docs/method.md §5)."""
    out = []
    for rec in records:
        if not rec.get("images"):
            raise ValueError(f"{path}: record {rec.get('id')!r} has no image; probes need one per record")
        image = rec["images"][0]
        try:
            _image_size(image)
        except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ImageLoadError(
                f"{path}: record {rec.get('id')!r}: cannot open its image {image} ({e}); fix the image or "
                f"remove the record (`cmpt data check {path}` lists every bad one)"
            ) from None
        out.append(image)
    return out


def resolve_split_files(data: str | os.PathLike, val_json: str | os.PathLike | None) -> tuple[Path, Path]:
    """``(train.json, val.json)`` from a data directory, or the two files given (docs/method.md §5
    probes); a missing path or file is a ``FileNotFoundError`` naming it (``--data`` / ``--val`` of
    ``cmpt eval probe``, ``val_json`` of the Python API)."""
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(
            f"--data {data} does not exist: pass a directory with train.json and val.json, or a train "
            f"JSON and --val VAL_JSON; {_SYNTH_HINT}"
        )
    if data.is_dir():
        train = data / "train.json"
        val = Path(val_json) if val_json is not None else data / "val.json"
    else:
        train, val = data, Path(val_json) if val_json is not None else None
    if val is None:
        raise ValueError(f"--data {data} is a file: pass the validation JSON too (--val / val_json=)")
    for p in (train, val):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; {_SYNTH_HINT}")
    return train, val


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameter-less module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def processor_with(
    processor: ImageProcessor, max_pixels: int | None = None, min_pixels: int | None = None
) -> ImageProcessor:
    """A copy of ``processor`` with ``min_pixels`` / ``max_pixels`` replaced (None keeps them).

    A ``max_pixels`` below the current ``min_pixels`` lowers ``min_pixels`` to it.
    """
    if max_pixels is None and min_pixels is None:
        return processor
    d = processor.to_dict()
    if max_pixels is not None:
        d["max_pixels"] = int(max_pixels)
        d["min_pixels"] = min(d["min_pixels"], int(max_pixels))
    if min_pixels is not None:
        d["min_pixels"] = int(min_pixels)
    if d["max_pixels"] < processor.factor**2:
        raise ValueError(
            f"max_pixels={d['max_pixels']} is below one merge window ({processor.factor}² pixels)"
        )
    return ImageProcessor.from_dict(d)


def load_vision(
    model: str | os.PathLike | torch.nn.Module, *, device: str | torch.device | None = None, **proc_kw: Any
) -> tuple[NativeViT, ImageProcessor]:
    """``(vit, processor)`` from a NativeViT / VLM instance, or a model name, local or by hub id
    (:func:`cmpt.encode.load_vision_model`: a NativeViT, VLM or HF vision checkpoint, or a CoMP
    release tower or VLM, docs/method.md §1.5).

    ``proc_kw`` (``max_pixels``, ``min_pixels``) override the processor's resolution bounds.
    """
    if isinstance(model, NativeViT):
        vit, proc = model, default_processor(model)
    elif isinstance(getattr(model, "vit", None), NativeViT):  # a VisionLanguageModel
        vit = model.vit
        proc = model.processor or default_processor(vit)
    else:
        vit, proc = load_vision_model(model)
    if device is not None:
        vit = vit.to(device)
    return vit, processor_with(proc, proc_kw.get("max_pixels"), proc_kw.get("min_pixels"))


# ----------------------------------------------------------------------------- extraction
def _has_cls(vit: NativeViT) -> bool:
    return vit.cls_token is not None and vit.config.keep_prefix_tokens


def feature_setting(vit: NativeViT, features: str = "cls+mean", layers: str = "last") -> dict[str, Any]:
    """The setting actually used for ``(features, layers)`` on ``vit`` (see the module docstring)."""
    if features not in FEATURES:
        raise ValueError(f"features={features!r}: choose one of {FEATURES}")
    if layers not in LAYERS:
        raise ValueError(f"layers={layers!r}: choose one of {tuple(LAYERS)}")
    n_blocks = min(LAYERS[layers], len(vit.blocks))
    out: dict[str, Any] = {"features": features, "layers": layers, "n_blocks": n_blocks}
    notes = []
    if "cls" in features and not _has_cls(vit):
        out.update(features="mean", requested=features)
        notes.append("no CLS token in the stream (none, or keep_prefix_tokens=False): patch mean only")
    if n_blocks < LAYERS[layers]:
        notes.append(f"the model has only {len(vit.blocks)} blocks: {layers} uses {n_blocks}")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _image_size(img: ImageInput) -> tuple[int, int]:
    """(height, width) without decoding the pixels."""
    if isinstance(img, Image.Image):
        return img.height, img.width
    with Image.open(img) as im:
        return im.height, im.width


def _packed_batches(
    images: Sequence[ImageInput], processor: ImageProcessor, batch_tokens: int, workers: int | None = None
) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, int]]]]:
    """``(indices, patches, grids)`` per packed batch of at most ``batch_tokens`` patches; the
    images are loaded and patchified by ``workers`` threads ahead of the consumer
    (:func:`cmpt.prefetch.ordered_map`, docs/method.md §7)."""
    grids = [processor.grid_size(*_image_size(im)) for im in images]
    with closing(ordered_map(lambda im: processor([load_image(im)]), images, workers=workers)) as prepared:
        for idx in budget_batches([h * w for h, w in grids], batch_tokens):
            packed = [next(prepared) for _ in idx]
            patches = torch.cat([p.patches for p in packed])
            yield idx, patches, [tuple(g) for p in packed for g in p.grid_hw.tolist()]


class _BlockTap:
    """Forward hooks that keep the (normed) outputs of the last ``n`` blocks during one forward."""

    def __init__(self, vit: NativeViT, n: int) -> None:
        self.vit, self.outputs = vit, {}
        self.ids = list(range(len(vit.blocks) - n, len(vit.blocks)))
        self.handles = [vit.blocks[i].register_forward_hook(self._hook(i)) for i in self.ids]

    def _hook(self, i: int):
        def fn(_module, _inputs, output):
            self.outputs[i] = self.vit.norm(output) if self.vit.norm is not None else output

        return fn

    def layers(self) -> list[torch.Tensor]:
        return [self.outputs[i] for i in self.ids]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _pool(
    vit: NativeViT, outs: list[torch.Tensor], grids: list[tuple[int, int]], setting: dict[str, Any]
) -> torch.Tensor:
    """(n, F) features of one packed batch from the hooked block outputs (last one last)."""
    P = vit.config.num_prefix_tokens
    sizes = [P + h * w for h, w in grids]
    per_layer = [x.float().split(sizes) for x in outs]  # [layer][image] -> (P + hw, D)
    k = setting["n_blocks"]
    rows = []
    for i in range(len(grids)):
        parts = []
        if "cls" in setting["features"]:
            parts += [layer[i][0] for layer in per_layer[-k:]]
            if "mean" in setting["features"]:
                parts.append(per_layer[-1][i][P:].mean(0))
        else:
            parts += [layer[i][P:].mean(0) for layer in per_layer[-k:]]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@torch.no_grad()
def _pooled_features(
    vit: NativeViT,
    images: Sequence[ImageInput],
    processor: ImageProcessor,
    settings: Sequence[dict[str, Any]],
    batch_tokens: int = 8192,
) -> list[torch.Tensor]:
    """One pass over ``images`` for several resolved settings → one (n, F) CPU float tensor each."""
    n_layers = max(s["n_blocks"] for s in settings)
    dev, was_training = model_device(vit), vit.training
    vit.eval()
    tap = _BlockTap(vit, n_layers)
    chunks: list[list[torch.Tensor]] = [[] for _ in settings]

    def forwards() -> Iterator[tuple[None, tuple[torch.Tensor, ...]]]:
        for _idx, patches, grids in _packed_batches(images, processor, batch_tokens):
            vit.encode(to_device_async(patches, dev), grids, merge_size=processor.merge_size)
            outs = tap.layers()
            yield None, tuple(_pool(vit, outs, grids, s) for s in settings)
            tap.outputs.clear()

    try:
        for _, pooled in read_back_in_windows(forwards(), readback_window(dev)):
            for j, rows in enumerate(pooled):
                chunks[j].append(rows)
    finally:
        tap.close()
        vit.train(was_training)
    if not chunks[0]:
        raise ValueError("no images to extract features from")
    return [torch.cat(c) for c in chunks]


def extract_features(
    vit: NativeViT,
    images: Sequence[ImageInput],
    *,
    processor: ImageProcessor,
    features: str = "cls",
    layers: str = "last",
    batch_tokens: int = 8192,
    return_setting: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Frozen image features (n, F) at native resolution (docs/method.md §5 linear probe).

    ``images``: paths or PIL images. ``features`` / ``layers``: see the module docstring. With
    ``return_setting=True`` returns ``(features, setting)``, the setting telling what was used
    (e.g. the mean-only fallback when the model has no CLS token).
    """
    setting = feature_setting(vit, features, layers)
    feats = _pooled_features(vit, images, processor, [setting], batch_tokens)[0]
    return (feats, setting) if return_setting else feats


@torch.no_grad()
def extract_patch_maps(
    vit: NativeViT, images: Sequence[ImageInput], processor: ImageProcessor, *, batch_tokens: int = 8192
) -> list[torch.Tensor]:
    """Last-layer patch tokens per image as (h, w, D) float32 CPU tensors in raster order (method.md §5)."""
    dev, was_training = model_device(vit), vit.training
    vit.eval()
    maps: list[torch.Tensor | None] = [None] * len(images)

    def forwards() -> Iterator[tuple[tuple[list[int], list], tuple[torch.Tensor]]]:
        for idx, patches, grids in _packed_batches(images, processor, batch_tokens):
            tokens, _ = vit.encode(to_device_async(patches, dev), grids, merge_size=processor.merge_size)
            yield (idx, grids), (tokens,)

    try:
        for (idx, grids), (tokens,) in read_back_in_windows(forwards(), readback_window(dev)):
            raster = to_raster(tokens, grids, processor.merge_size)
            for i, (h, w), chunk in zip(idx, grids, raster.split([h * w for h, w in grids])):
                maps[i] = chunk.reshape(h, w, -1)
    finally:
        vit.train(was_training)
    return maps  # type: ignore[return-value]
