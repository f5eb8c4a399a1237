"""Where a training micro-batch makes the host wait for the GPU (docs/benchmarks.md "Host-device
synchronisations"): the CoMP stage-II and MoCa CPT micro-batches of the GPU benchmarks, on tiny
shapes, run under ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising call is counted by
the Python line that made it (cmpt's or a library's).

Usage: python benchmarks/sync_audit.py [--micro-batches 3] [--smoke]
Needs CUDA (without it, it says so and exits 0; ``--smoke`` then runs the same steps uncounted, a
check of the script). Prints one table per recipe and, last, one JSON line of syncs per micro-batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_comp_gpu import comp_setup
from bench_moca_gpu import moca_setup
from gpu_harness import Setup, _copy_to, _step_fn, placed_batches

REPO = str(Path(__file__).resolve().parents[1])


def count_syncs(
    setup: Setup, device: torch.device, micro_batches: int, host_keys: bool = True
) -> tuple[Counter, int]:
    """``{(file, line): syncs}`` over ``micro_batches`` micro-batches after one warm-up (its one-time
    syncs, e.g. caches filled, are not counted), and how many micro-batches were counted.
    ``host_keys``: the batches placed as the trainer places them, else all on the device."""
    model, _, groups = _copy_to(setup, device)
    step = _step_fn(setup, model, torch.optim.AdamW(groups, fused=device.type == "cuda"), device)
    batches = placed_batches(setup, device, host_keys)
    step(batches[0])
    counted: Counter = Counter()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(micro_batches):
                step(batches[i % len(batches)])
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    for r in records if cuda else []:
        counted[(r.filename.replace(REPO + "/", ""), r.lineno)] += 1
    return counted, micro_batches


def report(name: str, counted: Counter, n: int, top: int) -> float:
    """Print the lines that synchronise most; returns syncs per micro-batch."""
    total = sum(counted.values()) / n
    print(f"\n{name}: {total:.1f} synchronisations per micro-batch ({n} counted)")
    print(f"  {'per micro-batch':>15}  where")
    for (path, line), k in counted.most_common(top):
        print(f"  {k / n:>15.1f}  {path}:{line}")
    return total


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batches", type=int, default=3, help="counted micro-batches per recipe")
    ap.add_argument("--top", type=int, default=25, help="lines shown per recipe")
    ap.add_argument("--smoke", action="store_true", help="without CUDA: run the steps uncounted")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("sync_audit.py: needs CUDA (synchronisations are a GPU's); nothing measured")
        return {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = max(args.micro_batches, 1)
    comp = argparse.Namespace(shapes="tiny", images=2, fixed_size=112, batches=2)
    moca = argparse.Namespace(shapes="tiny", batches=2, text_budget=1024, vision_budget=96)
    comp_setup_, moca_setup_ = comp_setup(comp), moca_setup(moca, device)
    figures = {}
    for keep, tag in ((True, ""), (False, "_batch_on_device")):
        where = "host_keys on the host" if keep else "whole batch on the device"
        comp_counts = count_syncs(comp_setup_, device, n, keep)
        moca_counts = count_syncs(moca_setup_, device, n, keep)
        figures[f"comp_syncs_per_microbatch{tag}"] = report(f"CoMP stage II, {where}", *comp_counts, args.top)
        figures[f"moca_syncs_per_microbatch{tag}"] = report(f"MoCa CPT, {where}", *moca_counts, args.top)
    print(json.dumps({"bench": "sync_audit", "device": str(device), **figures}))
    return figures


if __name__ == "__main__":
    main()
