"""`cmpt demo`: the offline end-to-end run on built-in data (what `make demo` runs).

Current pipeline: generate mixed-size synthetic images → build a tiny DINOv2-shaped Hugging Face
checkpoint locally → convert it with ``NativeViT.from_hf`` → native-resolution features with
``cmpt encode`` (packed, token-budget batches), with and without C-RoPE → a summary.
Everything generated is cached under ``$CMPT_CACHE`` (default ``~/.cache/cmpt``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .recipes.paths import cache_root


def tiny_hf_dinov2(root: Path, seed: int = 0) -> Path:
    """A small DINOv2-architecture HF checkpoint with random weights (no hub access needed), cached."""
    out = root / "models" / f"tiny-dinov2-hf-s{seed}"
    if (out / "model.safetensors").is_file():
        return out
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Dinov2Config(
        hidden_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=14
    )
    tf.Dinov2Model(cfg).save_pretrained(out)
    stats = {
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "crop_size": {"height": 224, "width": 224},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(stats))
    return out


def scenes(root: Path, n: int) -> Path:
    """Synthetic scene images of varied sizes and aspect ratios (cached)."""
    from .data.synthetic import generate

    out = root / "data" / f"scenes-{n}"
    path = out / "train.json"
    return path if path.is_file() else generate("scenes", n, out, seed=0, split="train")


def run_demo(out: str | os.PathLike = "runs/demo", quick: bool = False, cache: str | None = None) -> dict:
    from .encode import encode_images, load_vit, processor_for

    root, out = cache_root(cache), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = scenes(root, 8 if quick else 32)
    records = json.loads(data.read_text())
    images = [data.parent / r["image"] for r in records]
    ckpt = tiny_hf_dinov2(root)
    print(f"[1/3] data: {len(images)} synthetic images in {data.parent}; checkpoint: {ckpt}")

    results = {}
    for rope in (False, True):
        vit = load_vit(ckpt, rope=rope)
        proc = processor_for(vit, ckpt, max_pixels=14 * 14 * 4 * 256)
        t = time.perf_counter()
        res = encode_images(vit, proc, images, out / f"features_rope{int(rope)}.safetensors", progress=False)
        results[rope] = (res, time.perf_counter() - t)
    print(
        f"[2/3] encoded with NativeViT.from_hf (DINOv2 → C-RoPE off/on), "
        f"{proc.min_pixels}..{proc.max_pixels} px"
    )

    from safetensors.torch import load_file

    feats = load_file(results[False][0].out)
    grids = feats["grid_hw"].tolist()
    print("[3/3] summary")
    print(f"  {'image':<28}{'size (WxH)':>12}{'grid':>9}{'tokens':>8}")
    for r, (h, w) in list(zip(records, grids))[:8]:
        print(f"  {r['id']:<28}{r['meta']['width']:>6}x{r['meta']['height']:<5}{h:>4}x{w:<4}{h * w:>8}")
    if len(records) > 8:
        print(f"  ... {len(records) - 8} more")
    summary = {
        "images": len(images),
        "patches": int(feats["offsets"][-1]),
        "pooled_dim": int(feats["pooled"].shape[1]),
        "seconds_rope_off": round(results[False][1], 2),
        "seconds_rope_on": round(results[True][1], 2),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "features": [results[False][0].out, results[True][0].out],
    }
    print(json.dumps(summary, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
