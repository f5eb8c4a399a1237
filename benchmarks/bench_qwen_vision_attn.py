"""A Qwen2.5-VL vision tower's training step with transformers' own attention (one SDPA call per
window / image, lengths copied to the host in every block) vs cmpt's packed attention
(``cmpt.embed.vision_attention``: one plan per forward, equal-length segments batched into one SDPA
call, a varlen kernel on CUDA); docs/method.md §6 "Vision attention of Qwen-VL backbones".

The tower has Qwen2.5-VL-3B's geometry (patch 14, 2×2 merge, 112-pixel windows = 8×8 patches, full
attention in every 8th block) with ``--width`` / ``--depth`` / ``--heads`` (defaults sized for a
CPU; ``--full`` = the real 3B tower: 1280 wide, 32 blocks, 16 heads) and random weights;
``--images`` images of ``--size``² pixels (1,024 patches each at 448², 16 windows). One step =
forward, backward of the merged tokens' sum of squares; best of ``--reps`` after a warm-up. bf16
autocast on CUDA, float32 on the CPU. The two outputs are compared (max abs difference).

Prints a table and a last JSON line with the ratio measured in the same run.
Usage: python benchmarks/bench_qwen_vision_attn.py [--images 4] [--size 448] [--reps 5] [--full]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as tf

from cmpt.embed.vision_attention import set_vision_attention


def build_tower(width: int, depth: int, heads: int) -> torch.nn.Module:
    vision = dict(
        depth=depth,
        hidden_size=width,
        num_heads=heads,
        intermediate_size=int(width * 2.67),
        out_hidden_size=2 * width,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=list(range(7, depth, 8)),
    )
    text = dict(vocab_size=64, hidden_size=2 * width, intermediate_size=64, num_hidden_layers=1)
    text.update(num_attention_heads=2, num_key_value_heads=2)
    text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2 * width // 4 - 4]})
    cfg = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text)
    torch.manual_seed(0)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg).model.visual


def step_seconds(tower, rows: torch.Tensor, grid: torch.Tensor, reps: int, device: torch.device):
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def once() -> torch.Tensor:
        with amp:
            out = tower(rows, grid_thw=grid)
            out = out.pooler_output if hasattr(out, "pooler_output") else out
        out.float().square().sum().backward()
        return out.detach().float()

    out = once()  # warm-up
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    tower.zero_grad(set_to_none=True)
    return best, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=448, help="image side in pixels (a multiple of 28)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="the real Qwen2.5-VL-3B tower (1280 × 32 blocks)")
    args = ap.parse_args(argv)
    if args.full:
        args.width, args.depth, args.heads = 1280, 32, 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tower = build_tower(args.width, args.depth, args.heads).to(device)
    side = args.size // 14
    grid = torch.tensor([[1, side, side]] * args.images, device=device)
    rows = torch.randn(args.images * side * side, 3 * 2 * 14 * 14, device=device)
    windows = args.images * ((side + 7) // 8) ** 2
    results = {}
    for name, backend in (("transformers", None), ("packed", "auto")):
        set_vision_attention(tower, backend)
        results[name] = step_seconds(tower, rows, grid, args.reps, device)
    diff = (results["transformers"][1] - results["packed"][1]).abs().max().item()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (float32)"
    print(
        f"Qwen2.5-VL vision tower step ({args.width} wide, {args.depth} blocks, {args.heads} heads) on "
        f"{where}: {args.images} images of {args.size}² = {rows.shape[0]} patches, {windows} windows"
    )
    print(f"  {'attention':<14} {'step ms':>9} {'patches/s':>11}")
    for name, (t, _) in results.items():
        print(f"  {name:<14} {t * 1e3:9.1f} {rows.shape[0] / t:11,.0f}")
    ratio = results["transformers"][0] / results["packed"][0]
    print(f"  packed vs transformers: ×{ratio:.3f} throughput; outputs differ by at most {diff:.2e}")
    figures = {
        "bench": "qwen_vision_attn",
        "device": where,
        "patches": int(rows.shape[0]),
        "windows": windows,
        "step_ms": {k: round(v[0] * 1e3, 2) for k, v in results.items()},
        "packed_vs_transformers": round(ratio, 4),
        "max_abs_diff": diff,
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
