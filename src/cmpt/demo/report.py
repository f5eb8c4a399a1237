"""Markdown + PNG reports of a multi-stage run and its evaluation (``cmpt demo`` writes ``report.md``).

``stages`` maps a stage name to a dict with at least ``dir`` (the run directory holding
``metrics.jsonl``) and optionally ``seconds``, ``steps``, ``description`` and ``summary`` (the
trainer's summary). ``results`` holds ``rows``: dicts ``{"metric", "data", "before", "after",
"higher_is_better", "note"}`` (``before``/``after`` floats or None) rendered as the comparison table;
``title``, ``before_label``, ``after_label``, ``intro`` (markdown) and ``notes`` (list of markdown
lines) are optional. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_results_table", "plot_curves", "plot_loss_curves", "read_metrics", "write_report"]

LOSS_KEYS = ("loss", "loss/lm", "loss/align")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (unreadable lines skipped; [] when missing)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_loss_curves(
    records: Sequence[dict[str, Any]], out_png: str | os.PathLike, title: str
) -> Path | None:
    """Plot the loss terms of ``metrics.jsonl`` records against the step (log y: ``loss/align`` is
    unweighted and much larger than ``loss/lm``); None when there is nothing to plot."""
    series = {key: [(r["step"], r[key]) for r in records if _finite(r.get(key))] for key in LOSS_KEYS}
    return plot_curves(series, out_png, title=title, xlabel="optimizer step", ylabel="loss", logy=True)


def plot_curves(
    curves: dict[str, Sequence[tuple[float, float]]],
    out_png: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
) -> Path | None:
    """Several labelled ``(x, y)`` curves on one axes (e.g. resolution sweeps before/after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: [p for p in v if _finite(p[1])] for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=label)
    if logx:
        ax.set_xscale("log")
    if logy and all(p[1] > 0 for pts in curves.values() for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "nan"
    return str(v)


def _delta(row: dict[str, Any]) -> tuple[str, str]:
    """(Δ after − before, verdict) of a results row."""
    b, a = row.get("before"), row.get("after")
    if not (_finite(b) and _finite(a)):
        return "n/a", ""
    d = a - b
    if abs(d) < 5e-4:  # equal at the printed precision
        return f"{abs(d):+.3f}", "="
    better = (d > 0) == bool(row.get("higher_is_better", True))
    return f"{d:+.3f}", "better" if better else "worse"


def format_results_table(results: dict[str, Any], markdown: bool = True) -> str:
    """The before/after comparison as a markdown table (or aligned plain text)."""
    before = results.get("before_label", "before")
    after = results.get("after_label", "after")
    header = ["metric", "data", before, after, "Δ", "after is"]
    rows = []
    for r in results.get("rows", []):
        d, verdict = _delta(r)
        arrow = "↑" if r.get("higher_is_better", True) else "↓"
        rows.append(
            [
                f"{r['metric']} {arrow}",
                r.get("data", ""),
                _fmt(r.get("before")),
                _fmt(r.get("after")),
                d,
                verdict,
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _stage_table(stages: dict[str, dict[str, Any]]) -> str:
    lines = ["| stage | what | steps | wall time (s) | first loss | last loss |", "|---|---|---|---|---|---|"]
    for name, st in stages.items():
        recs = read_metrics(st["dir"]) if st.get("dir") else []
        losses = [r["loss"] for r in recs if _finite(r.get("loss"))]
        first, last = (losses[0], losses[-1]) if losses else (None, None)
        steps = st.get("steps", recs[-1]["step"] if recs else None)
        seconds = st.get("seconds")
        lines.append(
            f"| {name} | {st.get('description', '')} | {_fmt(steps)} | {_fmt(seconds, 1)} | "
            f"{_fmt(first)} | {_fmt(last)} |"
        )
    return "\n".join(lines)


def _rel(path: str | os.PathLike, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def write_report(
    out_dir: str | os.PathLike,
    stages: dict[str, dict[str, Any]],
    results: dict[str, Any],
    extra_images: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``out_dir/report.md`` with a stage table, loss-curve PNGs (``out_dir/plots/``), the
    results table, notes and ``extra_images`` (e.g. a resolution sweep); returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, st in stages.items():
        recs = read_metrics(st["dir"]) if st.get("dir") else []
        png = plot_loss_curves(recs, out / "plots" / f"loss_{name}.png", f"{name}: training loss")
        if png is not None:
            plots.append((name, png))
    parts = [f"# {results.get('title', 'cmpt report')}", ""]
    if results.get("intro"):
        parts += [results["intro"], ""]
    if stages:
        parts += ["## Training stages", "", _stage_table(stages), ""]
    if results.get("rows"):
        parts += ["## Results", "", format_results_table(results), ""]
    if results.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if plots or extra_images:
        parts += ["## Plots", ""]
        for name, png in plots:
            parts += [f"![{name} loss]({_rel(png, out)})", ""]
        for img in extra_images:
            parts += [f"![{Path(img).stem}]({_rel(img, out)})", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
