"""Frozen-feature extraction, linear probe and segmentation probe (docs/method.md §5)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from cmpt.eval.features import extract_features, extract_patch_maps, feature_setting, load_vision
from cmpt.eval.probe import linear_probe, probe_main
from cmpt.eval.segmentation import seg_main, seg_probe
from cmpt.vision.processor import ImageProcessor, unpatchify
from cmpt.vision.vit import NativeViT, NativeViTConfig

P = 14


def tiny_vit(cls_token: bool = True, seed: int = 0) -> NativeViT:
    torch.manual_seed(seed)
    cfg = NativeViTConfig(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, pos_grid=4, cls_token=cls_token
    )
    return NativeViT(cfg).eval()


def colour_split(root, split: str, n: int, seed: int, shuffle: bool = False):
    """56×56 noisy images whose class is the dominant colour channel (0 red, 1 green, 2 blue)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        k = i % 3
        arr = rng.uniform(0, 0.45, (56, 56, 3))
        arr[..., k] += 0.5
        rel = f"images/{split}_{i}.png"
        Image.fromarray((arr * 255).astype(np.uint8)).save(root / rel)
        conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "colour"}]
        recs.append({"id": f"{split}-{i}", "image": rel, "conversations": conv, "meta": {"label": k}})
    if shuffle:
        labels = [r["meta"]["label"] for r in recs]
        random.Random(seed).shuffle(labels)
        for r, y in zip(recs, labels):
            r["meta"]["label"] = y
    path = root / f"{split}.json"
    path.write_text(json.dumps(recs))
    return path


def blob_split(
    root, split: str, n: int, seed: int, ignore: bool = True, seg_classes: bool = False, side: int = 112
):
    """112×112 images of random 28-px blobs; label 1 where the red channel > 0.5, else 0.

    A 20×20 corner is marked 255 (ignore) in every label map. ``side`` ≠ 112 resizes image and
    label map (nearest) to ``side × side``.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        red = np.kron(rng.random((4, 4)) < 0.5, np.ones((28, 28)))
        arr = rng.uniform(0, 1, (112, 112, 3))
        arr[..., 0] = np.where(red > 0, rng.uniform(0.6, 1, red.shape), rng.uniform(0, 0.4, red.shape))
        mask = (arr[..., 0] > 0.5).astype(np.uint8)
        if ignore:
            mask[:20, :20] = 255
        rel, rel_mask = f"images/{split}_{i}.png", f"images/{split}_{i}_mask.png"
        img, lab = Image.fromarray((arr * 255).astype(np.uint8)), Image.fromarray(mask, mode="L")
        img.resize((side, side), Image.Resampling.BICUBIC).save(root / rel)
        lab.resize((side, side), Image.Resampling.NEAREST).save(root / rel_mask)
        meta = {"mask": rel_mask, **({"seg_classes": ["background", "red", "spare"]} if seg_classes else {})}
        recs.append({"id": f"{split}-{i}", "image": rel, "conversations": [], "meta": meta})
    path = root / f"{split}.json"
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return root, colour_split(root, "train", 60, 0), colour_split(root, "val", 60, 1)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    return root, blob_split(root, "train", 12, 0), blob_split(root, "val", 6, 1)


# ----------------------------------------------------------------------------- features
def test_feature_settings_and_fallback():
    with_cls, no_cls = tiny_vit(True), tiny_vit(False)
    assert feature_setting(with_cls, "cls+mean", "last") == {
        "features": "cls+mean",
        "layers": "last",
        "n_blocks": 1,
    }
    s = feature_setting(no_cls, "cls+mean", "last4")
    assert s["features"] == "mean" and s["requested"] == "cls+mean" and s["n_blocks"] == 2
    assert "no CLS" in s["note"] and "only 2 blocks" in s["note"]
    with pytest.raises(ValueError, match="features"):
        feature_setting(with_cls, "max", "last")
    with pytest.raises(ValueError, match="layers"):
        feature_setting(with_cls, "cls", "last2")


def test_extract_features_match_encode(colours):
    _, train, _ = colours
    vit = tiny_vit(True)
    proc = ImageProcessor(P, 2, mean=vit.config.image_mean, std=vit.config.image_std)
    images = [train.parent / "images" / f"train_{i}.png" for i in range(3)]
    packed = proc(images)
    tokens, prefix = vit.encode(packed.patches, packed.grid_hw)
    mean = torch.stack([c.mean(0) for c in tokens.split(packed.tokens_per_image)])
    got = {f: extract_features(vit, images, processor=proc, features=f) for f in ("cls", "mean", "cls+mean")}
    torch.testing.assert_close(got["cls"], prefix[:, 0])
    torch.testing.assert_close(got["mean"], mean)
    torch.testing.assert_close(got["cls+mean"], torch.cat([prefix[:, 0], mean], 1))
    feats, setting = extract_features(
        vit, images, processor=proc, features="cls+mean", layers="last4", batch_tokens=16, return_setting=True
    )
    assert feats.shape == (3, 3 * 32) and setting["n_blocks"] == 2  # 2 CLS tokens + last-layer mean
    torch.testing.assert_close(feats[:, 32:], got["cls+mean"])  # the last block's output is normed
    # no CLS in the stream: mean only, and the setting says so
    no_cls = tiny_vit(False)
    feats, setting = extract_features(
        no_cls, images, processor=proc, features="cls+mean", return_setting=True
    )
    assert feats.shape == (3, 32) and setting["features"] == "mean"


def test_patch_maps_raster_order(colours):
    _, train, _ = colours
    vit = tiny_vit(True)
    proc = ImageProcessor(P, 2, mean=vit.config.image_mean, std=vit.config.image_std)
    images = [Image.open(train.parent / "images" / f"train_{i}.png") for i in range(2)]
    maps = extract_patch_maps(vit, images, proc, batch_tokens=16)
    assert [tuple(m.shape) for m in maps] == [(4, 4, 32), (4, 4, 32)]
    packed = proc(images)
    chw = unpatchify(packed.patches, packed.grid_hw, P, 2)
    ref = vit.forward_images(chw)  # prefix first, then patches in raster order
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m.reshape(16, 32), r[1:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_separable(colours):
    _, train, val = colours
    r = linear_probe(tiny_vit(True), train, val, lrs=(1e-2, 0.1), epochs=40)
    assert r["top1"] >= 0.9
    assert r["num_classes"] == 3 and r["n_train"] == 60 and r["n_val"] == 60
    assert len(r["grid"]) == 2 * 2 and {g["layers"] for g in r["grid"]} == {"last", "last4"}
    assert r["setting"]["lr"] in (1e-2, 0.1) and r["setting"]["features"] == "cls+mean"
    assert r["top1"] == max(g["top1"] for g in r["grid"])


def test_linear_probe_shuffled_labels_is_chance(colours, tmp_path):
    root, _, val = colours
    shuffled = colour_split(root, "train_shuffled", 60, 0, shuffle=True)
    r = linear_probe(tiny_vit(True), shuffled, val, lrs=(1e-2, 0.1), epochs=40)
    assert abs(r["top1"] - r["chance"]) < 0.25  # best of the grid on 60 val images: chance ± selection bias


def test_probe_main_data_dir_and_missing_labels(colours, tmp_path):
    root, _, _ = colours
    tiny_vit(False).save_pretrained(tmp_path / "vit")
    out = tmp_path / "probe.json"
    r = probe_main(tmp_path / "vit", root, lrs=(0.1,), epochs=20, feature_grid=(("cls", "last"),), out=out)
    assert r["top1"] >= 0.9 and r["setting"]["features"] == "mean" and "note" in r["setting"]
    assert json.loads(out.read_text())["top1"] == r["top1"]
    bad = root / "nolabel.json"
    bad.write_text(json.dumps([{"id": "x", "image": "images/val_0.png", "conversations": [], "meta": {}}]))
    with pytest.raises(ValueError, match=r"meta\['label'\]"):
        linear_probe(tiny_vit(), bad, bad, lrs=(0.1,), epochs=1)


# ----------------------------------------------------------------------------- segmentation probe
def test_seg_probe_red_channel(blobs):
    _, train, val = blobs
    r = seg_probe(tiny_vit(False), train, val, epochs=30, lr=3e-2)
    assert r["num_classes"] == 2 and r["miou"] >= 0.8 and r["pixel_acc"] >= 0.9
    assert len(r["per_class_iou"]) == 2
    masks = [np.asarray(Image.open(val.parent / f"images/val_{i}_mask.png")) for i in range(6)]
    assert r["n_pixels"] == sum(int((m != 255).sum()) for m in masks)  # ignore index excluded


def test_seg_num_classes_from_meta_and_bad_labels(tmp_path):
    train = blob_split(tmp_path, "train", 2, 0, seg_classes=True, side=100)  # resized to 112: labels too
    val = blob_split(tmp_path, "val", 2, 1, seg_classes=True, side=100)
    vit = tiny_vit(False)
    r = seg_probe(vit, train, val, epochs=2)
    assert r["num_classes"] == 3 and len(r["per_class_iou"]) == 3
    assert r["per_class_iou"][2] in (None, 0.0)  # no class-2 label: NaN (→ None) unless predicted
    assert r["n_pixels"] == 2 * (100 * 100 - 18 * 18)  # evaluated at the label map's own size
    with pytest.raises(ValueError, match="outside"):
        seg_probe(vit, train, val, epochs=1, num_classes=1)


def test_seg_main_writes_json(blobs, tmp_path):
    root, _, _ = blobs
    tiny_vit(False).save_pretrained(tmp_path / "vit")
    _, proc = load_vision(tmp_path / "vit", max_pixels=56 * 56)
    assert proc.max_pixels == 56 * 56 and proc.min_pixels <= 56 * 56
    r = seg_main(tmp_path / "vit", root, epochs=2, out=tmp_path / "seg.json")
    assert 0.0 <= r["miou"] <= 1.0 and (tmp_path / "seg.json").is_file()
