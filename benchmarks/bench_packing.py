"""What padding-free packed text buys (docs/method.md §7): padding, throughput and memory.

Three parts, all in one run:

1. **Padding fraction** = (positions the LLM body computes − real tokens) / real tokens, summed
   over micro-batches, for the LM pass and the alignment loss's caption pass. *Before*: one
   right-padded row per sequence (what collate produced before packing: rows × longest row);
   *after*: the layout the model runs, ``TextLayout.positions_computed``.
   (a) The demo's tiny data (``cmpt.demo.tiny_models.prepare_tiny(quick=True)``) through the
       ``tiny/comp_stage2`` and ``tiny/comp_stage3`` recipes: real collated micro-batches of
       ``CompTask.build_loader``, each run through the objective's forward (no gradient) with the
       layouts of the model's text passes and the body's attention implementation recorded. Also
       the attention score entries (per layer and head) of each layout: padded rows compute
       rows × width²; a packed row on ``cmpt_packed_sdpa`` (``cmpt.vlm.packed_sdpa``: SDPA per
       sequence, no mask), flash-attention varlen or a block mask computes Σ lᵢ²; the N² of a
       dense ``(1, 1, N, N)`` block-diagonal mask — what packed text cost before the per-sequence
       kernel — is shown beside them, labelled as not run.
   (b) Synthetic samples shaped like ``configs/comp/siglip-so400m_qwen2.5-0.5b/stage2_pass1.yaml``
       (one image per sample at the stage's forced resolution; its budgets, its sample cap, its
       ``max_text_tokens`` and ``caption_max_tokens``), batched by the real
       ``cmpt.data.batching.TokenBudgetBatcher``. Conversation lengths are drawn from a lognormal
       (printed with the results; two other spreads as a sensitivity check).
2. **Tiny stage-II training step** (objective forward with L_dec + L_align, backward, AdamW with
   lr = 0 so both settings see the same weights), padded text (transformers' SDPA with a
   ``(rows, 1, T, T)`` padding mask) vs packed text (``cmpt_packed_sdpa``: one SDPA call per
   sequence, no mask) on the same micro-batches, interleaved over ``--reps`` repetitions: each
   micro-batch is stepped in both settings back to back (order alternating), wall and CPU time,
   best of the repetitions (the host is shared: a disturbed step can take 10× longer). Throughput
   counts the real text tokens of the LM pass. Memory: bytes autograd saves for backward
   (saved-tensor hooks, exact) and the peak RSS increase over the steps in a fresh subprocess per
   setting. Also the time to build each pass's attention inputs (padded: mask + positions; packed:
   positions only; and what building the dense packed mask would take, for comparison). One torch
   thread by default (``--threads``): on the shared 2-core host, two OpenMP threads that wait on
   each other made steps 4× slower and the timings erratic.
3. Loss check: the packed and padded losses of each timed micro-batch agree.

Prints a table, then one JSON line of the ratios.
Usage: python benchmarks/bench_packing.py [--batches 50] [--reps 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import current_rss, make_step, peak_rss_during, quick_defaults, saved_bytes
from packing_padding import (
    ANSWERS,
    TEMPLATE_TOKENS,
    measure_tiny_padding,
    synthetic_stage2_pass1,
    tiny_batches,
    tiny_task,
)

QUICK = {"batches": 12, "samples": 4000, "reps": 2, "steps": 4}


# --------------------------------------------------------------------------- training step
def mask_build_s(vlm, cu_seqlens, packed: bool, impl: str, repeats: int = 3) -> float:
    """Seconds to build the body's attention inputs (``body_inputs``) of one LM pass with ``impl``,
    best of ``repeats``."""
    from cmpt.vlm.text_attention import TextLayout, body_inputs

    layout = TextLayout.from_cu_seqlens(cu_seqlens, packed)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        body_inputs(layout, impl, "causal", torch.float32, vlm.device)
        best = min(best, time.perf_counter() - t0)
    return best


def compare_steps(task, batches: list[dict], reps: int) -> dict:
    """Padded vs packed training steps on the same batches, interleaved step by step.

    Every micro-batch is stepped once per setting per repetition, the two settings back to back
    (their order alternating), so a change of load on the shared host hits both alike. Per
    setting: wall and CPU (``time.process_time``, all threads of this process) seconds of each
    step; a setting's time for the batch set is the sum over batches of the best repetition; the
    ratio packed / padded is also taken per adjacent pair of steps (median over pairs).
    """
    from cmpt.vlm.text_attention import attn_implementation

    step, _ = make_step(task)
    vlm = task.vlm
    settings = (False, True)
    wall = {s: [[] for _ in batches] for s in settings}
    cpu = {s: [[] for _ in batches] for s in settings}
    pair_ratio: dict[str, list[float]] = {"wall": [], "cpu": []}
    for s in settings:  # warm-up
        vlm.configure_packing(s)
        step(batches[0])
    for r in range(reps):
        for i, b in enumerate(batches):
            got = {}
            for s in settings if (r + i) % 2 == 0 else settings[::-1]:
                vlm.configure_packing(s)
                t0, c0 = time.perf_counter(), time.process_time()
                step(b)
                got[s] = (time.perf_counter() - t0, time.process_time() - c0)
                wall[s][i].append(got[s][0])
                cpu[s][i].append(got[s][1])
            pair_ratio["wall"].append(got[True][0] / got[False][0])
            pair_ratio["cpu"].append(got[True][1] / got[False][1])
    saved: dict[bool, list[int]] = {s: [] for s in settings}
    sums: dict[bool, list[dict[str, float]]] = {s: [] for s in settings}
    for s in settings:
        vlm.configure_packing(s)
        for b in batches:
            nbytes, _, loss = saved_bytes(task, b)
            saved[s].append(nbytes)
            sums[s].append(loss)
    impls, mask_ms = {}, {}
    for s in settings:
        vlm.configure_packing(s)
        impls[s] = attn_implementation(vlm.llm)
        mask_ms[s] = sum(mask_build_s(vlm, b["cu_seqlens"], s, impls[s]) for b in batches) * 1e3
    # what the dense (1, 1, N, N) packed mask took to build before cmpt_packed_sdpa (not run)
    mask_ms["dense"] = sum(mask_build_s(vlm, b["cu_seqlens"], True, "sdpa") for b in batches) * 1e3
    diff = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(sums[False], sums[True]) for k in a)
    tokens = sum(int(b["num_tokens"]) for b in batches)
    best = {s: sum(min(t) for t in wall[s]) for s in settings}
    best_cpu = {s: sum(min(t) for t in cpu[s]) for s in settings}
    median = {s: sum(statistics.median(t) for t in wall[s]) for s in settings}
    return {
        "tokens": tokens,
        "best_s": best,
        "median_s": median,
        "best_cpu_s": best_cpu,
        "tokens_per_s": {s: tokens / best[s] for s in settings},
        "tokens_per_cpu_s": {s: tokens / best_cpu[s] for s in settings},
        "pair_ratio": {k: statistics.median(v) for k, v in pair_ratio.items()},
        "saved_mb": {s: sum(saved[s]) / len(saved[s]) / 2**20 for s in settings},
        "loss_rel_diff": diff,
        "mask_ms": mask_ms,
        "impls": impls,
    }


def child(args) -> None:
    """One setting in a fresh process: peak RSS increase over ``--steps`` steps (less AdamW state)."""
    task = tiny_task("tiny/comp_stage2", packing=args.packed)
    batches = tiny_batches(task, args.step_batches)
    step, _ = make_step(task)
    base = current_rss()
    peak = peak_rss_during(lambda: [step(batches[i % len(batches)]) for i in range(args.steps)])
    adam = sum(2 * p.numel() * p.element_size() for p in task.model.parameters() if p.requires_grad)
    print(json.dumps({"rss_increase_mb": round((peak - base - adam) / 2**20, 1), "packed": task.vlm.packing}))


def rss_compare(args) -> dict[bool, list[float]]:
    out: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rss_reps):
        for packed in (False, True) if r % 2 == 0 else (True, False):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ]
            cmd += ["--step-batches", str(args.step_batches), "--packed", str(int(packed))]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            got = json.loads(res.strip().splitlines()[-1])
            assert got["packed"] == packed, got
            out[packed].append(got["rss_increase_mb"])
    return out


# --------------------------------------------------------------------------- report
def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=50, help="tiny micro-batches for the padding figures")
    ap.add_argument("--samples", type=int, default=16000, help="synthetic stage2_pass1 samples")
    ap.add_argument("--step-batches", type=int, default=4, help="micro-batches of the timed step")
    ap.add_argument("--reps", type=int, default=5, help="round-robin repetitions of the timed steps")
    ap.add_argument("--steps", type=int, default=8, help="steps per RSS subprocess")
    ap.add_argument("--rss-reps", type=int, default=1, help="RSS subprocesses per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="fewer batches, samples and repetitions")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--packed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        args.packed = bool(args.packed)
        return child(args)
    if args.quick:
        quick_defaults(ap, args, QUICK)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    tiny = {}
    for recipe in ("tiny/comp_stage2", "tiny/comp_stage3"):
        tiny[recipe] = measure_tiny_padding(recipe, args.batches)
    synth = {k: synthetic_stage2_pass1(args.samples, v) for k, v in ANSWERS.items()}
    task = tiny_task("tiny/comp_stage2")
    batches = tiny_batches(task, args.step_batches)
    steps = compare_steps(task, batches, args.reps)
    rss = rss_compare(args)

    print(f"Packed vs padded text (CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__})")
    print()
    print("1. Padding fraction = (positions computed − real tokens) / real tokens")
    head = f"  {'data':<37}{'pass':<9}{'micro-b.':>9}{'seq/mb':>8}{'real tok':>10}{'before':>9}{'after':>8}"
    print(head + f"{'attn cells: padded':>20}{'packed run':>12}{'dense mask*':>13}")
    rows = []
    for recipe, (tallies, _) in tiny.items():
        for name, t in tallies.items():
            rows.append((f"{recipe} (quick tiny data)", name, t))
    for key, (tallies, _) in synth.items():
        for name, t in tallies.items():
            rows.append((f"stage2_pass1 synthetic, {key}", name, t))
    for label, name, t in rows:
        if not t.batches:
            print(f"  {label:<37}{name:<9}{'— (no caption pass: align off)':>44}")
            continue
        seq = sum(t.rows) / len(t.rows)
        cells = f"{t.attn_padded / t.attn_blocks:>19.2f}×{t.attn_run / t.attn_blocks:>11.2f}×"
        cells += f"{t.attn_dense / t.attn_blocks:>12.2f}×"
        line = f"  {label:<37}{name:<9}{t.batches:>9}{seq:>8.1f}{t.real:>10}"
        print(line + f"{pct(t.before):>9}{pct(t.after):>8}" + cells)
    ran = sorted(set().union(*(t.impls for _, _, t in rows)))
    print("  attention cells: score entries per layer and head, relative to Σ lᵢ² (each sequence alone);")
    print("  padded = rows × width²; 'packed run' = the packed layout on the kernel the model ran")
    print(f"  (tiny: recorded, {', '.join(ran)}: SDPA per sequence = Σ lᵢ²; synthetic: the same kernel);")
    print("  * dense mask = N² of one packed row under a dense (1, 1, N, N) block-diagonal mask: what")
    print("    packed text cost before cmpt_packed_sdpa, NOT what runs now.")
    info = synth["main"][1]
    print(f"  synthetic: {info['image']}; budgets {info['budgets']}; per sample text = merged tokens + 2")
    print(f"  + {TEMPLATE_TOKENS} template + question ~ round(LogNormal(ln 15, 0.5)) + answer ~")
    print("  round(LogNormal(ln 180, σ)), σ = 0.8 (main), 0.5 (narrow), 1.2 (wide), clipped to")
    print("  max_text_tokens; caption = answer cut to caption_max_tokens.")
    for key, (_, i) in synth.items():
        print(
            f"    {key}: text mean {i['text_mean']:.0f}, median {i['text_p50']:.0f}, "
            f"p99 {i['text_p99']:.0f}, {i['clipped']} clipped; caption mean {i['caption_mean']:.0f}, "
            f"{pct(i['caption_capped'])} capped"
        )
    n_mean, n_max = info["packed_n_mean"], info["packed_n_max"]
    print(
        f"  main: a packed LM row holds {n_mean:.0f} tokens on average (max {n_max}); a dense boolean "
        f"(1, 1, N, N) mask of that row would be {n_mean**2 / 2**20:.0f} MiB (max {n_max**2 / 2**20:.0f} "
        "MiB); cmpt_packed_sdpa builds none"
    )
    print()
    tp, sv = steps["tokens_per_s"], steps["saved_mb"]
    n_b, n_tok = len(batches), steps["tokens"]
    print(f"2. Tiny stage-II training step, {n_b} micro-batches ({n_tok} real text tokens), {args.reps} reps")
    im = steps["impls"]
    print(
        f"  padded: {im[False]} with a (rows, 1, T, T) mask; packed: {im[True]} (SDPA per sequence, no mask)"
    )
    tc, pr = steps["tokens_per_cpu_s"], steps["pair_ratio"]
    head = f"  {'text':<8}{'tokens/s':>10}{'per CPU-s':>11}{'s (best)':>10}{'s (median)':>12}"
    print(head + f"{'saved for bwd':>15}{'peak RSS +':>12}")
    for s in (False, True):
        line = f"  {'packed' if s else 'padded':<8}{tp[s]:>10.0f}{tc[s]:>11.0f}"
        line += f"{steps['best_s'][s]:>10.2f}{steps['median_s'][s]:>12.2f}"
        print(line + f"{sv[s]:>12.1f} MB{statistics.median(rss[s]):>9.1f} MB")
    print(
        f"  packed / padded: tokens/s {tp[True] / tp[False]:.3f} (best wall), "
        f"{tc[True] / tc[False]:.3f} (CPU); step time packed / padded, median over adjacent pairs: "
        f"{pr['wall']:.3f} (wall), {pr['cpu']:.3f} (CPU)"
    )
    print(
        f"  saved for backward {sv[True] / sv[False]:.3f}×, peak RSS increase "
        f"{statistics.median(rss[True]) / statistics.median(rss[False]):.3f}×"
    )
    mm = steps["mask_ms"]
    print(
        f"  attention inputs of the {n_b} LM passes (once per pass, the caption pass again): "
        f"{mm[False]:.1f} ms padded (mask + positions), {mm[True]:.1f} ms packed (positions only); "
        f"a dense packed mask would take {mm['dense']:.1f} ms (not built)"
    )
    print(f"  loss sums packed vs padded: max relative difference {steps['loss_rel_diff']:.1e}")
    print(f"  (wall {time.perf_counter() - t_start:.0f} s)")

    s2 = tiny["tiny/comp_stage2"][0]
    s3 = tiny["tiny/comp_stage3"][0]
    main_synth = synth["main"][0]
    print(
        json.dumps(
            {
                "lm_padding_before": round(s2["lm"].before, 4),
                "lm_padding_after": round(s2["lm"].after, 4),
                "caption_padding_before": round(s2["caption"].before, 4),
                "caption_padding_after": round(s2["caption"].after, 4),
                "stage3_lm_padding_before": round(s3["lm"].before, 4),
                "stage3_lm_padding_after": round(s3["lm"].after, 4),
                "stage2_pass1_padding_before": round(main_synth["lm"].before, 4),
                "stage2_pass1_padding_after": round(main_synth["lm"].after, 4),
                "stage2_pass1_caption_padding_before": round(main_synth["caption"].before, 4),
                "tiny_attn_cells_packed_run_vs_padded": round(s2["lm"].attn_run / s2["lm"].attn_padded, 3),
                "tiny_attn_cells_dense_mask_vs_padded_not_run": round(
                    s2["lm"].attn_dense / s2["lm"].attn_padded, 3
                ),
                "stage2_pass1_attn_cells_packed_run_vs_padded": round(
                    main_synth["lm"].attn_run / main_synth["lm"].attn_padded, 3
                ),
                "stage2_pass1_attn_cells_dense_mask_vs_padded_not_run": round(
                    main_synth["lm"].attn_dense / main_synth["lm"].attn_padded, 3
                ),
                "packed_attn_implementation": steps["impls"][True],
                "packed_vs_padded_tokens_per_s": round(tp[True] / tp[False], 3),
                "packed_vs_padded_tokens_per_cpu_s": round(tc[True] / tc[False], 3),
                "packed_vs_padded_step_time_pair_median": round(pr["wall"], 3),
                "packed_vs_padded_saved_mb": round(sv[True] / sv[False], 3),
                "packed_vs_padded_rss_increase": round(
                    statistics.median(rss[True]) / max(statistics.median(rss[False]), 1e-9), 3
                ),
                "loss_rel_diff": float(f"{steps['loss_rel_diff']:.2e}"),
            }
        )
    )


if __name__ == "__main__":
    main()
