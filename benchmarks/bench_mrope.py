"""M-RoPE ids of a Qwen2.5-VL micro-batch: transformers' ``get_rope_index`` per sequence (what
cmpt called until now) vs :func:`cmpt.embed.mrope.mrope_position_ids` (one pass over the packed
row), at MoCa-3B layouts (10,240-token micro-batches; docs/method.md §3 "Backbones").

For each layout, in one run and interleaved, median of ``--repeats``: wall time per
micro-batch, aten operations (kernel launches on a GPU) and values read back to the host
(``.item()``, ``.tolist()``, ``bool()`` and ``nonzero`` on a device tensor wait for the GPU).
Both must give the same ids. Prints a table; the last line is one JSON object of the ratios.
Run: ``python benchmarks/bench_mrope.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import random
import statistics
import time
from collections import Counter

import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

from cmpt.embed.mrope import mrope_position_ids
from cmpt.vlm.text_attention import TextLayout

M, VS, VE, PAD = 2, 90, 91, 92
READ_BACKS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default"}


class OpCounter(TorchDispatchMode):
    """Counts aten operations, and those that read a value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def read_backs(self) -> int:
        return sum(n for op, n in self.ops.items() if op in READ_BACKS)


def hf_model() -> torch.nn.Module:
    """A Qwen2.5-VL with the smallest widths: ``get_rope_index`` reads only the config."""
    vision = dict(depth=1, hidden_size=16, out_hidden_size=16, intermediate_size=16, num_heads=2)
    text = dict(
        vocab_size=96, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    text.update(num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    text.update(bos_token_id=0, eos_token_id=0)
    cfg = tf.Qwen2_5_VLConfig(
        vision_config={**vision, "spatial_merge_size": M},
        text_config=text,
        image_token_id=PAD,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
    )
    return tf.Qwen2_5_VLModel(cfg).eval()


def per_sequence(
    model, ids: torch.Tensor, layout: TextLayout, grids: list, counts: list[int]
) -> torch.Tensor:
    """The previous path: ``get_rope_index`` on every sequence alone, concatenated (packed rows)."""
    thw = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long)
    token_types = "mm_token_type_ids" in inspect.signature(model.get_rope_index).parameters
    out, start = [], 0
    for seq, k in zip(ids.split(layout.lengths), counts):
        if k:
            kwargs = {"mm_token_type_ids": (seq[None] == PAD).int()} if token_types else {}
            pos, _ = model.get_rope_index(
                input_ids=seq[None], image_grid_thw=thw[start : start + k], **kwargs
            )
            out.append(pos[:, 0])
        else:
            out.append(torch.arange(seq.numel()).expand(3, -1))
        start += k
    return torch.cat(out, dim=1)[:, None]


def layout_of(n_seq: int, seq_len: int, images: list[tuple[int, int]], seed: int):
    """``n_seq`` sequences of ``seq_len`` tokens; sequence i holds ``images[i % len(images)]``
    (one image, or none when that entry is empty) at a random place."""
    rng = random.Random(seed)
    seqs, grids, counts = [], [], []
    for i in range(n_seq):
        g = images[i % len(images)]
        body = [VS] + [PAD] * (g[0] * g[1] // M**2) + [VE] if g else []
        left = rng.randint(0, seq_len - len(body))
        toks = [rng.randrange(50) for _ in range(left)] + body
        seqs.append(toks + [rng.randrange(50) for _ in range(seq_len - len(toks))])
        grids += [g] if g else []
        counts.append(1 if g else 0)
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    return torch.tensor([t for s in seqs for t in s]), TextLayout.from_cu_seqlens(cu, True), grids, counts


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = hf_model()
    cases = {
        "8 x 1280, one 32x32 image each": (8, 1280, [(32, 32)]),
        "8 x 1280, one 64x48 image each": (8, 1280, [(64, 48)]),
        "32 x 320, one 16x24 image every other": (32, 320, [(16, 24), ()]),
        "32 x 320, text only": (32, 320, [()]),
    }
    print(
        f"{'layout':<40} {'imgs':>4} {'before ms':>10} {'after ms':>9} {'ratio':>6} {'ops':>11} {'reads':>9}"
    )
    ratios = {}
    for seed, (name, (n_seq, seq_len, images)) in enumerate(cases.items()):
        ids, layout, grids, counts = layout_of(n_seq, seq_len, images, seed)
        before = functools.partial(per_sequence, model, ids, layout, grids, counts)
        after = functools.partial(mrope_position_ids, ids, layout, grids or None, M, PAD)
        if not torch.equal(before(), after()):
            raise SystemExit(f"{name}: the two paths give different ids")
        counters = (OpCounter(), OpCounter())
        for counter, fn in zip(counters, (before, after)):
            with counter:
                fn()
        tb, ta = [], []
        for _ in range(args.repeats):  # interleaved, so that the host's load hits both alike
            tb.append(seconds(before))
            ta.append(seconds(after))
        b, a = statistics.median(tb), statistics.median(ta)
        ops = f"{sum(counters[0].ops.values())}->{sum(counters[1].ops.values())}"
        reads = f"{counters[0].read_backs}->{counters[1].read_backs}"
        print(
            f"{name:<40} {len(grids):>4} {1e3 * b:>10.2f} {1e3 * a:>9.2f} {b / a:>6.1f} {ops:>11} {reads:>9}"
        )
        ratios[name] = round(b / a, 2)
    print(json.dumps({"speedup_median": ratios}))


if __name__ == "__main__":
    main()
