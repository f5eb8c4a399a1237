"""`cmpt demo --recipe moca`: CoMP → MoCa, offline, on CPU (docs/method.md §3).

1. The starting VLM: the CoMP demo's stage-III output (``out/stage3/final``), reused when present,
   else the three tiny CoMP stages are run first.
2. Data (cached): the tiny MoCa corpus (documents + passages, :mod:`cmpt.demo.moca_data`) and the
   synthetic retrieval tasks with hard negatives and their held-out evaluation
   (:mod:`cmpt.demo.synth_retrieval`).
3. MoCa stage 1 (``tiny/moca_cpt``: MLM + MAE, bidirectional), stage 2 from it (``tiny/moca_cl``:
   InfoNCE, hard negatives, task-homogeneous batches), and stage 2 straight from the VLM (the
   paper's "no CPT" ablation).
4. ``cmpt eval embed`` on the held-out tasks for: the starting VLM (mean pooled, causal — the
   baseline), after CPT, after CPT → CL, and CL without CPT. ``out/moca/report.md`` holds the table
   and loss curves; the table is appended to the CoMP report ``out/report.md`` when there is one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .report import write_report
from .run import _header

__all__ = ["MOCA_RUNS", "run_moca_demo"]

#: run name → (recipe, what, starts from); "vlm" = the CoMP VLM, else another run's final/
MOCA_RUNS = {
    "moca_cpt": ("tiny/moca_cpt", "stage 1 CPT: MLM + MAE, bidirectional", "vlm"),
    "moca_cl": ("tiny/moca_cl", "stage 2 CL after CPT: InfoNCE, k = 2 hard negatives", "moca_cpt"),
    "moca_cl_no_cpt": ("tiny/moca_cl", "stage 2 CL without CPT (ablation)", "vlm"),
}
STEPS = {"moca_cpt": (100, 3), "moca_cl": (60, 3), "moca_cl_no_cpt": (60, 3)}  # full, quick
RETRIEVAL = {"pairs": (480, 40), "eval_queries": (16, 4)}
QUICK = {"data.vision_budget": 128, "data.text_budget": 768, "stage.resolution.max_pixels": 112 * 112}


def _comp_vlm(out: Path, cache: str | None, quick: bool) -> Path:
    final = out / "stage3" / "final"
    if (final / "vlm_config.json").is_file():
        print(f"  reusing the CoMP demo's stage-III VLM: {final}")
        return final
    from .run import run_comp_stages
    from .tiny_models import prepare_tiny

    tiny = prepare_tiny(cache, quick=quick)
    fixed = int(json.loads(Path(tiny["vision_stats"]).read_text())["resolution"])
    run_comp_stages(out, tiny, quick, fixed)
    return final


def _retrieval_data(cache: str | None, quick: bool) -> dict[str, Path]:
    """Train pairs and held-out evaluation of the synthetic retrieval tasks, built once."""
    from .synth_retrieval import synth_retrieval_main
    from .tiny_models import _build_cached, tiny_root

    q = int(quick)
    root = tiny_root(cache, quick) / "retrieval"
    key = {"format": 1, "pairs": RETRIEVAL["pairs"][q], "eval": RETRIEVAL["eval_queries"][q]}
    _build_cached(
        root,
        key,
        lambda tmp: {"summary": synth_retrieval_main(key["pairs"], tmp, n_eval=key["eval"])},
        "MoCa retrieval pairs + held-out tasks",
    )
    return {"train": root / "train.jsonl", "eval": root / "eval"}


def _train(name: str, init: Path, data: Path, out: Path, quick: bool) -> dict[str, Any]:
    from ..recipes import run_recipe

    recipe, what, _ = MOCA_RUNS[name]
    run_dir = out / name
    if (run_dir / "config.yaml").is_file():  # a previous demo's run: start fresh, not resume
        shutil.rmtree(run_dir)
    sets = {
        "run.dir": run_dir,
        "model.init": init,
        "data.path": data,
        "train.steps": STEPS[name][int(quick)],
        "train.tensorboard": False,
        **(QUICK if quick else {}),
    }
    t = time.perf_counter()
    summary = run_recipe(recipe, [f"{k}={v}" for k, v in sets.items()])
    seconds = round(time.perf_counter() - t, 1)
    print(f"  {name}: {summary['step']} steps in {seconds} s, last loss {summary['loss']:.3f}")
    return {
        "dir": run_dir,
        "seconds": seconds,
        "steps": summary["step"],
        "description": what,
        "summary": summary,
    }


def _evaluate(models: dict[str, tuple[Path, str]], eval_dir: Path, out: Path) -> dict[str, dict]:
    from ..embed.embedder import Embedder
    from ..eval.embed import embed_main

    results = {}
    for label, (path, attention) in models.items():
        emb = Embedder.from_pretrained(path)
        emb.config.attention = attention
        results[label] = embed_main(emb, eval_dir, out=out / "eval" / label)
        print(f"  {label}: P@1 {results[label]['mmeb_mean_precision_at_1']:.3f}, "
              f"nDCG@5 {results[label]['pages_mean_ndcg_at_5']:.3f}")  # fmt: skip
    return results


def _rows(ev: dict[str, dict]) -> list[dict[str, Any]]:
    """One table row per metric; the columns are the models (first = the baseline)."""
    labels = list(ev)
    first = ev[labels[0]]
    rows = [{"metric": "mean P@1 (MMEB-style tasks)", "key": "mmeb_mean_precision_at_1"}]
    rows += [{"metric": f"P@1 {t}", "task": t, "kind": "mmeb"} for t in first["mmeb"]]
    rows += [{"metric": "mean nDCG@5 (page retrieval)", "key": "pages_mean_ndcg_at_5"}]
    rows += [{"metric": f"nDCG@5 {t}", "task": t, "kind": "pages"} for t in first["pages"]]
    for row in rows:
        for label in labels:
            r = ev[label]
            if "key" in row:
                row[label] = r[row["key"]]
            else:
                field = "precision_at_1" if row["kind"] == "mmeb" else "ndcg_at_5"
                row[label] = r[row["kind"]][row["task"]][field]
    return rows


def _table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    head = "| metric | " + " | ".join(labels) + " |"
    sep = "|---|" + "---:|" * len(labels)
    body = ["| " + r["metric"] + " | " + " | ".join(f"{r[lab]:.3f}" for lab in labels) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def run_moca_demo(
    out: str | os.PathLike = "runs/demo", quick: bool = False, cache: str | None = None
) -> dict:
    """Run the MoCa demo (module docstring); returns its summary (also ``out/moca/summary.json``)."""
    from .moca_data import prepare_moca_data

    out = Path(out)
    moca_out = out / "moca"
    moca_out.mkdir(parents=True, exist_ok=True)
    t_total, wall = time.perf_counter(), {}
    _header("MoCa 1/4 starting VLM (CoMP stage III) and data")
    t = time.perf_counter()
    vlm = _comp_vlm(out, cache, quick)
    corpus = prepare_moca_data(cache, quick=quick)
    retrieval = _retrieval_data(cache, quick)
    wall["prepare"] = round(time.perf_counter() - t, 1)
    runs: dict[str, dict[str, Any]] = {}
    for i, (name, (_, what, start)) in enumerate(MOCA_RUNS.items()):
        _header(f"MoCa {2 + min(i, 1)}/4 {what}")
        init = vlm if start == "vlm" else runs[start]["dir"] / "final"
        data = corpus["train"] if name == "moca_cpt" else retrieval["train"]
        runs[name] = _train(name, init, data, moca_out, quick)
        wall[name] = runs[name]["seconds"]
    _header("MoCa 4/4 embedding evaluation on the held-out retrieval tasks")
    t = time.perf_counter()
    models = {
        "start (CoMP VLM, causal)": (vlm, "causal"),
        "after CPT": (runs["moca_cpt"]["dir"] / "final", "bidirectional"),
        "after CPT → CL": (runs["moca_cl"]["dir"] / "final", "bidirectional"),
        "CL without CPT": (runs["moca_cl_no_cpt"]["dir"] / "final", "bidirectional"),
    }
    ev = _evaluate(models, retrieval["eval"], moca_out)
    wall["eval"] = round(time.perf_counter() - t, 1)
    wall["total"] = round(time.perf_counter() - t_total, 1)
    rows, labels = _rows(ev), list(models)
    table = _table(rows, labels)
    title = "cmpt demo: CoMP → MoCa on tiny offline models" + (" (--quick)" if quick else "")
    intro = f"## Held-out retrieval (P@1, nDCG@5)\n\n{table}\n\nWall time (s): {wall}"
    results = {"title": title, "rows": [], "notes": [], "intro": intro}
    report = write_report(moca_out, runs, results, [])
    comp_report = out / "report.md"
    if comp_report.is_file() and "## CoMP → MoCa" not in comp_report.read_text():
        with comp_report.open("a") as fh:
            fh.write(f"\n\n## CoMP → MoCa (held-out retrieval)\n\n{table}\n\nDetails: moca/report.md\n")
    _header("MoCa results")
    print(table)
    print(f"\nwall time (s): {wall}\nreport: {report}")
    summary = {"out": str(moca_out), "report": str(report), "wall_s": wall, "rows": rows, "evaluations": ev}
    (moca_out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
