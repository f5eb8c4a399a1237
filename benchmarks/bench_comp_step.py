"""The tiny CoMP stage-II training step on CPU (issue: CoMP training, "Measure").

Reports, on the same pre-collated micro-batches of the tiny recipe (`configs/tiny/comp_stage2.yaml`):
  * tokens/s of a full step (forward with L_dec + L_align, backward, AdamW step): text tokens and
    vision patches per second;
  * the time share of the alignment loss's text forward (caption through the LLM, no grad);
  * memory with and without activation checkpointing: bytes of tensors saved for backward (exact,
    via saved-tensor hooks) and the process's peak RSS increase over a run of steps (a fresh
    subprocess per setting).
The starting points are the demo's tiny models (`cmpt.demo.tiny_models.prepare_tiny`, cached).
Prints a table, then one JSON line.

Usage: python benchmarks/bench_comp_step.py [--steps 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from bench_common import current_rss, make_step, peak_rss_during, saved_bytes


def build(quick: bool, act_ckpt: bool):
    from cmpt.demo.tiny_models import prepare_tiny
    from cmpt.recipes import load_recipe
    from cmpt.recipes.comp import CompTask
    from cmpt.train.distributed import apply_activation_checkpointing

    paths = prepare_tiny(quick=quick)
    sets = [f"model.vision={paths['vision']}", f"model.llm={paths['llm']}", f"data.path={paths['data']}"]
    cfg, _ = load_recipe("tiny/comp_stage2", [*sets, "model.init=''", "run.dir=/tmp/cmpt-bench-comp"])
    torch.manual_seed(0)
    task = CompTask(cfg)
    if act_ckpt:
        apply_activation_checkpointing(task.fsdp_units())
    loader = iter(task.build_loader(0, 1))
    return task, [next(loader) for _ in range(4)]


def caption_inputs(batch) -> tuple[torch.Tensor, list[int]]:
    """The caption pass's packed input as the objective builds it: the non-empty captions (samples
    with an image; in the tiny stage-II data every sample has one) and their boundaries."""
    cu = batch["caption_cu_seqlens"].tolist()
    keep = [i for i in range(len(cu) - 1) if cu[i + 1] > cu[i]]
    ids = torch.cat([batch["caption_ids"][cu[i] : cu[i + 1]] for i in keep])
    bounds = [0]
    for i in keep:
        bounds.append(bounds[-1] + cu[i + 1] - cu[i])
    return ids, bounds


def child(args) -> None:
    """One setting in a fresh process: peak RSS increase over `steps` training steps."""
    task, batches = build(args.quick, args.act_ckpt)
    step, _ = make_step(task, lr=1e-5)
    base = current_rss()  # model, data and batches loaded
    peak = peak_rss_during(lambda: [step(batches[i % len(batches)]) for i in range(args.steps)])
    adam_state = sum(2 * p.numel() * p.element_size() for p in task.model.parameters() if p.requires_grad)
    stats = {
        "rss_increase_mb": round((peak - base - adam_state) / 2**20, 1),
        "saved_mb": saved_bytes(task, batches[0])[0] / 2**20,
    }
    print(json.dumps(stats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--act-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    task, batches = build(args.quick, act_ckpt=False)
    step, _ = make_step(task, lr=1e-5)
    step(batches[0])  # warm-up
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    t_step = (time.perf_counter() - t0) / args.steps
    text = sum(b["num_tokens"] for b in batches) / len(batches)
    vision = sum(int(b["patches"].shape[0]) for b in batches) / len(batches)

    captions = [caption_inputs(b) for b in batches]
    t0 = time.perf_counter()
    for i in range(args.steps):
        task.vlm.text_features(*captions[i % len(captions)])
    t_text = (time.perf_counter() - t0) / args.steps

    mem = {}
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)] + ["--quick"] * args.quick
        out = subprocess.run(cmd + ["--act-ckpt"] * ckpt, capture_output=True, text=True, check=True).stdout
        mem[ckpt] = json.loads(out.strip().splitlines()[-1])

    print(f"tiny stage II step (CPU, {torch.get_num_threads()} threads), {args.steps} steps, 4 micro-batches")
    print(f"  micro-batch: {text:.0f} text tokens, {vision:.0f} vision patches; step {t_step * 1e3:.0f} ms")
    print(f"  throughput: {text / t_step:.0f} text tokens/s, {vision / t_step:.0f} vision patches/s")
    print(f"  alignment text forward: {t_text * 1e3:.1f} ms = {100 * t_text / t_step:.1f}% of the step")
    print(f"  {'activation checkpointing':<26}{'saved for backward':>20}{'peak RSS increase':>20}")
    for ckpt in (False, True):
        saved, rss = mem[ckpt]["saved_mb"], mem[ckpt]["rss_increase_mb"]
        print(f"  {'on' if ckpt else 'off':<26}{saved:>17.1f} MB{rss:>17.1f} MB")
    print(
        json.dumps(
            {
                "step_ms": round(t_step * 1e3, 1),
                "text_tokens_per_s": round(text / t_step),
                "vision_patches_per_s": round(vision / t_step),
                "align_text_forward_share": round(t_text / t_step, 4),
                "saved_mb_no_ckpt": round(mem[False]["saved_mb"], 2),
                "saved_mb_ckpt": round(mem[True]["saved_mb"], 2),
                "rss_increase_mb_no_ckpt": mem[False]["rss_increase_mb"],
                "rss_increase_mb_ckpt": mem[True]["rss_increase_mb"],
            }
        )
    )


if __name__ == "__main__":
    main()
