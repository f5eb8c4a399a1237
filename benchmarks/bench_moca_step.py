"""MoCa stage 1 on the tiny CPT setup (issue "MoCa stage 1", Measure; docs/method.md §3).

Recipe ``tiny/moca_cpt`` (``L = L_MLM + 0.1·L_MAE``, bidirectional LLM, packed text) on synthetic
interleaved documents + text-only passages (``cmpt.demo.synth_documents``, train split), starting
from a cmpt VLM: ``--init DIR``, else ``runs/tiny/comp_stage3/final`` or ``runs/demo/stage3/final``
when present, else one assembled here from the demo's quick tiny ViT + LM
(``prepare_tiny(quick=True)`` → ``VisionLanguageModel.build`` → ``save_pretrained``; its
PatchMerger is fresh). The output says which.

1. **Training step** (objective forward, backward, AdamW at lr 0 so every repetition sees the same
   weights) on ``--batches`` real micro-batches of ``MocaTask.build_loader``, ``--reps`` round-robin
   repetitions, best repetition per micro-batch (the host is shared). Throughput counts text tokens
   (``num_tokens``), image patches (ViT rows) and their sum.
2. **Share of the MAE decoder** (decoder layer + ``mae_head``), two ways in the same run:
   * *timed inside the step*: wall time spent in ``backbone.run_layer`` (the decoder layer) and in
     ``mae_head`` forward, plus their backward: autograd hooks mark when the gradient reaches the
     head's output (pre-hook of its ``grad_fn``) and when it leaves the decoder's input (post-hook
     of an identity view in front of ``run_layer``). The CPU autograd engine runs ready nodes
     latest-created first, and the whole MAE branch is created after the MLM loss, so its backward
     runs as one stretch between the two marks (the MSE and the gather of image tokens included);
   * *step difference*: the same step with the MAE branch skipped (``run_layer`` returns its input,
     the head returns zeros without gradient: the backbone forward/backward and the MLM loss are
     unchanged), stepped back to back with the full step; share = 1 − skipped / full. This one also
     counts the AdamW update of the decoder and head parameters.
3. **Memory**: bytes autograd saves for backward (saved-tensor hooks, exact) in one forward, and
   the part saved while inside the decoder layer / head; peak RSS over ``--steps`` steps above the
   RSS after a first step (so model, data and AdamW state are in the base), sampled every 2 ms, in a
   fresh subprocess per setting (full step, MAE branch skipped).
4. **Held-out MLM accuracy and MAE loss, before / after a tiny CPT run.** Held-out = the ``val``
   split of documents + passages (their own seed streams, ``cmpt.demo.synthetic.split_seed``),
   collated once by the recipe's loader (``DocumentBuilder``: masks fixed per (seed, epoch, id)), so
   before and after see identical MLM and MAE masks and Gaussian fills. MLM accuracy = argmax of the
   LM head at the masked positions == original token; MLM loss and MAE loss = Σ sums / Σ counts of
   the objective (MAE: mean squared error per element of the masked windows); reference: the MSE of
   predicting 0 (the normalized pixels' mean square) and the MLM accuracy of always predicting the
   most frequent masked token of the timed train batches. "Before" = the objective right after
   construction (MAE decoder = copy of the middle LLM layer, fresh head); "after" = the same object
   after ``--train-steps`` steps of ``cmpt.train.loop.Trainer`` with the recipe's optimizer
   settings; both in eval mode without gradient.

Prints a table, then one JSON line of the figures.
Usage: python benchmarks/bench_moca_step.py [--init DIR] [--train-steps 200] [--batches 12] [--reps 5]
       [--set optim.lr=1e-3 ...] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import current_rss, make_step, peak_rss_during, quick_defaults, saved_bytes
from moca_step_parts import DecoderTimer, evaluate, mae_branch_skipped, patches_of

REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/cmpt-bench-moca")
STAGE3 = ("runs/tiny/comp_stage3/final", "runs/demo/stage3/final")
QUICK = {"train_steps": 40, "batches": 6, "reps": 2, "steps": 4, "train_docs": 48, "val_docs": 16}


# --------------------------------------------------------------------------- setup
def starting_point(init: str) -> tuple[Path, str]:
    """The VLM directory to start from and a line saying what it is."""
    if init:
        return Path(init), f"--init {init}"
    for rel in STAGE3:
        if (REPO / rel).is_dir():
            return REPO / rel, f"CoMP stage-III output {rel}"
    from cmpt.demo.tiny_models import prepare_tiny
    from cmpt.vlm.model import VisionLanguageModel

    out = WORK / "vlm"
    paths = prepare_tiny(quick=True)
    torch.manual_seed(0)
    VisionLanguageModel.build(paths["vision"], paths["llm"]).save_pretrained(out)
    what = (
        f"no {' / '.join(STAGE3)}: quick tiny ViT + LM ({paths['vision'].parent}) assembled by "
        "VisionLanguageModel.build (fresh PatchMerger)"
    )
    return out, what


def write_data(n_train: int, n_val: int) -> dict[str, Path]:
    """Documents + passages, train and val splits (own seed streams); a mixture YAML per split."""
    from cmpt.demo.synth_documents import generate_documents, generate_passages
    from cmpt.demo.synthetic import split_seed

    root = WORK / "data"
    shutil.rmtree(root, ignore_errors=True)
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        seed = split_seed(0, split)
        docs = generate_documents(n, root / "documents", seed=seed, split=split)
        passages = generate_passages(n, root / "passages", seed=seed, split=split)
        mix = root / f"{split}.yaml"
        mix.write_text(json.dumps({"datasets": [{"path": str(docs)}, {"path": str(passages)}]}))
        out[split] = mix
    return out


def make_task(init: Path, data: Path, run_dir: Path, extra: list[str] = ()):
    from cmpt.recipes import load_recipe

    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"model.init={init}", f"data.path={data}", f"run.dir={run_dir}", *extra]
    cfg, task_cls = load_recipe("tiny/moca_cpt", sets)
    torch.manual_seed(cfg.run.seed)
    return cfg, task_cls(cfg)


def take_batches(task, n: int | None = None) -> list[dict]:
    """``n`` micro-batches of the task's loader, or all of epoch 0 (``n=None``)."""
    loader = task.build_loader(0, 1)
    if n is None:
        n = len(list(loader.batcher.epoch_batches(0)))
    it = iter(loader)
    return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- step and its parts
def measure_step(task, batches: list[dict], reps: int) -> dict:
    """Full vs MAE-skipped steps on the same batches, interleaved; decoder time inside the full step."""
    step, _ = make_step(task)
    settings = ("full", "skipped")
    wall = {s: [[] for _ in batches] for s in settings}
    dec = [[] for _ in batches]  # (fwd, bwd) of the full step, per repetition
    timer = DecoderTimer(task.model)

    def run(setting: str, batch: dict) -> float:
        cm = mae_branch_skipped(task.model) if setting == "skipped" else timer
        with cm:
            timer.reset()
            t0 = time.perf_counter()
            step(batch)
            dt = time.perf_counter() - t0
            timer.end_step()
        return dt

    for s in settings:  # warm-up
        run(s, batches[0])
    for r in range(reps):
        for i, b in enumerate(batches):
            for s in settings if (r + i) % 2 == 0 else settings[::-1]:
                wall[s][i].append(run(s, b))
                if s == "full":
                    dec[i].append((timer.fwd, timer.bwd))
    best = {s: sum(min(t) for t in wall[s]) for s in settings}
    # decoder time of the full step's best repetition of each batch
    pick = [min(range(len(wall["full"][i])), key=wall["full"][i].__getitem__) for i in range(len(batches))]
    dec_fwd = sum(dec[i][j][0] for i, j in enumerate(pick))
    dec_bwd = sum(dec[i][j][1] for i, j in enumerate(pick))
    per_rep_share = []
    for r in range(reps):
        in_decoder = sum(dec[i][r][0] + dec[i][r][1] for i in range(len(batches)))
        per_rep_share.append(in_decoder / sum(wall["full"][i][r] for i in range(len(batches))))
    saved = {"full": [], "decoder": [], "skipped": []}
    with timer:
        for b in batches:
            tot, inside, _ = saved_bytes(task, b, lambda: timer.inside)
            saved["full"].append(tot)
            saved["decoder"].append(inside)
    with mae_branch_skipped(task.model):
        saved["skipped"] = [saved_bytes(task, b)[0] for b in batches]
    text = sum(int(b["num_tokens"]) for b in batches)
    patches = sum(patches_of(b) for b in batches)
    return {
        "text": text,
        "patches": patches,
        "best_s": best,
        "median_s": {s: sum(statistics.median(t) for t in wall[s]) for s in settings},
        "dec_fwd_s": dec_fwd,
        "dec_bwd_s": dec_bwd,
        "share_direct": (dec_fwd + dec_bwd) / best["full"],
        "share_direct_range": (min(per_rep_share), max(per_rep_share)),
        "share_diff": 1.0 - best["skipped"] / best["full"],
        "saved_mb": {k: sum(v) / len(v) / 2**20 for k, v in saved.items()},
    }


def child(args) -> None:
    """One setting in a fresh process: peak RSS increase over ``--steps`` steps (less AdamW state)."""
    _, task = make_task(Path(args.init), Path(args.data), WORK / f"rss-{args.setting}")
    batches = take_batches(task, args.batches)
    step, _ = make_step(task)
    cm = mae_branch_skipped(task.model) if args.setting == "skipped" else contextlib.nullcontext()
    with cm:
        step(batches[0])  # allocator warm-up, AdamW state created
        base = current_rss()
        peak = peak_rss_during(lambda: [step(batches[i % len(batches)]) for i in range(args.steps)])
    print(json.dumps({"rss_increase_mb": round((peak - base) / 2**20, 1)}))


def rss_compare(args, init: Path, data: Path) -> dict[str, float]:
    out = {}
    for setting in ("full", "skipped"):
        cmd = [sys.executable, __file__, "--child", "--setting", setting, "--init", str(init)]
        cmd += ["--data", str(data), "--steps", str(args.steps), "--batches", str(args.batches)]
        cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        out[setting] = json.loads(res.strip().splitlines()[-1])["rss_increase_mb"]
    return out


# --------------------------------------------------------------------------- held-out evaluation
def cpt_before_after(args, init: Path, data: dict[str, Path], constant: int) -> dict:
    from cmpt.train.loop import Trainer

    run_dir = WORK / "cpt"
    extra = [f"train.steps={args.train_steps}", "train.save_every=0", "train.log_every=10"]
    extra += ["train.progress=false", "train.tensorboard=false", *args.set]
    cfg, task = make_task(init, data["train"], run_dir, extra)
    val_view = copy.copy(task)  # same backbone (processor, tokenizer), the val mixture
    val_view.cfg = copy.deepcopy(cfg)
    val_view.cfg.data.path = str(data["val"])
    val_view.cfg.run.dir = str(WORK / "val")
    val = take_batches(val_view, None)
    before = evaluate(task, val, constant)
    t0 = time.perf_counter()
    summary = Trainer(cfg.run, cfg.optim, cfg.train, task, full_config=cfg).fit()
    train_s = time.perf_counter() - t0
    after = evaluate(task, val, constant)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss/mlm" in r]
    return {
        "before": before,
        "after": after,
        "val_batches": len(val),
        "val_samples": sum(int(b["num_samples"]) for b in val),
        "val_images": sum(int(b["grid_hw"].shape[0]) if b.get("grid_hw") is not None else 0 for b in val),
        "steps": summary["step"],
        "train_s": train_s,
        "train_samples": summary["samples"],
        "train_curve": [(r["step"], r["loss/mlm"], r.get("loss/mae")) for r in logged],
        "lr": cfg.optim.lr,
        "schedule": f"{cfg.optim.schedule}, warmup {cfg.optim.warmup_ratio:g}, clip {cfg.optim.clip_grad}",
    }


# --------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="", help="VLM directory to start from (default: see docstring)")
    ap.add_argument("--train-steps", type=int, default=200, help="steps of the tiny CPT run")
    ap.add_argument("--batches", type=int, default=12, help="micro-batches of the timed step")
    ap.add_argument("--reps", type=int, default=5, help="round-robin repetitions of the timed steps")
    ap.add_argument("--steps", type=int, default=8, help="steps per RSS subprocess")
    ap.add_argument("--train-docs", type=int, default=192, help="train documents (and as many passages)")
    ap.add_argument("--val-docs", type=int, default=48, help="held-out documents (and as many passages)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override of the CPT run"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, batches and documents")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    if args.quick:
        quick_defaults(ap, args, QUICK)
    t_start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    init, init_what = starting_point(args.init)
    data = write_data(args.train_docs, args.val_docs)

    _, task = make_task(init, data["train"], WORK / "step")
    batches = take_batches(task, args.batches)
    st = measure_step(task, batches, args.reps)
    rss = rss_compare(args, init, data["train"])
    masked = torch.cat([b["labels"][b["labels"] != -100] for b in batches])
    constant = int(torch.mode(masked).values)  # the most frequent masked token of the train batches
    ev = cpt_before_after(args, init, data, constant)

    llm = task.backbone.llm.config
    n_b = len(batches)
    full, skip = st["best_s"]["full"], st["best_s"]["skipped"]
    tok_s, pat_s = st["text"] / full, st["patches"] / full
    threads = torch.get_num_threads()
    print(f"MoCa stage 1, tiny CPT (tiny/moca_cpt; CPU, {threads} torch threads, torch {torch.__version__})")
    print(f"  start: {init_what}")
    head = task.model.mae_head
    print(
        f"  model: LLM hidden {llm.hidden_size}, {llm.num_hidden_layers} layers (+1 MAE decoder layer), "
        f"vocab {task.backbone.lm_head.weight.shape[0]}; attention {llm._attn_implementation}, packed "
        f"text {task.backbone.packing}; MAE head {head.in_features} → {head.out_features}"
    )
    print()
    print(
        f"1. Training step, {n_b} micro-batches ({st['text']} text tokens, {st['patches']} image patches), "
        f"{args.reps} reps, best per micro-batch"
    )
    head_line = f"  {'step':<34}{'ms/mb':>8}{'text tok/s':>12}{'patches/s':>11}{'sum/s':>9}"
    print(head_line + f"{'saved for bwd':>16}{'peak RSS +':>12}")
    rows = (("full (MLM + MAE decoder)", "full", full), ("MAE branch skipped", "skipped", skip))
    for label, key, t in rows:
        line = f"  {label:<34}{1e3 * t / n_b:>8.1f}{st['text'] / t:>12.0f}{st['patches'] / t:>11.0f}"
        line += f"{(st['text'] + st['patches']) / t:>9.0f}{st['saved_mb'][key]:>13.2f} MB{rss[key]:>9.1f} MB"
        print(line)
    sv = st["saved_mb"]
    lo, hi = st["share_direct_range"]
    print("  MAE decoder (layer + head), share of the full step:")
    fwd_ms, bwd_ms = 1e3 * st["dec_fwd_s"] / n_b, 1e3 * st["dec_bwd_s"] / n_b
    print(
        f"    timed inside the step: fwd {fwd_ms:.2f} + bwd {bwd_ms:.2f} ms/mb = "
        f"{100 * st['share_direct']:.1f}% (per repetition {100 * lo:.1f}–{100 * hi:.1f}%)"
    )
    print(f"    step difference (+ its AdamW update): {100 * st['share_diff']:.1f}%")
    print(
        f"    saved for backward inside it: {sv['decoder']:.2f} MB = {100 * sv['decoder'] / sv['full']:.1f}% "
        f"(full − skipped: {sv['full'] - sv['skipped']:.2f} MB)"
    )
    print()
    b, a = ev["before"], ev["after"]
    print(
        f"2. Held-out (val split: {ev['val_samples']} documents + passages, {ev['val_images']} images, "
        f"{ev['val_batches']} micro-batches; {b['masked_tokens']} masked tokens, {b['mae_elements']} masked "
        f"window elements), before / after {ev['steps']} CPT steps"
    )
    print(f"  {'':<28}{'MLM accuracy':>14}{'MLM loss':>10}{'MAE loss':>10}")
    for label, r in (("before (fresh objective)", b), (f"after {ev['steps']} steps", a)):
        print(f"  {label:<28}{100 * r['mlm_acc']:>13.1f}%{r['mlm_loss']:>10.3f}{r['mae_loss']:>10.3f}")
    print(
        f"  reference: MAE loss of predicting 0 = {b['mae_zero']:.3f}; MLM loss of a uniform guess = "
        f"{math.log(task.backbone.lm_head.weight.shape[0]):.3f}; MLM accuracy of always predicting "
        f"{task.backbone.tokenizer.convert_ids_to_tokens(constant)!r} (the train batches' most frequent "
        f"masked token) = {100 * b['mlm_acc_constant']:.1f}%"
    )
    curve = ev["train_curve"]
    if curve:
        first, last = curve[0], curve[-1]
        print(
            f"  training: lr {ev['lr']:g} ({ev['schedule']}), {ev['train_samples']} samples, "
            f"{ev['train_s']:.0f} s; logged train loss MLM {first[1]:.3f} (step {first[0]}) → {last[1]:.3f} "
            f"(step {last[0]}), MAE {first[2]:.3f} → {last[2]:.3f}"
        )
    print(f"  (wall {time.perf_counter() - t_start:.0f} s)")
    print(
        json.dumps(
            {
                "init": init_what,
                "step_ms_per_microbatch": round(1e3 * full / n_b, 2),
                "text_tokens_per_s": round(tok_s),
                "image_patches_per_s": round(pat_s),
                "tokens_plus_patches_per_s": round(tok_s + pat_s),
                "mae_decoder_share_timed": round(st["share_direct"], 4),
                "mae_decoder_share_step_diff": round(st["share_diff"], 4),
                "mae_decoder_fwd_ms": round(1e3 * st["dec_fwd_s"] / n_b, 3),
                "mae_decoder_bwd_ms": round(1e3 * st["dec_bwd_s"] / n_b, 3),
                "saved_mb": round(sv["full"], 3),
                "saved_mb_mae_decoder": round(sv["decoder"], 3),
                "saved_mb_mae_skipped": round(sv["skipped"], 3),
                "rss_increase_mb": rss["full"],
                "rss_increase_mb_mae_skipped": rss["skipped"],
                "cpt_steps": ev["steps"],
                "mlm_acc_before": round(b["mlm_acc"], 4),
                "mlm_acc_after": round(a["mlm_acc"], 4),
                "mlm_loss_before": round(b["mlm_loss"], 4),
                "mlm_loss_after": round(a["mlm_loss"], 4),
                "mae_loss_before": round(b["mae_loss"], 4),
                "mae_loss_after": round(a["mae_loss"], 4),
                "mae_loss_predict_zero": round(b["mae_zero"], 4),
                "mlm_acc_constant_token": round(b["mlm_acc_constant"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
