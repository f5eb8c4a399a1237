"""``cmpt encode --shard-size`` (docs/method.md §7 "Sharded, resumable encoding"): what shards cost
and save against one output file.

Each variant runs ``cmpt encode`` (pooled + patch features) over the same JPEGs in a fresh child
process, which reports its wall time and its peak resident memory above the level before the call
(the model already loaded): one file; shards of ``--shard-size`` images; the same sharded command
run again with every shard present (a finished run's resume: records and the weight digest checked,
nothing encoded); and run again after the last half of the shards were removed (a crash's resume).
The model is a random NativeViT of ``--width`` channels so that the patch features, which one file
holds in memory until it is written, are large (``--max-pixels`` patches of ``--width`` floats per
image). Prints a table; the last line is one JSON object of the figures.
Run: ``python benchmarks/bench_encode_shards.py [--images 96] [--shard-size 12] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
VARIANTS = ("one file", "shards", "rerun, all shards present", "rerun, half the shards missing")


def tiny_wide_vit(width: int):
    from cmpt.vision.vit import NativeViT, NativeViTConfig

    torch.manual_seed(0)
    cfg = NativeViTConfig(
        hidden_size=width, num_layers=2, num_heads=4, intermediate_size=2 * width, pos_grid=8
    )
    return NativeViT(cfg).eval()


def child(args: argparse.Namespace) -> dict[str, float]:
    """In a child process: one variant's wall seconds and peak RSS above the start (bytes)."""
    from bench_common import current_rss, peak_rss_during
    from cmpt.encode import default_processor, encode_images
    from cmpt.encode_shards import encode_sharded

    torch.set_num_threads(1)
    vit = tiny_wide_vit(args.width)
    processor = default_processor(vit, max_pixels=args.max_pixels)
    images = sorted(args.image_dir.glob("*.jpg"))
    opts: dict[str, Any] = {"progress": False, "workers": 0}
    if args.child == "one file":
        run = lambda: encode_images(vit, processor, images, args.out_dir / "one.safetensors", **opts)  # noqa: E731
    else:
        out = args.out_dir / "f.safetensors"
        run = lambda: encode_sharded(vit, processor, images, out, shard_size=args.shard_size, **opts)  # noqa: E731
    base = current_rss()
    t0 = time.perf_counter()
    peak = peak_rss_during(run)
    return {"wall_s": time.perf_counter() - t0, "rss": peak - base}


def in_child(variant: str, args: argparse.Namespace, image_dir: Path, out_dir: Path) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--image-dir", str(image_dir)]
    cmd += ["--out-dir", str(out_dir), "--width", str(args.width), "--max-pixels", str(args.max_pixels)]
    cmd += ["--shard-size", str(args.shard_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=12)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--max-pixels", type=int, default=448 * 448)
    ap.add_argument("--quick", action="store_true", help="smoke run: 6 small images, shards of 2")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--image-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    if args.quick:
        args.images, args.shard_size, args.width, args.max_pixels = 6, 2, 32, 112 * 112
    sys.path.insert(0, str(HERE))
    from bench_prefetch import make_jpegs

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_encode_shards_") as tmp:
        image_dir, out_dir = Path(tmp) / "images", Path(tmp) / "out"
        make_jpegs(image_dir, args.images, small=args.quick)
        out_dir.mkdir()
        for variant in VARIANTS:
            if variant == VARIANTS[3]:
                shards = sorted(out_dir.glob("f-*-of-*.safetensors"))
                for path in shards[len(shards) // 2 :]:
                    path.unlink()
            results[variant] = in_child(variant, args, image_dir, out_dir)
        n_shards = len(list(out_dir.glob("f-*-of-*.safetensors")))
        one_file_bytes = (out_dir / "one.safetensors").stat().st_size
    print(
        f"cmpt encode, {args.images} JPEGs, max_pixels {args.max_pixels}, a {args.width}-wide random ViT, "
        f"{n_shards} shards of {args.shard_size}; output {one_file_bytes / 2**20:.1f} MB; a child process "
        "per variant"
    )
    print(f"{'variant':<34}{'wall s':>10}{'peak RSS + (MB)':>18}")
    for variant, r in results.items():
        print(f"{variant:<34}{r['wall_s']:>10.2f}{r['rss'] / 2**20:>18.1f}")
    one, shards = results["one file"], results["shards"]
    figures = {
        "bench": "encode_shards",
        "peak_rss_ratio_shards_vs_one": round(shards["rss"] / max(one["rss"], 1), 3),
        "wall_ratio_shards_vs_one": round(shards["wall_s"] / one["wall_s"], 3),
        "wall_ratio_rerun_all_present": round(results[VARIANTS[2]]["wall_s"] / shards["wall_s"], 3),
        "wall_ratio_rerun_half_missing": round(results[VARIANTS[3]]["wall_s"] / shards["wall_s"], 3),
        "output_mb": round(one_file_bytes / 2**20, 1),
        "images": args.images,
        "shard_size": args.shard_size,
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
