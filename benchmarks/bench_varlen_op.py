"""Block-diagonal attention on the CPU: the per-segment Python loop (``sdpa_loop``) vs the
``cmpt::varlen_sdpa`` operator (docs/method.md §6 "Compiled blocks").

1. *eager*: forward + backward of the attention alone, best of ``--reps``, for packed text
   (Qwen2.5-0.5B heads: 14 query / 2 key-value heads of 64; ``--tokens`` per row cut into random
   lengths, causal) and images (16 heads of 64; equal lengths, then mixed).
2. *compiled*: a pre-norm transformer block (``--width``) compiled with inductor and trained for
   ``--layouts`` micro-batches of packed text, each cut differently (what a data loader feeds):
   seconds for the whole stream (compilation included, inductor's caches off) and dynamo's compiled
   versions of the block.
   The loop makes dynamo guard on the lengths (a version per layout until ``recompile_limit``, 8,
   then eager); the operator's boundaries are a tensor.

Prints a table and a last JSON line of ratios (loop / operator) measured in the same run.
Usage: python benchmarks/bench_varlen_op.py [--tokens 2048] [--reps 3] [--layouts 12] [--width 256]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch._dynamo
import torch._inductor.config
from torch import nn
from torch._dynamo.utils import counters

from cmpt.vision.attention import build_plan, sdpa_loop, varlen_attention

IMPLS = {"loop": sdpa_loop, "op": varlen_attention}  # on the CPU: the cmpt::varlen_sdpa operator


def cut(total: int, rng: random.Random, lo: int = 32, hi: int = 700) -> list[int]:
    """Random sequence lengths summing to ``total``."""
    out: list[int] = []
    while sum(out) < total:
        out.append(min(rng.randint(lo, hi), total - sum(out)))
    return out


def attention_seconds(impl, lengths: list[int], heads: int, kv_heads: int, causal: bool, reps: int) -> float:
    n = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, heads, 64, generator=g, requires_grad=True)
    k, v = (torch.randn(n, kv_heads, 64, generator=g, requires_grad=True) for _ in range(2))
    plan = build_plan(lengths, "sdpa", q.device, q.dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        impl(q, k, v, plan, causal, None).square().sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


class Block(nn.Module):
    """Pre-norm attention + MLP over one packed row ``(N, width)``, GQA 4:1, causal."""

    def __init__(self, width: int, impl) -> None:
        super().__init__()
        self.heads, self.impl = width // 64, impl
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.kv = nn.Linear(width, width), nn.Linear(width, width // 2)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        h = self.norm1(x)
        q = self.q(h).unflatten(-1, (self.heads, 64))
        k, v = self.kv(h).unflatten(-1, (2, self.heads // 4, 64)).unbind(1)
        x = x + self.out(self.impl(q, k, v, plan, True, None).flatten(1))
        return x + self.mlp(self.norm2(x))


@torch._inductor.config.patch(force_disable_caches=True)  # every compilation cold, for both
def compiled_stream(impl, layouts: list[list[int]], width: int) -> tuple[float, int]:
    """Seconds to train a compiled block on every layout, and the block's compiled versions."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    block = Block(width, impl)
    block.compile()
    opt = torch.optim.SGD(block.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for lengths in layouts:
        x = torch.randn(sum(lengths), width)
        block(x, build_plan(lengths, "sdpa", x.device, x.dtype)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    versions = int(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return seconds, versions


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layouts", type=int, default=12)
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args(argv)
    if args.tokens < 256 or args.reps < 1 or args.layouts < 1:
        ap.error("--tokens must be at least 256 (one 256-token image), --reps and --layouts at least 1")
    if args.width % 256:
        ap.error(f"--width {args.width}: must be a multiple of 256 (heads of 64, 4 per key/value head)")
    rng = random.Random(0)
    cases = {
        "text, causal, GQA 14:2": (cut(args.tokens, rng), 14, 2, True),
        "images, 256 tokens each": ([256] * (args.tokens // 256), 16, 16, False),
        "images, mixed sizes": (cut(args.tokens, rng, 64, 1024), 16, 16, False),
    }
    rows, ratios = [], {}
    for name, (lengths, heads, kv_heads, causal) in cases.items():
        t = {i: attention_seconds(f, lengths, heads, kv_heads, causal, args.reps) for i, f in IMPLS.items()}
        rows.append((f"eager fwd+bwd: {name} ({len(lengths)} segments)", t["loop"], t["op"], ""))
        ratios[f"eager {name}"] = round(t["loop"] / t["op"], 3)
    layouts = [cut(args.tokens, rng) for _ in range(args.layouts)]
    stream = {i: compiled_stream(f, layouts, args.width) for i, f in IMPLS.items()}
    versions = f"{stream['loop'][1]} vs {stream['op'][1]} compiled versions"
    rows.append((f"compiled block, {args.layouts} layouts", stream["loop"][0], stream["op"][0], versions))
    ratios["compiled stream"] = round(stream["loop"][0] / stream["op"][0], 3)
    print(f"{'case':58s} {'loop s':>9s} {'op s':>9s} {'loop/op':>8s}")
    for name, a, b, note in rows:
        print(f"{name:58s} {a:9.4f} {b:9.4f} {a / b:8.3f}  {note}")
    result = {"ratios_loop_over_op": ratios, "versions": {i: s[1] for i, s in stream.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
