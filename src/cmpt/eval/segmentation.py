"""Segmentation probe: frozen last-layer patch tokens → BatchNorm + 1×1 linear head (docs/method.md §5).

Protocol (the DINOv2 "linear" segmentation head, scaled down):

* Every image runs once through the frozen ViT at native resolution; its last-layer patch tokens
  are kept as an (h, w, D) map in raster order (:func:`cmpt.eval.features.extract_patch_maps`).
* The head is ``BatchNorm(D)`` followed by a 1×1 convolution (a linear layer per patch token);
  batch statistics are taken over all patch tokens of a mini-batch of images.
* The (K, h, w) logits are upsampled **bilinearly** (``align_corners=False``) to the size of the
  label map, and trained with cross-entropy ignoring label 255 (mean over the valid pixels of the
  mini-batch), AdamW with a cosine schedule, seeded. Training label maps are first resized
  (nearest) to the image size the ViT saw (``h·p × w·p``), as training on the resized image's
  labels in mmsegmentation; validation is at the original label-map size.
* Validation: argmax of the upsampled logits against the label map, accumulated in one
  :class:`~cmpt.eval.metrics.SegMeter`; mIoU is the nanmean over classes (ignore index 255).

Label maps come from ``record["meta"][mask_key]``: a PNG path relative to the JSON's directory
(``cmpt.demo.synthetic`` scenes: mode ``L``, value = class index, 255 = ignore).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cmpt.data.sources import check_image_root, resolve_image_path
from cmpt.eval.features import (
    extract_patch_maps,
    first_images,
    load_records,
    load_vision,
    model_device,
    processor_with,
    resolve_split_files,
)
from cmpt.eval.metrics import SegMeter
from cmpt.eval.runtime import finish_result, head_threads, pick_device, results_file
from cmpt.vision.processor import ImageProcessor

__all__ = ["IGNORE_INDEX", "SegHead", "load_mask", "seg_main", "seg_probe"]

IGNORE_INDEX = 255


class SegHead(nn.Module):
    """``BatchNorm1d(D)`` + ``Linear(D, K)`` on patch tokens, i.e. BN + 1×1 conv on the (D, h, w) map."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, maps: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """(h, w, D) maps → per image (1, K, H, W) logits bilinearly upsampled to ``sizes``."""
        flat = torch.cat([m.reshape(-1, m.shape[-1]) for m in maps])
        logits = self.linear(self.bn(flat)).split([m.shape[0] * m.shape[1] for m in maps])
        out = []
        for m, lg, (H, W) in zip(maps, logits, sizes):
            grid = lg.reshape(1, m.shape[0], m.shape[1], -1).permute(0, 3, 1, 2)
            out.append(F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False))
        return out


def load_mask(path: str | os.PathLike) -> torch.Tensor:
    """A label map (H, W) int64 from a single-channel PNG (mode ``L``, ``P`` or ``I``)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"mask {path}: mode {im.mode!r}; expected a single-channel class-index image")
        return torch.from_numpy(np.asarray(im).astype(np.int64))


def _masks(
    records: list[dict], mask_key: str, json_path: str | os.PathLike, image_root: str | os.PathLike | None
) -> list[torch.Tensor]:
    root = os.fspath(image_root) if image_root else os.path.dirname(os.path.abspath(json_path))
    out = []
    for rec in records:
        rel = (rec.get("meta") or {}).get(mask_key)
        if rel is None:
            raise ValueError(f"{json_path}: record {rec.get('id')!r} has no meta[{mask_key!r}] label map")
        out.append(load_mask(resolve_image_path(root, rel, str(rec.get("id")))))
    return out


def _resize_labels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map (labels, 255 included, are never mixed)."""
    if tuple(mask.shape) == size:
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _num_classes(records: list[dict], masks: list[torch.Tensor]) -> int:
    for rec in records:
        names = (rec.get("meta") or {}).get("seg_classes")
        if names:
            return len(names)
    top = max(int(m[m != IGNORE_INDEX].max()) if (m != IGNORE_INDEX).any() else 0 for m in masks)
    return top + 1


def seg_probe(
    vit: Any,
    train_json: str | os.PathLike,
    val_json: str | os.PathLike,
    *,
    mask_key: str = "mask",
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = 1e-2,
    max_pixels: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    batch_tokens: int = 8192,
    processor: ImageProcessor | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """mIoU of a BN + 1×1 linear head on frozen patch tokens (method.md §5; protocol in the module docstring).

    Args:
        vit: a NativeViT (or a VLM, or a model path for :func:`~cmpt.eval.features.load_vision`).
        train_json, val_json: LLaVA JSON files whose ``meta[mask_key]`` name label-map PNGs.
        num_classes: default: ``len(meta["seg_classes"])`` when present, else the largest label + 1.
        epochs, lr, batch_size (images), weight_decay: head training (AdamW, cosine schedule).
        max_pixels: resolution cap of the native-resolution processor.
        image_root: where image and label-map paths resolve (default: each JSON file's directory).

    Returns:
        ``{"miou", "per_class_iou" (None for classes absent from prediction and label),
        "pixel_acc", "num_classes", "n_train", "n_val", "n_pixels" (valid val pixels), "epochs", "lr"}``.
    """
    model, proc = load_vision(vit, max_pixels=max_pixels)
    if processor is not None:
        proc = processor_with(processor, max_pixels)
    train_recs = load_records(train_json, image_root=image_root)
    val_recs = load_records(val_json, image_root=image_root)
    if not train_recs or not val_recs:
        raise ValueError(f"empty split: {len(train_recs)} train and {len(val_recs)} val records")
    y_tr = _masks(train_recs, mask_key, train_json, image_root)
    y_va = _masks(val_recs, mask_key, val_json, image_root)
    k = int(num_classes) if num_classes is not None else _num_classes(train_recs + val_recs, y_tr + y_va)
    for name, masks in (("train", y_tr), ("val", y_va)):
        for m in masks:
            bad = (m != IGNORE_INDEX) & ((m < 0) | (m >= k))
            if bad.any():
                raise ValueError(
                    f"{name} label map has values {sorted(set(m[bad].tolist()))[:5]} outside [0, {k}) "
                    f"and != {IGNORE_INDEX}; pass num_classes="
                )
    x_tr = extract_patch_maps(model, first_images(train_recs, train_json), proc, batch_tokens=batch_tokens)
    x_va = extract_patch_maps(model, first_images(val_recs, val_json), proc, batch_tokens=batch_tokens)
    p = proc.patch_size  # train at the resolution the ViT saw: labels resized (nearest) to h·p × w·p
    y_tr = [_resize_labels(y, (m.shape[0] * p, m.shape[1] * p)) for y, m in zip(y_tr, x_tr)]
    dev = model_device(model)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = SegHead(x_tr[0].shape[-1], k).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(len(x_tr) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    with head_threads(dev):
        head.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_tr), generator=gen).tolist()
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                labels = [y_tr[i].to(dev) for i in idx]
                logits = head([x_tr[i].to(dev) for i in idx], [tuple(y.shape) for y in labels])
                total = sum(
                    F.cross_entropy(lg, y[None], ignore_index=IGNORE_INDEX, reduction="sum")
                    for lg, y in zip(logits, labels)
                )
                valid = sum(int((y != IGNORE_INDEX).sum()) for y in labels)
                loss = total / max(valid, 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        head.eval()
        meter = SegMeter(k, IGNORE_INDEX)
        with torch.no_grad():
            for x, y in zip(x_va, y_va):
                logits = head([x.to(dev)], [tuple(y.shape)])[0]
                meter.update(logits[0].argmax(0).cpu(), y)
    iou = meter.iou_per_class()
    return {
        "miou": meter.compute(),
        "per_class_iou": [None if math.isnan(v) else float(v) for v in iou],
        "pixel_acc": meter.pixel_accuracy(),
        "num_classes": k,
        "n_train": len(train_recs),
        "n_val": len(val_recs),
        "n_pixels": int(meter.confusion.sum()),
        "epochs": epochs,
        "lr": lr,
    }


def seg_main(
    model: Any,
    data_dir_or_train_json: str | os.PathLike,
    val_json: str | os.PathLike | None = None,
    *,
    mask_key: str = "mask",
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = 1e-2,
    max_pixels: int | None = None,
    seed: int = 0,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``cmpt eval seg`` (docs/method.md §5): ``model`` is a NativeViT directory, an HF vision checkpoint or a
    VLM directory; the data is a directory with ``train.json`` / ``val.json`` (e.g. synthetic
    scenes) or a train JSON plus ``val_json``. Writes the result as JSON to ``out`` when given (a directory,
    or a path ending in ``/``: ``seg_results.json`` inside it)."""
    train, val = resolve_split_files(data_dir_or_train_json, val_json)
    out = results_file(out, "seg")
    check_image_root(image_root, "--image-root")
    vit, proc = load_vision(model, device=pick_device(device), max_pixels=max_pixels)
    result = seg_probe(
        vit,
        train,
        val,
        mask_key=mask_key,
        num_classes=num_classes,
        epochs=epochs,
        lr=lr,
        max_pixels=max_pixels,
        seed=seed,
        processor=proc,
        image_root=image_root,
    )
    return finish_result(result, out, "seg", model=str(model), train_json=str(train), val_json=str(val))
