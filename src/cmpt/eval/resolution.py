"""Resolution sweep: the same VQA evaluation at a series of ``max_pixels`` (method.md §5; CoMP paper Fig. 3).

For every ``max_pixels`` the model's processor is re-capped (``min_pixels`` lowered when needed)
and :func:`cmpt.eval.vqa.evaluate_vqa` runs on the same records. Outputs in ``out_dir``:

* ``resolution_sweep.json``: ``{"data", "metric", "points": [{"requested_max_pixels",
  "max_pixels", "score", "n", "mean_vision_tokens", "per_type", ...}]}``; ``max_pixels`` is the
  effective cap, which differs from the requested one where the model's processor has a fixed
  resolution (the official ``force_resize``, docs/method.md §1.4): such a point also names its
  ``fixed_resolution`` (``"112x112"``), the table says it and a warning line is logged
  (:func:`cmpt.eval.pixels.effective_resolution`);
* ``resolution_sweep.md``: a markdown table (max pixels asked for, the side the images get, merged
  vision tokens per image, score);
* ``resolution_sweep.png``: score against max pixels (log₂ axis), each point labelled with its
  mean number of merged vision tokens (matplotlib, Agg backend);
* ``predictions_<max_pixels>.jsonl``: the predictions of every point.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmpt.data.sources import check_image_root
from cmpt.eval.pixels import fixed_resolution_note
from cmpt.eval.runtime import check_out_dir, pick_device, png_metadata, write_result
from cmpt.eval.vqa import evaluate_vqa, log, resolve_data

__all__ = ["parse_pixels", "plot_sweep", "resolution_main", "resolution_sweep", "sweep_files", "sweep_table"]


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


def _asked(point: dict[str, Any]) -> int:
    """The ``max_pixels`` a sweep point asked for (its effective one in results of older sweeps)."""
    return point.get("requested_max_pixels", point["max_pixels"])


def sweep_table(points: Sequence[dict[str, Any]], metric: str) -> str:
    """Markdown table of a sweep: the max pixels asked for, the side the images get (``≈ √max`` for
    the native policy, the fixed size where the processor has one), tokens, score; a fixed
    resolution that overrode a request adds a line under the table (:func:`fixed_resolution_note`)."""
    lines = [
        f"| max pixels | ≈ side | vision tokens / image | {metric} | n |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        fixed = p.get("fixed_resolution")
        side = f"{fixed} (fixed)" if fixed else f"{round(_asked(p) ** 0.5)}²"
        lines.append(
            f"| {_asked(p)} | {side} | {p['mean_vision_tokens']:.1f} | {p['score']:.4f} | {p['n']} |"
        )
    note = fixed_resolution_note(points)
    return "\n".join(lines) + "\n" + (f"\nNote: {note}.\n" if note else "")


def plot_sweep(
    points: Sequence[dict[str, Any]], metric: str, path: str | os.PathLike, title: str = ""
) -> Path:
    """Score against max pixels (log₂ x axis), points labelled with merged vision tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = [_asked(p) for p in points]
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
    fig.savefig(out, metadata=png_metadata("resolution"))
    return out


def sweep_files(pixels: Sequence[int]) -> list[str]:
    """The files a sweep over ``pixels`` writes into its output directory (the module docstring)."""
    return [f"resolution_sweep.{ext}" for ext in ("json", "md", "png")] + [
        f"predictions_{mp}.jsonl" for mp in pixels
    ]


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
    ``prompt_suffix``, ``min_pixels``, ``image_root``). Returns ``{"data", "metric", "points",
    "json", "markdown", "png", "table"}``; the files are described in the module docstring. An
    existing file there that is not an earlier output of the sweep is refused first
    (:func:`~cmpt.eval.runtime.check_out_dir`).
    """
    for bad in ("max_pixels", "out_jsonl"):
        if bad in vqa_kwargs:
            raise TypeError(f"resolution_sweep sets {bad} itself; do not pass it")
    pixels = parse_pixels(list(max_pixels))
    check_out_dir(out_dir, "resolution", sweep_files(pixels))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_data(data)
    points = []
    for mp in pixels:
        r = evaluate_vqa(
            model, path, max_pixels=mp, limit=limit, out_jsonl=out / f"predictions_{mp}.jsonl", **vqa_kwargs
        )
        points.append({"requested_max_pixels": mp, **r})  # r["max_pixels"]: the effective cap
    if note := fixed_resolution_note(points):
        log.warning("cmpt eval resolution: %s", note)
    metrics = {p["metric"] for p in points}
    metric = metrics.pop() if len(metrics) == 1 else "mixed"
    table = sweep_table(points, metric)
    result = {"data": str(path), "metric": metric, "points": points}
    json_path = write_result(result, out / "resolution_sweep.json", "resolution")
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
    check_out_dir(out_dir, "resolution", sweep_files(pixels))
    resolve_data(data)  # a missing --data is reported before the model loads
    check_image_root(vqa_kwargs.get("image_root"), "--image-root")
    if isinstance(model, (str, os.PathLike)):
        from cmpt.vlm.model import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(model, device=pick_device(device))
    return resolution_sweep(model, data, pixels, out_dir=out_dir, limit=limit, **vqa_kwargs)
