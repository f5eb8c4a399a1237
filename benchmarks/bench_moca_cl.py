"""MoCa stage 2 (contrastive learning) on a tiny setup: the training step with and without GradCache
(docs/method.md §3 "Stage 2"; ``loss.grad_cache_chunk`` = inputs per chunk, 0 = off).

Setup: recipe ``tiny/moca_cl`` through ``load_recipe`` + ``MocaTask`` (stage ``cl``), starting from
``--init DIR`` or else a VLM assembled here from the demo's quick tiny ViT + LM
(``prepare_tiny(quick=True)`` → ``VisionLanguageModel.build`` → ``save_pretrained``; fresh
PatchMerger), on synthetic retrieval pairs (``synth_retrieval_main``, ``train.jsonl``) written to a
temporary directory. ``stage.batch_size`` = ``--pairs`` (16) pairs per step, ``k`` = 2 hard
negatives, so a step embeds ``pairs · (2 + k)`` = 64 inputs; the first ``--batches`` global batches
of the recipe's loader (task-homogeneous) are collated once and reused by every setting.

Settings: plain (``grad_cache_chunk`` = 0) and GradCache with each of ``--chunks`` inputs per
chunk. All settings share one task (the same weights): the objective reads ``grad_cache_chunk``
from the recipe's loss config at each call, so a setting is that one value.

1. **Step** = objective forward, backward of ``cl_sum / cl_count`` (the trainer's normalization),
   AdamW step at lr 0 (so every repetition sees the same weights), zero_grad. ``--reps``
   repetitions, round-robin: per repetition and batch every setting runs once, in an order rotated
   each time; per batch the best and the median repetition, summed over the batches. pairs/s =
   pairs / that time (inputs/s = 4× that with k = 2).
2. **Loss and gradient equality**: the loss of every timed step against plain's on the same batch
   (relative difference, maximum over batches and repetitions), and per parameter
   ``max |g − g_plain| / max |g_plain|`` (maximum over parameters and batches; the tests' criterion).
3. **Memory**:
   * *held after forward*: bytes autograd saves for backward during the forward
     (``saved_tensors_hooks``, exact). Under GradCache the chunks run inside non-reentrant
     checkpoints, whose own hooks keep only their inputs, so this is what lives outside them;
   * *peak saved* = held + the largest chunk's recomputation: the backward re-runs one chunk at a
     time and saves that chunk's activations again; they are counted exactly by re-running each
     recorded checkpointed call (``checkpoint`` of the objective's module is wrapped to record its
     function and inputs) under the same hooks. For plain, peak = held;
   * *peak RSS increase*: a fresh subprocess per setting, built through ``load_recipe`` with
     ``--set loss.grad_cache_chunk=C``; highest RSS (sampled every 2 ms) over ``--steps`` steps
     above the RSS before the first step, less the AdamW state.

Prints a table, then one JSON line of ratios (GradCache vs plain) measured in this run.
Usage: python benchmarks/bench_moca_cl.py [--init DIR] [--pairs 16] [--chunks 32,16,8] [--batches 8]
       [--reps 5] [--steps 8] [--n 160] [--threads 1] [--set KEY=VALUE ...] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import current_rss, make_step, peak_rss_during, quick_defaults

QUICK = {"n": 80, "batches": 3, "reps": 2, "steps": 3}


# --------------------------------------------------------------------------- setup
def starting_point(init: str, work: Path) -> tuple[Path, str]:
    """The VLM directory to start from and a line saying what it is."""
    if init:
        return Path(init), f"--init {init}"
    from cmpt.demo.tiny_models import prepare_tiny
    from cmpt.vlm.model import VisionLanguageModel

    paths = prepare_tiny(quick=True)
    torch.manual_seed(0)
    VisionLanguageModel.build(paths["vision"], paths["llm"]).save_pretrained(work / "vlm")
    what = (
        f"quick tiny ViT + LM ({paths['vision'].parent}) assembled by VisionLanguageModel.build "
        "(fresh PatchMerger)"
    )
    return work / "vlm", what


def make_task(init: Path, data: Path, run_dir: Path, pairs: int, chunk: int, extra: list[str] = ()):
    from cmpt.recipes import load_recipe

    sets = [f"model.init={init}", f"data.path={data}", f"run.dir={run_dir}", f"stage.batch_size={pairs}"]
    sets += [f"loss.grad_cache_chunk={chunk}", *extra]
    cfg, task_cls = load_recipe("tiny/moca_cl", sets)
    if cfg.stage.name != "cl":
        raise SystemExit(f"tiny/moca_cl resolved to stage {cfg.stage.name!r}")
    torch.manual_seed(cfg.run.seed)
    return cfg, task_cls(cfg)


def take_batches(task, n: int) -> list[dict]:
    it = iter(task.build_loader(0, 1))
    return [next(it) for _ in range(n)]


def set_chunk(task, chunk: int) -> None:
    task.model.loss.grad_cache_chunk = chunk


def label(chunk: int) -> str:
    return "plain" if chunk == 0 else f"GradCache {chunk}"


# --------------------------------------------------------------------------- memory and equality
@contextlib.contextmanager
def recorded_checkpoints():
    """Record every ``checkpoint(fn, *args)`` the objective makes (its function and inputs)."""
    import cmpt.recipes.moca_cl_objective as mod

    real, calls = mod.checkpoint, []

    def recording(fn, *args, **kwargs):
        calls.append((fn, args))
        return real(fn, *args, **kwargs)

    mod.checkpoint = recording
    try:
        yield calls
    finally:
        mod.checkpoint = real


def _counting_hooks(total: list[int]):
    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def saved_and_grads(task, batch) -> dict:
    """Held-after-forward bytes, the largest chunk recomputation's bytes, the loss and the gradients."""
    held = [0]
    with recorded_checkpoints() as calls, _counting_hooks(held):
        terms = task.compute_loss(task.model, batch)
    loss = terms.sums["cl"] / max(terms.counts["cl"], 1)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in task.model.named_parameters() if p.grad is not None}
    task.model.zero_grad(set_to_none=True)
    per_chunk = []
    for fn, args in calls:  # what the backward's recomputation of that chunk saves
        n = [0]
        with _counting_hooks(n):
            out = fn(*args)
        del out
        per_chunk.append(n[0])
    return {
        "held": held[0],
        "chunk_max": max(per_chunk, default=0),
        "chunk_sum": sum(per_chunk),
        "chunks": len(calls),
        "loss": float(loss.detach()),
        "grads": grads,
    }


def grad_rel_diff(g: dict, ref: dict) -> tuple[float, str, float]:
    """Max over parameters of ``max |g − ref| / max |ref|``, that parameter, and the relative difference
    of the whole gradient vector (L2)."""
    if g.keys() != ref.keys():
        return float("inf"), "different parameters", float("inf")
    worst, which, num, den = 0.0, "", 0.0, 0.0
    for name, r in ref.items():
        d = g[name] - r
        rel = float(d.abs().max()) / float(r.abs().max().clamp_min(1e-12))
        if rel > worst:
            worst, which = rel, name
        num, den = num + float(d.double().square().sum()), den + float(r.double().square().sum())
    return worst, which, (num / max(den, 1e-300)) ** 0.5


# --------------------------------------------------------------------------- measurement
def measure(task, batches: list[dict], chunks: list[int], reps: int) -> dict:
    step, _ = make_step(task)
    wall = {c: [[] for _ in batches] for c in chunks}
    losses = {c: [[] for _ in batches] for c in chunks}
    for c in chunks:  # warm-up
        set_chunk(task, c)
        step(batches[0])
    for r in range(reps):
        for i, b in enumerate(batches):
            k = (r + i) % len(chunks)
            for c in chunks[k:] + chunks[:k]:
                set_chunk(task, c)
                t0 = time.perf_counter()
                terms = step(b)
                wall[c][i].append(time.perf_counter() - t0)
                loss = float(terms.sums["cl"].detach()) / max(terms.counts["cl"], 1)
                losses[c][i].append(loss)
    mem = {c: [] for c in chunks}
    for b in batches:
        for c in chunks:
            set_chunk(task, c)
            mem[c].append(saved_and_grads(task, b))
    set_chunk(task, 0)
    out = {}
    for c in chunks:
        loss_diff = max(
            abs(x - ref) / max(abs(ref), 1e-12)
            for i in range(len(batches))
            for x, ref in zip(losses[c][i], losses[0][i])
        )
        peaks = [m["held"] + m["chunk_max"] for m in mem[c]]
        grad = [grad_rel_diff(m["grads"], m0["grads"]) for m, m0 in zip(mem[c], mem[0])]
        again = [abs(m["loss"] - r["loss"]) / max(abs(r["loss"]), 1e-12) for m, r in zip(mem[c], mem[0])]
        loss_diff = max(loss_diff, *again)
        out[c] = {
            "best_s": sum(min(t) for t in wall[c]),
            "median_s": sum(statistics.median(t) for t in wall[c]),
            "loss_rel_diff": loss_diff,
            "grad_rel_diff": max(g[0] for g in grad),
            "grad_rel_diff_param": max(grad, key=lambda g: g[0])[1],
            "grad_rel_diff_l2": max(g[2] for g in grad),
            "chunk_sum_mb": max(m["chunk_sum"] for m in mem[c]) / 2**20,
            "held_mb": max(m["held"] for m in mem[c]) / 2**20,
            "chunk_mb": max(m["chunk_max"] for m in mem[c]) / 2**20,
            "peak_saved_mb": max(peaks) / 2**20,
            "peak_saved_mean_mb": sum(peaks) / len(peaks) / 2**20,
            "n_chunks": max(m["chunks"] for m in mem[c]),
        }
    out["losses"] = [losses[0][i][0] for i in range(len(batches))]
    return out


def child(args) -> None:
    """One setting in a fresh process: peak RSS increase over ``--steps`` steps (less AdamW state)."""
    init, data, run_dir = Path(args.init), Path(args.data), Path(args.run_dir)
    _, task = make_task(init, data, run_dir, args.pairs, args.chunk, args.set)
    batches = take_batches(task, args.batches)
    step, opt = make_step(task)
    base = current_rss()  # model, data and batches loaded; nothing stepped yet
    peak = peak_rss_during(lambda: [step(batches[i % len(batches)]) for i in range(args.steps)])
    adam = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    print(json.dumps({"rss_increase_mb": round((peak - base - adam) / 2**20, 1), "adam_mb": adam / 2**20}))


def rss_compare(args, init: Path, data: Path, work: Path) -> dict[int, float]:
    out = {}
    for c in args.chunk_list:
        cmd = [sys.executable, __file__, "--child", "--chunk", str(c), "--init", str(init)]
        cmd += ["--data", str(data), "--run-dir", str(work / f"rss-{c}"), "--steps", str(args.steps)]
        cmd += ["--batches", str(args.batches)]
        cmd += ["--pairs", str(args.pairs), "--threads", str(args.threads)]
        cmd += [a for s in args.set for a in ("--set", s)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"RSS child (chunk {c}) failed:\n{res.stderr[-3000:]}")
        out[c] = json.loads(res.stdout.strip().splitlines()[-1])["rss_increase_mb"]
    return out


# --------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="", help="VLM directory to start from (default: see docstring)")
    ap.add_argument("--pairs", type=int, default=16, help="pairs per step (stage.batch_size)")
    ap.add_argument("--chunks", default="32,16,8", help="GradCache inputs per chunk, comma-separated")
    ap.add_argument("--n", type=int, default=160, help="synthetic training pairs to write")
    ap.add_argument("--batches", type=int, default=8, help="global batches timed (the loader's first)")
    ap.add_argument("--reps", type=int, default=5, help="round-robin repetitions")
    ap.add_argument("--steps", type=int, default=8, help="steps per RSS subprocess")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="fewer pairs, batches, repetitions and steps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if args.quick:
        quick_defaults(ap, args, QUICK)
    grad_chunks = sorted({int(x) for x in args.chunks.split(",") if x.strip()} - {0}, reverse=True)
    args.chunk_list = [0, *grad_chunks]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cmpt-bench-moca-cl-") as tmp:
        work = Path(tmp)
        init, init_what = starting_point(args.init, work)
        from cmpt.demo.synth_retrieval import synth_retrieval_main

        synth = synth_retrieval_main(args.n, work / "data", n_eval=1)
        data = Path(synth["train"])
        cfg, task = make_task(init, data, work / "run", args.pairs, 0, args.set)
        batches = take_batches(task, args.batches)
        k = int(batches[0]["num_hard_negatives"])
        inputs = [len(b["cu_seqlens"]) - 1 for b in batches]
        too_big = [c for c in grad_chunks if c >= max(inputs)]
        if too_big:
            print(f"warning: chunks {too_big} >= the {max(inputs)} inputs of a step: the plain path runs")
        st = measure(task, batches, args.chunk_list, args.reps)
        rss = rss_compare(args, init, data, work)
        shutil.rmtree(work / "run", ignore_errors=True)

    n_b = len(batches)
    pairs = sum(int(b["num_pairs"]) for b in batches)
    real = sum(int(b["num_samples"]) for b in batches)
    n_inputs = sum(inputs)
    text = sum(int(b["num_tokens"]) for b in batches)
    patches = sum(0 if b.get("patches") is None else int(b["patches"].shape[0]) for b in batches)
    tasks = [b["task"] for b in batches]
    llm = getattr(getattr(task.backbone, "llm", None), "config", None)
    threads = torch.get_num_threads()
    print(
        f"MoCa stage 2 (contrastive), tiny/moca_cl: GradCache vs plain step (CPU, torch threads: "
        f"{threads}, torch {torch.__version__})"
    )
    print(f"  start: {init_what}")
    n_params = sum(p.numel() for p in task.model.parameters())
    if llm is not None:
        print(
            f"  model: {n_params / 1e6:.2f} M parameters; LLM hidden {llm.hidden_size}, "
            f"{llm.num_hidden_layers} layers, bidirectional, attention {llm._attn_implementation}; "
            f"packed text {getattr(task.backbone, 'packing', '?')}; τ {cfg.loss.temperature}"
        )
    print(
        f"  data: synth_retrieval n={args.n} → first {n_b} global batches of {args.pairs} pairs, k = {k} → "
        f"{inputs[0]} inputs per step ({real} real of {pairs} pairs); tasks {', '.join(tasks)}; per step "
        f"{text / n_b:.0f} text tokens, {patches / n_b:.0f} image patches"
    )
    print(
        f"  step = forward + backward + AdamW (lr 0); {args.reps} reps round-robin, best / median per "
        "batch, summed; RSS: subprocess per setting"
    )
    print()
    head = f"  {'setting':<14}{'chunks':>7}{'ms/step':>9}{'pairs/s':>9}{'median':>8}{'inputs/s':>10}"
    head += f"{'held fwd':>11}{'+1 chunk':>10}{'peak saved':>12}{'RSS +':>9}"
    head += f"{'loss Δrel':>11}{'grad Δrel':>11}"
    print(head)
    plain = st[0]
    for c in args.chunk_list:
        s = st[c]
        line = f"  {label(c):<14}{s['n_chunks'] or 1:>7}{1e3 * s['best_s'] / n_b:>9.1f}"
        line += f"{pairs / s['best_s']:>9.1f}{pairs / s['median_s']:>8.1f}{n_inputs / s['best_s']:>10.1f}"
        one = f"{s['chunk_mb']:>7.2f} MB" if c else f"{'—':>10}"
        line += f"{s['held_mb']:>8.2f} MB{one}{s['peak_saved_mb']:>9.2f} MB"
        line += f"{rss[c]:>6.1f} MB{s['loss_rel_diff']:>11.1e}{s['grad_rel_diff']:>11.1e}"
        print(line)
    print(
        "  held fwd = saved for backward after the forward; +1 chunk = the largest chunk's recomputation "
        "in the backward; peak saved = their sum (max over batches); Δrel vs plain, max over batches"
    )
    for c in grad_chunks:
        s = st[c]
        saved = s["peak_saved_mb"] / plain["peak_saved_mb"]
        print(
            f"  GradCache {c}: {s['best_s'] / plain['best_s']:.2f}× the plain step time (median "
            f"{s['median_s'] / plain['median_s']:.2f}×); peak saved {saved:.3f}× plain's; its "
            f"{s['n_chunks']} chunks' recomputations sum to {s['chunk_sum_mb']:.2f} MB (plain holds "
            f"{plain['held_mb']:.2f} MB); grad Δrel worst at {s['grad_rel_diff_param']}, whole "
            f"gradient (L2) {s['grad_rel_diff_l2']:.1e}"
        )
    print(f"  losses (plain, per batch): {', '.join(f'{x:.4f}' for x in st['losses'])}")
    print(f"  (wall {time.perf_counter() - t_start:.0f} s)")

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 4) if b else None

    res: dict = {
        "pairs_per_step": args.pairs,
        "inputs_per_step": inputs[0],
        "plain_pairs_per_s": round(pairs / plain["best_s"], 2),
        "plain_peak_saved_mb": round(plain["peak_saved_mb"], 3),
        "plain_rss_increase_mb": rss[0],
    }
    for c in grad_chunks:
        s = st[c]
        res[f"gradcache{c}_vs_plain_pairs_per_s"] = ratio(plain["best_s"], s["best_s"])
        res[f"gradcache{c}_vs_plain_pairs_per_s_median"] = ratio(plain["median_s"], s["median_s"])
        res[f"gradcache{c}_vs_plain_saved_mb"] = ratio(s["peak_saved_mb"], plain["peak_saved_mb"])
        res[f"gradcache{c}_vs_plain_rss_mb"] = ratio(rss[c], rss[0])
        res[f"gradcache{c}_loss_rel_diff"] = float(f"{s['loss_rel_diff']:.3g}")
        res[f"gradcache{c}_grad_rel_diff"] = float(f"{s['grad_rel_diff']:.3g}")
        res[f"gradcache{c}_grad_rel_diff_l2"] = float(f"{s['grad_rel_diff_l2']:.3g}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
