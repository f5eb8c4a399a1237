"""Packed NativeViT vs Hugging Face DINOv2 on a mixed-resolution batch (issue: native-resolution ViT).

16 images, aspect ratios 1:3 to 3:1, sides up to 448 px, a ViT-S/14 (DINOv2-S shape, random weights).
Forward + backward time of:
  * cmpt packed   — all images in one sequence, block-diagonal attention (NativeViT.forward_images)
  * HF padded     — each image zero-padded to the batch's largest height and width, one batch
  * HF one-by-one — each image alone (gradients accumulated)
Same weights (NativeViT.from_hf of the same checkpoint). Prints a table, then one JSON line of ratios.
Achieved GFLOP/s is reported against a large fp32 matmul measured in the same run.

Two size distributions by default (long side from 224 or from 112 px, up to 448), one table each.
On a GPU (``--device cuda --precision bf16``) the packed path uses the ``auto`` attention backend
(flash-attn, else torch's varlen flash kernel) and the peak is a large bf16 matmul.
Usage: python benchmarks/bench_vit.py [--repeats 3] [--images 16] [--seed 0] [--min-long 224 112]
       [--model S|B|L] [--device cpu|cuda] [--precision fp32|bf16] [--attn auto|sdpa|flex|varlen|flash]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import tempfile
import time

import torch
import transformers as tf

from cmpt import NativeViT

P = 14
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}  # width, depth, heads


def mixed_sizes(
    n: int, seed: int, min_long: int = 224, max_side: int = 448, step: int = 28
) -> list[tuple[int, int]]:
    """Long side uniform in [min_long, max_side], aspect log-uniform in [1/3, 3], multiples of ``step``."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        long_side = rng.randrange(min_long, max_side + 1, step)
        ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        short = max(step, round(long_side / max(ratio, 1 / ratio) / step) * step)
        sizes.append((long_side, short) if ratio >= 1 else (short, long_side))
    return sizes


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_times_interleaved(fns: list, repeats: int) -> list[float]:
    """Best time of each function, measured round-robin so that a burst of load on this shared
    machine hits every method alike instead of one of them."""
    for fn in fns:
        fn()  # warm-up
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def matmul_bench(device: torch.device, dtype: torch.dtype):
    """A large matmul workload and its FLOPs, timed among the methods (a peak taken apart from them
    on this shared machine can land in a quiet or a busy moment and mislead the comparison)."""
    n, reps = (8192, 10) if device.type == "cuda" else (2048, 8)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(reps):
            a @ b

    return run, 2 * n**3 * reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--min-long", type=int, nargs="+", default=[224, 112], help="smallest long side, one run per value"
    )
    ap.add_argument("--model", choices=sorted(SIZES), default="S", help="ViT-S/B/L/14 (DINOv2 shapes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    ap.add_argument("--attn", default="auto", help="attention backend of the packed model")
    ap.add_argument("--profile", action="store_true", help="also print the top ops of packed and padded")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    width, depth, heads = SIZES[args.model]
    shape = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads)
    hf = tf.Dinov2Model(tf.Dinov2Config(**shape, image_size=518, patch_size=P))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        vit = NativeViT.from_hf(d, rope=False, keep_prefix_tokens=True, attn=args.attn)
    hf.to(device).train()
    vit.to(device).train()

    peak_bench = matmul_bench(device, dtype)
    amp = (
        (lambda: torch.autocast(device.type, dtype=dtype))
        if args.precision == "bf16"
        else contextlib.nullcontext
    )
    results = []
    for m in args.min_long:
        sizes = mixed_sizes(args.images, args.seed, m)
        results.append(measure(vit, hf, sizes, args.repeats, peak_bench, m, device, amp, args.profile))
    print(
        json.dumps(
            results[0]
            if len(results) == 1
            else {f"long_side_from_{m}": r for m, r in zip(args.min_long, results)}
        )
    )


def profile(fn, name: str, device: torch.device, rows: int = 15) -> None:
    """Print ``fn``'s most expensive ops (device time on a GPU, own CPU time otherwise)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        fn()
        _sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {name} ---")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def measure(
    vit, hf, sizes, repeats: int, peak_bench, min_long: int, device, amp, show_profile: bool = False
) -> dict:
    """Time packed / padded / one-by-one forward+backward on one batch of ``sizes``; print a table."""
    imgs = [torch.randn(3, h, w, device=device) for h, w in sizes]
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    padded = torch.zeros(len(imgs), 3, hmax, wmax, device=device)
    for i, im in enumerate(imgs):
        padded[i, :, : im.shape[1], : im.shape[2]] = im

    def run_packed():
        vit.zero_grad(set_to_none=True)
        with amp():
            out = torch.cat(vit.forward_images(imgs))
        out.float().square().mean().backward()

    def run_padded():
        hf.zero_grad(set_to_none=True)
        with amp():
            out = hf(pixel_values=padded).last_hidden_state
        out.float().square().mean().backward()

    def run_single():
        hf.zero_grad(set_to_none=True)
        for im in imgs:
            with amp():
                out = hf(pixel_values=im[None]).last_hidden_state
            out.float().square().mean().backward()

    run_matmul, matmul_flops = peak_bench
    fns = [run_packed, run_padded, run_single, run_matmul]
    t_packed, t_padded, t_single, t_matmul = best_times_interleaved(fns, repeats)
    peak = matmul_flops / t_matmul / 1e9
    if show_profile:
        profile(run_packed, "cmpt packed", device)
        profile(run_padded, "HF padded", device)

    tokens = [1 + (h // P) * (w // P) for h, w in sizes]
    flops = 3 * sum(n * vit.num_flops_per_token(n) for n in tokens)  # forward + backward ≈ 3 × forward
    n_pad = 1 + (hmax // P) * (wmax // P)
    padded_flops = 3 * len(imgs) * n_pad * vit.num_flops_per_token(n_pad)
    rows = [
        ("cmpt packed", t_packed, sum(tokens)),
        ("HF padded", t_padded, len(imgs) * n_pad),
        ("HF one-by-one", t_single, sum(tokens)),
    ]
    threads = f"cpu, threads={torch.get_num_threads()}"
    where = torch.cuda.get_device_name() if device.type == "cuda" else threads
    print(f"\nlong side in [{min_long}, 448], {where}, images={len(imgs)}: {sizes}")
    print(f"padded batch: {hmax}x{wmax};  large-matmul peak: {peak:.1f} GFLOP/s")
    print(
        f"padded/packed FLOPs: {padded_flops / flops:.2f} (the padded speedup if both ran at one efficiency)"
    )
    print(f"{'method':<15}{'fwd+bwd s':>11}{'tokens':>9}{'useful GFLOP/s':>16}{'vs packed':>11}")
    for name, t, ntok in rows:
        print(f"{name:<15}{t:>11.3f}{ntok:>9}{flops / t / 1e9:>16.1f}{t / t_packed:>10.2f}x")
    return {
        "speedup_vs_padded": round(t_padded / t_packed, 3),
        "speed_vs_one_by_one": round(t_single / t_packed, 3),
        "padded_flop_ratio": round(padded_flops / flops, 3),
        "padded_fraction_of_peak": round(padded_flops / t_padded / 1e9 / peak, 3),
        "packed_gflops": round(flops / t_packed / 1e9, 1),
        "matmul_peak_gflops": round(peak, 1),
        "packed_fraction_of_peak": round(flops / t_packed / 1e9 / peak, 3),
        "t_packed_s": round(t_packed, 4),
        "t_padded_s": round(t_padded, 4),
        "t_one_by_one_s": round(t_single, 4),
    }


if __name__ == "__main__":
    main()
