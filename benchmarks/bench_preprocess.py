"""Image preprocessing throughput: cmpt.vision.processor vs the floor and vs transformers
(docs/method.md §1, §1.4).

Generates seeded JPEGs (random sizes and aspect ratios up to ~1 MP, gradients + noise so decoding is
realistic) in a temporary directory and measures images/s, best of ``--repeats`` passes, for

  floor  decode + RGB convert + PIL bicubic resize to the smart_resize size (what any pipeline pays)
  cmpt   ImageProcessor: decode + resize + normalize + patchify (merge-window order), one call per image
  hf     transformers Qwen2VLImageProcessorPil(temporal_patch_size=1), decode included, one call per image

and checks that cmpt and hf give the same patches. The last line printed is one JSON object.
Run: ``python benchmarks/bench_preprocess.py [--n 64] [--repeats 3] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmpt.vision.processor import ImageProcessor, smart_resize


def make_jpegs(directory: Path, n: int, seed: int, max_pixels: int = 1_000_000) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        area = rng.uniform(0.1, 1.0) * max_pixels
        aspect = math.exp(rng.uniform(math.log(1 / 4), math.log(4)))  # width / height
        h = max(16, int(math.sqrt(area / aspect)))
        w = max(16, int(h * aspect))
        y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
        x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
        phase = rng.uniform(0, 2 * math.pi, 3)
        chans = [
            127 + 100 * np.sin(2 * math.pi * (rng.uniform(1, 6) * x + rng.uniform(1, 6) * y) + phase[c])
            for c in range(3)
        ]
        arr = np.stack(chans, axis=-1) + rng.normal(0, 18, (h, w, 3)).astype(np.float32)
        path = directory / f"img_{i:03d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=int(rng.integers(80, 96)))
        paths.append(path)
    return paths


def best_rates(fns: dict, items: list, repeats: int) -> dict:
    """Best images/s of each function over ``repeats`` passes over ``items``.

    Passes are interleaved (a, b, c, a, b, c, ...) so that load from other processes on a shared
    host hits every pipeline alike; the best pass is the least disturbed one.
    """
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            for item in items:
                fn(item)
            best[key] = min(best[key], time.perf_counter() - start)
    return {k: len(items) / t for k, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = ImageProcessor()
    hf = Qwen2VLImageProcessorPil(
        temporal_patch_size=1,
        patch_size=proc.patch_size,
        merge_size=proc.merge_size,
        image_mean=list(proc.mean),
        image_std=list(proc.std),
        min_pixels=proc.min_pixels,
        max_pixels=proc.max_pixels,
    )

    def floor(path: Path) -> Image.Image:
        img = Image.open(path).convert("RGB")
        h, w = smart_resize(img.height, img.width, proc.factor, proc.min_pixels, proc.max_pixels)
        return img if (w, h) == img.size else img.resize((w, h), Image.Resampling.BICUBIC)

    def ours(path: Path) -> tuple[torch.Tensor, list[int]]:
        batch = proc([path])
        return batch.patches, batch.grid_hw[0].tolist()

    def theirs(path: Path) -> tuple[torch.Tensor, list[int]]:
        out = hf(Image.open(path), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0, 1:].tolist()

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.n, args.seed)
        sizes = [Image.open(p).size for p in paths]
        mb = sum(p.stat().st_size for p in paths) / 1e6
        for fn in (floor, ours, theirs):  # warm-up (imports, allocator, caches)
            fn(paths[0])
        rates = best_rates({"floor": floor, "cmpt": ours, "hf": theirs}, paths, args.repeats)
        max_diff, grids_equal, tokens = 0.0, True, 0
        for path in paths:  # correctness: the same patches and grids as transformers
            (a, grid_a), (b, grid_b) = ours(path), theirs(path)
            grids_equal &= grid_a == grid_b and a.shape == b.shape
            max_diff = max(max_diff, (a - b).abs().max().item()) if a.shape == b.shape else math.inf
            tokens += a.shape[0]
    floor_rate, cmpt_rate, hf_rate = rates["floor"], rates["cmpt"], rates["hf"]
    mp_in = sum(w * h for w, h in sizes) / len(sizes) / 1e6
    mp_out = tokens * proc.patch_size**2 / len(sizes) / 1e6

    print(f"{args.n} JPEGs ({mb:.1f} MB), mean {mp_in:.2f} MP in -> {mp_out:.2f} MP after smart_resize, "
          f"{tokens} patches; torch threads = {torch.get_num_threads()}; best of {args.repeats}")  # fmt: skip
    print(f"{'pipeline':<48}{'img/s':>9}{'ms/img':>9}{'vs floor':>10}")
    for label, rate in (
        ("floor: decode + RGB + bicubic resize", floor_rate),
        ("cmpt ImageProcessor (+ normalize + patchify)", cmpt_rate),
        ("HF Qwen2VLImageProcessorPil (t=1)", hf_rate),
    ):
        print(f"{label:<48}{rate:>9.1f}{1000 / rate:>9.2f}{floor_rate / rate:>9.2f}x")
    speedup = cmpt_rate / hf_rate
    print(f"cmpt vs HF: {speedup:.2f}x faster; max |cmpt - HF| = {max_diff:.3g}; grids equal: {grids_equal}")
    print(
        json.dumps(
            {
                "n_images": args.n,
                "torch_threads": torch.get_num_threads(),
                "floor_img_s": round(floor_rate, 2),
                "cmpt_img_s": round(cmpt_rate, 2),
                "hf_img_s": round(hf_rate, 2),
                "cmpt_vs_floor": round(floor_rate / cmpt_rate, 3),
                "cmpt_vs_hf_speedup": round(cmpt_rate / hf_rate, 3),
                "max_abs_diff": max_diff,
                "grids_equal": grids_equal,
            }
        )
    )


if __name__ == "__main__":
    main()
