"""``cmpt eval embed``: MMEB Precision@1 and ViDoRe nDCG@5 of an Embedder (docs/method.md §3, §5).

The data layout and its checks are in :mod:`cmpt.eval.embed_data`. Every distinct input is
embedded once (in chunks, packed by the Embedder's token budget). Scores:

* **MMEB** tasks: cosine between the query and each of its own candidates; Precision@1 with ties
  won by the positive (:func:`cmpt.eval.embed_metrics.precision_at_1`);
* **page** tasks: dot product between raw-text queries and pages rendered as
  ``"<image>\\nRepresent the given document image."``; nDCG@5 with linear gains over the queries
  that have a positive qrel (:func:`cmpt.eval.embed_metrics.ndcg_at_k_qrels`).

Each kind is averaged without weights over its tasks. The MMEB tasks named after one of MMEB's 36
datasets (:data:`cmpt.eval.embed_metrics.MMEB_DATASETS`, e.g. ``ImageNet-1K.jsonl``) are also
averaged per meta-task category and per split (IND / OOD), each mean with how many of its datasets
were present; other MMEB tasks count in the overall mean only. Outputs (``out``):
``embed_results.json``, ``embed_results.md`` (markdown table) and ``embed_results.png`` (bar chart,
matplotlib Agg).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmpt.eval.embed_data import PAGE_PROMPT, EmbedData, load_embed_data
from cmpt.eval.embed_metrics import mmeb_group_means, ndcg_at_k_qrels, precision_at_1
from cmpt.eval.runtime import check_out_dir, pick_device, png_metadata, write_result

__all__ = ["PAGE_PROMPT", "K", "embed_main", "embed_table", "evaluate_embed", "plot_embed"]

K = 5


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def evaluate_embed(
    embedder: Any,
    data: str | os.PathLike | EmbedData,
    *,
    batch_tokens: int | None = None,
    limit: int | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """P@1 per MMEB task, nDCG@5 per page task and their unweighted means (docs/method.md §3, §5).

    ``embedder``: anything with :meth:`cmpt.Embedder.encode`. Returns ``{"data", "mmeb": {task:
    {"precision_at_1", "n_queries", "skipped"}}, "mmeb_mean_precision_at_1" (over every MMEB
    task), "mmeb_category_means", "mmeb_split_means", "mmeb_unknown_tasks" (see
    :func:`cmpt.eval.embed_metrics.mmeb_group_means`), "pages": {task: {"ndcg_at_5", "n_queries",
    "n_scored", "n_pages", "skipped"}}, "pages_mean_ndcg_at_5", "n_inputs", "n_embedded",
    "skipped", "bad"}`` (a mean over no task is NaN).
    """
    ds = data if isinstance(data, EmbedData) else load_embed_data(data, limit=limit, skip_bad=skip_bad)
    # one call: the Embedder preprocesses and embeds its inputs window by window (docs/method.md §7)
    texts, images = [t for t, _ in ds.keys], [p for _, p in ds.keys]
    emb = embedder.encode(texts, images, batch_tokens=batch_tokens).float() if ds.keys else torch.zeros(0, 1)
    unit = F.normalize(emb, dim=-1)  # cosine for MMEB, whatever the Embedder's normalization
    mmeb = {}
    for t in ds.mmeb:
        scores = []
        for q, c in zip(t.queries, t.candidates):
            # score each distinct candidate once: duplicates of the positive tie with it exactly
            uniq, inverse = torch.tensor(c).unique(return_inverse=True)
            scores.append((unit[uniq] @ unit[q])[inverse])
        p1 = precision_at_1(scores) if scores else math.nan
        mmeb[t.name] = {"precision_at_1": p1, "n_queries": len(t.queries), "skipped": t.skipped}
    pages = {}
    for t in ds.pages:
        scored = sum(any(s > 0 for s in r.values()) for r in t.qrels)
        if t.queries and t.pages and scored:
            score = ndcg_at_k_qrels(emb[t.queries] @ emb[t.pages].T, t.qrels, k=K)
        else:
            score = math.nan
        pages[t.name] = {
            "ndcg_at_5": score,
            "n_queries": len(t.queries),
            "n_scored": scored,
            "n_pages": len(t.pages),
            "skipped": t.skipped,
        }
    n_inputs = sum(len(t.queries) + sum(map(len, t.candidates)) for t in ds.mmeb)
    n_inputs += sum(len(t.queries) + len(t.pages) for t in ds.pages)
    return {
        "data": str(ds.path or ds.root),
        "mmeb": mmeb,
        "mmeb_mean_precision_at_1": _mean([v["precision_at_1"] for v in mmeb.values()]),
        **mmeb_group_means({name: v["precision_at_1"] for name, v in mmeb.items()}),
        "pages": pages,
        "pages_mean_ndcg_at_5": _mean([v["ndcg_at_5"] for v in pages.values()]),
        "n_inputs": n_inputs,
        "n_embedded": len(ds.keys),
        "skipped": len(ds.bad),
        "bad": ds.bad[:100],
    }


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def _mmeb_groups(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, group)`` of every MMEB category, then split, that has a dataset present."""
    groups = [*result["mmeb_category_means"].items(), *result["mmeb_split_means"].items()]
    return [(name, g) for name, g in groups if g["n_present"]]


def embed_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per task, then the means (MMEB: overall, per category and split with
    ``present/total`` datasets; docs/method.md §3), then a note naming the MMEB tasks outside the 36."""
    lines = ["| task | kind | metric | score | queries | skipped |", "|---|---|---|---:|---:|---:|"]
    for name, r in result["mmeb"].items():
        score = _fmt(r["precision_at_1"])
        lines.append(f"| {name} | MMEB | P@1 | {score} | {r['n_queries']} | {r['skipped']} |")
    if result["mmeb"]:
        mean, n = _fmt(result["mmeb_mean_precision_at_1"]), len(result["mmeb"])
        lines.append(f"| **mean ({n} MMEB task{'s' * (n != 1)})** | MMEB | P@1 | **{mean}** | | |")
        for name, g in _mmeb_groups(result):
            label = f"{name} mean ({g['n_present']}/{g['n_datasets']} datasets)"
            lines.append(f"| **{label}** | MMEB | P@1 | **{_fmt(g['mean_precision_at_1'])}** | | |")
    for name, r in result["pages"].items():
        score = _fmt(r["ndcg_at_5"])
        lines.append(f"| {name} | pages | nDCG@5 | {score} | {r['n_scored']} | {r['skipped']} |")
    if result["pages"]:
        mean, n = _fmt(result["pages_mean_ndcg_at_5"]), len(result["pages"])
        lines.append(f"| **mean ({n} page task{'s' * (n != 1)})** | pages | nDCG@5 | **{mean}** | | |")
    if result["mmeb_unknown_tasks"]:
        names = ", ".join(result["mmeb_unknown_tasks"])
        lines.append(f"\nMMEB tasks outside MMEB's 36 datasets (in the overall mean only): {names}")
    return "\n".join(lines) + "\n"


def plot_embed(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of every task's score and the means, MMEB's per category and split too (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars: list[tuple[str, float, str, bool]] = []  # label, value, colour, is a mean
    for name, r in result["mmeb"].items():
        bars.append((name, r["precision_at_1"], "tab:blue", False))
    if result["mmeb"]:
        bars.append(("MMEB mean", result["mmeb_mean_precision_at_1"], "tab:blue", True))
        for name, g in _mmeb_groups(result):
            label = f"{name} ({g['n_present']}/{g['n_datasets']})"
            bars.append((label, g["mean_precision_at_1"], "tab:blue", True))
    for name, r in result["pages"].items():
        bars.append((name, r["ndcg_at_5"], "tab:orange", False))
    if result["pages"]:
        bars.append(("pages mean", result["pages_mean_ndcg_at_5"], "tab:orange", True))
    fig = Figure(figsize=(max(5.0, 0.6 * len(bars) + 2), 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg rendering without touching pyplot's global backend
    ax = fig.add_subplot()
    xs = range(len(bars))
    values = [0.0 if math.isnan(v) else v for _, v, _, _ in bars]
    for x, (_, v, colour, is_mean), h in zip(xs, bars, values):
        ax.bar(x, h, color=colour, hatch="//" if is_mean else None, edgecolor="black" if is_mean else colour)
        ax.annotate(_fmt(v), (x, h), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(list(xs), [b[0] for b in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("P@1 (MMEB, blue) · nDCG@5 (pages, orange)")
    ax.set_ylim(0.0, 1.08)  # every docs/method.md §5 score is a fraction
    ax.set_title(title or "Embedding evaluation")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata=png_metadata("embed"))
    return out


def embed_main(
    model: Any,
    data: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    batch_tokens: int | None = None,
    limit: int | None = None,
    skip_bad: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """``cmpt eval embed`` (docs/method.md §3 "Evaluation"): ``model`` is anything
    :meth:`cmpt.Embedder.from_pretrained` loads (or a loaded Embedder). The data are read (and
    checked) before the model loads. Writes ``embed_results.{json,md,png}`` to ``out`` when given;
    the result carries the markdown ``table``."""
    check_out_dir(out, "embed", [f"embed_results.{ext}" for ext in ("json", "md", "png")])
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"--batch-tokens must be >= 1 (tokens per forward), got {batch_tokens}")
    ds = load_embed_data(data, limit=limit, skip_bad=skip_bad)
    name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        from cmpt.embed.embedder import Embedder

        model = Embedder.from_pretrained(model, device=pick_device(device))
    result = {"model": name, **evaluate_embed(model, ds, batch_tokens=batch_tokens)}
    table = embed_table(result)
    if out is not None:
        out_dir = Path(out)
        json_path = write_result(result, out_dir / "embed_results.json", "embed")
        md_path = out_dir / "embed_results.md"
        given = ds.path or ds.root
        md_path.write_text(f"# Embedding evaluation: {name} on {given}\n\n{table}")
        title = f"{Path(name).name} on {given.name}"
        png_path = plot_embed(result, out_dir / "embed_results.png", title=title)
        result.update(json=str(json_path), markdown=str(md_path), png=str(png_path))
    return {**result, "table": table}
