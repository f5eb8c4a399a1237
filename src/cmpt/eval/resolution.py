"""Resolution sweep: the same VQA evaluation at a series of ``max_pixels`` (method.md §5; CoMP paper Fig. 3).

For every ``max_pixels`` the model's processor is re-capped (``min_pixels`` lowered when needed)
and :func:`cmpt.eval.vqa.evaluate_vqa` runs on the same records. Outputs in ``out_dir``:

* ``resolution_sweep.json``: ``{"data", "metric", "points": [{"max_pixels", "score", "n",
  "mean_vision_tokens", "per_type", ...}]}``;
* ``resolution_sweep.md``: a markdown table (max pixels, merged vision tokens per image, score);
* ``resolution_sweep.png``: score against max pixels (log₂ axis), each point labelled with its
  mean number of merged vision tokens (matplotlib, Agg backend);
* ``predictions_<max_pixels>.jsonl``: the predictions of every point.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmpt.eval.runtime import check_out_dir, pick_device, write_json
from cmpt.eval.vqa import evaluate_vqa, resolve_data

__all__ = ["parse_pixels", "plot_sweep", "resolution_main", "resolution_sweep", "sweep_table"]


def parse_pixels(values: str | int | Sequence[str | int]) -> list[int]:
    """``"50176,200704"`` / ``[224*224, ...]`` / ``"448*448"`` → sorted unique ints."""
    items = values.split(",") if isinstance(values, str) else [values] if isinstance(values, int) else values
    out = set()
    for v in items:
        if isinstance(v, str):
            try:
                factors = [int(f) for f in v.strip().split("*") if f.strip()]
            except ValueError:
                raise ValueError(
                    f"--max-pixels {values!r}: {v.strip()!r} is not a pixel count; expected a comma list "
                    'of counts or products, e.g. "224*224,448*448"'
                ) from None
            if not factors:
                continue
            prod = 1
            for f in factors:
                prod *= f
            out.add(prod)
        else:
            out.add(int(v))
    if not out or min(out) <= 0:
        raise ValueError(
            f'--max-pixels must be positive pixel counts, e.g. "224*224,448*448"; got {values!r}'
        )
    return sorted(out)


def sweep_table(points: Sequence[dict[str, Any]], metric: str) -> str:
    """Markdown table of a sweep."""
    lines = [
        f"| max pixels | ≈ side | vision tokens / image | {metric} | n |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        side = round(p["max_pixels"] ** 0.5)
        lines.append(
            f"| {p['max_pixels']} | {side}² | {p['mean_vision_tokens']:.1f} | {p['score']:.4f} | {p['n']} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(
    points: Sequence[dict[str, Any]], metric: str, path: str | os.PathLike, title: str = ""
) -> Path:
    """Score against max pixels (log₂ x axis), points labelled with merged vision tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = [p["max_pixels"] for p in points]
    ys = [p["score"] for p in points]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg rendering without touching pyplot's global backend
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o")
    if len(xs) > 1:
        ax.set_xscale("log", base=2)
    for x, y, p in zip(xs, ys, points):
        ax.annotate(
            f"{p['mean_vision_tokens']:.3g} tok", (x, y), textcoords="offset points", xytext=(0, 6),
            ha="center", fontsize=8,
        )  # fmt: skip
    ax.set_xlabel("max pixels per image")
    ax.set_ylabel(metric)
    ax.set_ylim(0.0, 1.05)  # every docs/method.md §5 score is a fraction
    ax.set_title(title or "VQA score vs. input resolution")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def resolution_sweep(
    model: Any,
    data: str | os.PathLike,
    max_pixels: Sequence[int],
    *,
    out_dir: str | os.PathLike,
    limit: int | None = None,
    **vqa_kwargs: Any,
) -> dict[str, Any]:
    """Run :func:`~cmpt.eval.vqa.evaluate_vqa` at each ``max_pixels`` (docs/method.md §5, paper Fig. 3).

    ``vqa_kwargs`` go to ``evaluate_vqa`` (``batch_size``, ``max_new_tokens``, ``metric``,
    ``prompt_suffix``, ``min_pixels``). Returns ``{"data", "metric", "points", "json", "markdown",
    "png", "table"}``; the files are described in the module docstring.
    """
    for bad in ("max_pixels", "out_jsonl"):
        if bad in vqa_kwargs:
            raise TypeError(f"resolution_sweep sets {bad} itself; do not pass it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_data(data)
    points = []
    for mp in parse_pixels(list(max_pixels)):
        r = evaluate_vqa(
            model, path, max_pixels=mp, limit=limit, out_jsonl=out / f"predictions_{mp}.jsonl", **vqa_kwargs
        )
        points.append({"max_pixels": mp, **{k: v for k, v in r.items() if k != "max_pixels"}})
    metrics = {p["metric"] for p in points}
    metric = metrics.pop() if len(metrics) == 1 else "mixed"
    table = sweep_table(points, metric)
    result = {"data": str(path), "metric": metric, "points": points}
    json_path = write_json(result, out / "resolution_sweep.json")
    md_path = out / "resolution_sweep.md"
    md_path.write_text(f"# Resolution sweep ({path.parent.name}/{path.name})\n\n{table}")
    png_path = plot_sweep(
        points,
        metric,
        out / "resolution_sweep.png",
        title=f"Resolution sweep: {path.parent.name}/{path.name}",
    )
    return {**result, "json": str(json_path), "markdown": str(md_path), "png": str(png_path), "table": table}


def resolution_main(
    model: Any,
    data: str | os.PathLike,
    max_pixels: str | Sequence[int],
    *,
    out_dir: str | os.PathLike,
    limit: int | None = None,
    device: str | None = None,
    **vqa_kwargs: Any,
) -> dict[str, Any]:
    """``cmpt eval resolution`` (docs/method.md §5): ``model`` is a VLM directory (or a loaded model);
    ``max_pixels`` a list or a comma-separated string (``"224*224,448*448"`` works)."""
    pixels = parse_pixels(max_pixels)
    check_out_dir(out_dir, "resolution")
    if isinstance(model, (str, os.PathLike)):
        from cmpt.vlm.model import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(model, device=pick_device(device))
    return resolution_sweep(model, data, pixels, out_dir=out_dir, limit=limit, **vqa_kwargs)
