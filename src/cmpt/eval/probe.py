"""Linear probe on frozen features: the DINOv2 protocol, scaled down (docs/method.md §5 "Linear probe").

Protocol:

1. Frozen features of every train and val image are extracted **once** (one pass serves every
   feature setting of the grid: CLS and/or patch mean, last block or last four blocks), at native
   resolution; see :mod:`cmpt.eval.features`.
2. Each setting is standardized with the *train* mean and standard deviation.
3. For every (setting, learning rate) a linear head (zero-initialised, so runs are reproducible
   without touching the global RNG) is trained with AdamW, a cosine schedule and seeded
   mini-batches on the train features; top-1 is measured on val.
4. The best val top-1 of the grid is reported with its setting (as DINOv2 selects on val).

Labels come from ``record["meta"][label_key]`` of LLaVA JSON records as written by
:mod:`cmpt.demo.synthetic` (``scenes``: the shape of the largest object); images resolve against
the JSON's directory. Classes are the sorted union of train and val labels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cmpt.data.sources import check_image_root
from cmpt.eval.features import (
    _pooled_features,
    feature_setting,
    first_images,
    load_records,
    load_vision,
    processor_with,
    resolve_split_files,
)
from cmpt.eval.runtime import finish_result, head_threads, pick_device, results_file
from cmpt.vision.processor import ImageProcessor

__all__ = ["linear_probe", "probe_main", "train_linear_head"]

DEFAULT_GRID = (("cls+mean", "last"), ("cls+mean", "last4"))
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1)


def _labels(records: Sequence[dict], label_key: str, path: str | os.PathLike) -> list[Any]:
    out = []
    for rec in records:
        meta = rec.get("meta") or {}
        if label_key not in meta:
            raise ValueError(
                f"{path}: record {rec.get('id')!r} has no meta[{label_key!r}]; "
                "the linear probe needs a class label per record (e.g. the data of "
                "`cmpt data synth --kind scenes --n N --out DIR`)"
            )
        out.append(meta[label_key])
    return out


def _standardize(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
    return (train - mean) / std, (val - mean) / std


def train_linear_head(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    lr: float,
    epochs: int = 100,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.nn.Linear:
    """A linear classifier on (n, F) features: zero init, AdamW, cosine LR, seeded mini-batches."""
    n, dim = x.shape
    head = torch.nn.Linear(dim, num_classes).to(x.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    gen = torch.Generator().manual_seed(seed)
    with head_threads(x.device):
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(x.device) if n > batch_size else None
            for s in range(steps_per_epoch):
                idx = order[s * batch_size : (s + 1) * batch_size] if order is not None else slice(None)
                loss = F.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()


@torch.no_grad()
def _top1(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(1) == y).float().mean()) if len(y) else 0.0


def linear_probe(
    vit: Any,
    train_json: str | os.PathLike,
    val_json: str | os.PathLike,
    *,
    label_key: str = "label",
    feature_grid: Sequence[tuple[str, str]] = DEFAULT_GRID,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    weight_decay: float = 0.0,
    max_pixels: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    batch_tokens: int = 8192,
    processor: ImageProcessor | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Linear-probe top-1 of frozen ``vit`` features (docs/method.md §5; protocol in the module docstring).

    Args:
        vit: a NativeViT (or a VLM, whose ViT is used, or a model path for
            :func:`~cmpt.eval.features.load_vision`).
        train_json, val_json: LLaVA JSON files with ``meta[label_key]`` per record.
        feature_grid: ``(features, layers)`` pairs, features in ``cls | mean | cls+mean``, layers
            in ``last | last4``. Pairs that resolve to the same setting (no CLS) are run once.
        lrs: AdamW learning rates of the grid. epochs, weight_decay, batch_size: head training.
        max_pixels: resolution cap of the native-resolution processor (None: its default).
        processor: use this processor instead (``max_pixels`` still applies).
        image_root: where image paths resolve (default: each JSON file's directory).

    Returns:
        ``{"top1", "setting": {"features", "layers", "lr", "dim", ...}, "grid": [{"features",
        "layers", "lr", "top1", "train_top1"}, ...], "num_classes", "classes", "n_train", "n_val",
        "chance"}``.
    """
    model, proc = load_vision(vit, max_pixels=max_pixels)
    if processor is not None:
        proc = processor_with(processor, max_pixels)
    train_recs = load_records(train_json, image_root=image_root)
    val_recs = load_records(val_json, image_root=image_root)
    if not train_recs or not val_recs:
        raise ValueError(f"empty split: {len(train_recs)} train and {len(val_recs)} val records")
    y_tr_raw = _labels(train_recs, label_key, train_json)
    y_va_raw = _labels(val_recs, label_key, val_json)
    classes = sorted(set(y_tr_raw) | set(y_va_raw), key=lambda c: (str(type(c)), c))
    index = {c: i for i, c in enumerate(classes)}
    y_tr = torch.tensor([index[c] for c in y_tr_raw])
    y_va = torch.tensor([index[c] for c in y_va_raw])

    settings: list[dict[str, Any]] = []
    for features, layers in feature_grid:
        s = feature_setting(model, features, layers)
        if all((s["features"], s["n_blocks"]) != (t["features"], t["n_blocks"]) for t in settings):
            settings.append(s)
    feats_tr = _pooled_features(model, first_images(train_recs, train_json), proc, settings, batch_tokens)
    feats_va = _pooled_features(model, first_images(val_recs, val_json), proc, settings, batch_tokens)

    grid, best = [], None
    for s, x_tr, x_va in zip(settings, feats_tr, feats_va):
        x_tr, x_va = _standardize(x_tr, x_va)
        for lr in lrs:
            head = train_linear_head(
                x_tr,
                y_tr,
                len(classes),
                lr=lr,
                epochs=epochs,
                weight_decay=weight_decay,
                batch_size=batch_size,
                seed=seed,
            )
            row = {
                "features": s["features"],
                "layers": s["layers"],
                "lr": lr,
                "top1": _top1(head, x_va, y_va),
                "train_top1": _top1(head, x_tr, y_tr),
            }
            grid.append(row)
            if best is None or row["top1"] > best[0]["top1"]:
                best = (row, {**s, "lr": lr, "dim": int(x_tr.shape[1])})
    assert best is not None
    return {
        "top1": best[0]["top1"],
        "setting": best[1],
        "grid": grid,
        "num_classes": len(classes),
        "classes": [c if isinstance(c, (int, float, str)) else str(c) for c in classes],
        "n_train": len(train_recs),
        "n_val": len(val_recs),
        "chance": 1.0 / len(classes),
    }


def probe_main(
    model: Any,
    data_dir_or_train_json: str | os.PathLike,
    val_json: str | os.PathLike | None = None,
    *,
    label_key: str = "label",
    feature_grid: Sequence[tuple[str, str]] = DEFAULT_GRID,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 100,
    weight_decay: float = 0.0,
    max_pixels: int | None = None,
    seed: int = 0,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``cmpt eval probe`` (docs/method.md §5): ``model`` is a NativeViT directory, an HF vision checkpoint or
    a VLM directory; the data is a directory with ``train.json`` / ``val.json`` or a train JSON plus
    ``val_json``. Writes the result as JSON to ``out`` when given (a directory, or a path ending in ``/``:
    ``probe_results.json`` inside it); returns it."""
    train, val = resolve_split_files(data_dir_or_train_json, val_json)
    out = results_file(out, "probe")
    check_image_root(image_root, "--image-root")
    vit, proc = load_vision(model, device=pick_device(device), max_pixels=max_pixels)
    result = linear_probe(
        vit,
        train,
        val,
        label_key=label_key,
        feature_grid=feature_grid,
        lrs=lrs,
        epochs=epochs,
        weight_decay=weight_decay,
        max_pixels=max_pixels,
        seed=seed,
        processor=proc,
        image_root=image_root,
    )
    return finish_result(result, out, "probe", model=str(model), train_json=str(train), val_json=str(val))
