"""Synthetic charts (a ChartQA analogue): bar, line and pie charts of small random tables.

Rendering uses matplotlib's Agg canvas directly (``FigureCanvasAgg``, no pyplot and no global
backend switch) under ``rcdefaults()`` with the bundled DejaVu Sans font and a fixed DPI, and the
pixels are written by Pillow, so the PNGs carry no metadata and are deterministic.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from cmpt.demo.synthetic import SynthSample, sample_image_size

__all__ = ["CHART_TYPES", "make_chart", "render_chart"]

CHART_TYPES: tuple[str, ...] = ("bar", "line", "pie")
DPI = 100

# Topic → category words (bar and pie charts). Words are unique across topics.
TOPICS: dict[str, tuple[str, ...]] = {
    "Fruit Sales": ("Apples", "Bananas", "Cherries", "Grapes", "Lemons", "Mangoes", "Pears", "Plums"),
    "City Visitors": ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Rome", "Seoul", "Quito"),
    "Transport Use": ("Cars", "Buses", "Trains", "Bikes", "Boats", "Planes", "Trams", "Taxis"),
    "Pet Adoptions": ("Dogs", "Cats", "Rabbits", "Hamsters", "Parrots", "Turtles", "Ferrets"),
    "Sport Club Members": ("Tennis", "Soccer", "Rugby", "Hockey", "Golf", "Rowing", "Boxing", "Judo"),
    "Library Loans": ("Novels", "Comics", "Poetry", "History", "Science", "Travel", "Cooking"),
}
# Line charts: consecutive months.
LINE_TOPICS: tuple[str, ...] = ("Monthly Rainfall", "Website Visits", "Ice Cream Sales", "Bus Riders")
MONTHS: tuple[str, ...] = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
CHART_NAMES = {"bar": "bar chart", "line": "line chart", "pie": "pie chart"}


def _join(items: list[str]) -> str:
    """``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _random_table(rng: random.Random, chart_type: str) -> tuple[str, dict[str, int]]:
    """A title and 3–6 categories with distinct positive integer values."""
    k = rng.randint(3, 6)
    year = rng.randint(2010, 2024)
    if chart_type == "line":
        start = rng.randrange(12 - k + 1)
        cats = list(MONTHS[start : start + k])
        title = f"{rng.choice(LINE_TOPICS)} {year}"
    else:
        topic = rng.choice(sorted(TOPICS))
        cats = rng.sample(TOPICS[topic], k)
        title = f"{topic} {year}"
    values = rng.sample(range(1, 100), k)
    return title, dict(zip(cats, values))


def _axes_chart(
    fig: Figure, chart_type: str, title: str, table: dict[str, int], base: float, rng: random.Random
) -> None:
    """Bar or line chart on one axes, laid out by ``tight_layout``."""
    width, height = fig.canvas.get_width_height()
    cats, vals = list(table), list(table.values())
    ax = fig.add_subplot()
    ax.set_title(title)
    horizontal = False
    if chart_type == "bar":
        colors = [rng.choice(PALETTE)] * len(cats) if rng.random() < 0.5 else rng.sample(PALETTE, len(cats))
        horizontal = height > 1.3 * width or (height > width and rng.random() < 0.5)
        if horizontal:
            bars = ax.barh(cats, vals, color=colors)
            ax.invert_yaxis()
            ax.set_xlim(0, max(vals) * 1.25)
        else:
            bars = ax.bar(cats, vals, color=colors)
            ax.set_ylim(0, max(vals) * 1.2)
        ax.bar_label(bars, labels=[str(v) for v in vals], padding=1, fontsize=base)
    else:
        x = np.arange(len(cats))
        ax.plot(x, vals, marker="o", color=rng.choice(PALETTE), markersize=3)
        ax.set_xticks(x, cats)
        ax.set_ylim(0, max(vals) * 1.25)
        ax.set_xlim(-0.5, len(cats) - 0.5)
        for xi, v in zip(x, vals):
            ax.annotate(
                str(v), (xi, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=base
            )
        ax.grid(axis="y", alpha=0.3)
    if not horizontal:
        char_px = 0.6 * (base - 1) * DPI / 72.0
        need = len(cats) * (max(map(len, cats)) * char_px + base)
        ax.tick_params(axis="x", labelrotation=45 if need > 0.75 * width else 0)
    ax.spines[["top", "right"]].set_visible(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.tight_layout(pad=0.3)


def _pie_chart(fig: Figure, title: str, table: dict[str, int], base: float, rng: random.Random) -> None:
    """Pie chart with a "Category (value)" legend beside or below it, laid out by measurement.

    The title and legend are measured with the Agg renderer; the pie gets the largest square left
    (beside or below the legend, whichever is bigger), shrinking the font when nothing fits.
    """
    width, height = fig.canvas.get_width_height()
    renderer = fig.canvas.get_renderer()
    colors = rng.sample(PALETTE, len(table))
    labels = [f"{c} ({v})" for c, v in table.items()]
    handles = [Patch(facecolor=c) for c in colors]
    pad = 4.0
    for size in [base - 0.5 * i for i in range(int((base - 5.0) / 0.5) + 1)]:
        title_text = fig.text(0.5, 1 - pad / height, title, ha="center", va="top", fontsize=size + 1)
        legend = fig.legend(
            handles, labels, frameon=False, fontsize=size, handlelength=1.0, borderpad=0.0, borderaxespad=0.0
        )
        t_box, l_box = title_text.get_window_extent(renderer), legend.get_window_extent(renderer)
        top = t_box.height + 3 * pad
        beside = min(width - l_box.width - 3 * pad, height - top - pad)
        if l_box.height > height - top - pad:
            beside = -1.0
        below = min(width - 2 * pad, height - top - l_box.height - 2 * pad)
        if l_box.width > width - 2 * pad:
            below = -1.0
        fits = t_box.width <= width - pad and max(beside, below) >= 0.35 * min(width, height)
        if fits or size <= 5.0:
            break
        title_text.remove()
        legend.remove()
    diameter = max(beside, below, 8.0)
    if beside >= below:
        x0 = pad + (width - 3 * pad - l_box.width - diameter) / 2
        y0 = pad + (height - top - pad - diameter) / 2
        legend.set_bbox_to_anchor(((x0 + diameter + pad) / width, (y0 + diameter / 2) / height))
        legend.set_loc("center left")
    else:
        x0 = (width - diameter) / 2
        y0 = height - top - diameter - (height - top - diameter - l_box.height - 2 * pad) / 2
        legend.set_bbox_to_anchor((0.5, (y0 - pad) / height))
        legend.set_loc("upper center")
    ax = fig.add_axes((x0 / width, y0 / height, diameter / width, diameter / height))
    ax.pie(
        list(table.values()),
        colors=colors,
        startangle=90,
        counterclock=False,
        radius=1.0,
        wedgeprops={"linewidth": 0.5, "edgecolor": "white"},
    )
    ax.set_xlim(-1.02, 1.02)
    ax.set_ylim(-1.02, 1.02)
    ax.set_aspect("equal")
    ax.set_axis_off()


def render_chart(
    chart_type: str, title: str, table: dict[str, int], size: tuple[int, int], rng: random.Random
) -> Image.Image:
    """Render ``table`` as a ``chart_type`` chart of exactly ``size`` = (width, height) pixels."""
    if chart_type not in CHART_TYPES:
        raise ValueError(f"unknown chart type {chart_type!r}")
    width, height = size
    base = float(np.clip(min(width, height) / 22.0, 7.0, 12.0))
    rc = {
        "font.family": "DejaVu Sans",
        "font.size": base,
        "axes.titlesize": base + 1,
        "xtick.labelsize": base - 1,
        "ytick.labelsize": base - 1,
        "svg.hashsalt": "cmpt-synth",
        "path.simplify": False,
    }
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(rc)
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
        canvas = FigureCanvasAgg(fig)
        if chart_type == "pie":
            _pie_chart(fig, title, table, base, rng)
        else:
            _axes_chart(fig, chart_type, title, table, base, rng)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
    rgb = np.full((height, width, 3), 255, dtype=np.uint8)  # guard against off-by-one canvas sizes
    h, w = min(height, rgba.shape[0]), min(width, rgba.shape[1])
    rgb[:h, :w] = rgba[:h, :w, :3]
    return Image.fromarray(rgb, mode="RGB")


def chart_qa(rng: random.Random, table: dict[str, int]) -> list[dict[str, Any]]:
    """Checkable QA pairs: value, largest, smallest, comparison and difference."""
    cats = list(table)
    a_cat, b_cat = rng.sample(cats, 2)
    value_cat = rng.choice(cats)
    largest = max(cats, key=table.__getitem__)
    smallest = min(cats, key=table.__getitem__)
    return [
        {"q": f"What is the value of {value_cat}?", "a": str(table[value_cat]), "type": "value"},
        {"q": "Which category has the largest value?", "a": largest, "type": "max"},
        {"q": "Which category has the smallest value?", "a": smallest, "type": "min"},
        {
            "q": f"Is {a_cat} greater than {b_cat}?",
            "a": "Yes" if table[a_cat] > table[b_cat] else "No",
            "type": "compare",
            "args": [a_cat, b_cat],
        },
        {
            "q": f"What is the difference between {a_cat} and {b_cat}?",
            "a": str(abs(table[a_cat] - table[b_cat])),
            "type": "diff",
            "args": [a_cat, b_cat],
        },
    ]


def chart_caption(chart_type: str, title: str, table: dict[str, int]) -> str:
    """Dense caption listing every category and value."""
    cats = list(table)
    largest = max(cats, key=table.__getitem__)
    smallest = min(cats, key=table.__getitem__)
    pairs = _join([f"{c} is {v}" for c, v in table.items()])
    what = "months" if chart_type == "line" else "categories"
    return (
        f'A {CHART_NAMES[chart_type]} titled "{title}" showing {len(cats)} {what}: {pairs}. '
        f"The largest is {largest} ({table[largest]}) and the smallest is {smallest} ({table[smallest]}). "
        f"The values add up to {sum(table.values())}."
    )


def make_chart(rng: random.Random) -> SynthSample:
    """One random chart with its caption, QA pairs and ``meta`` (chart_type, title, table)."""
    chart_type = rng.choice(CHART_TYPES)
    title, table = _random_table(rng, chart_type)
    size = sample_image_size(rng)
    image = render_chart(chart_type, title, table, size, rng)
    meta = {"chart_type": chart_type, "title": title, "table": table}
    return SynthSample(image, chart_caption(chart_type, title, table), chart_qa(rng, table), meta)
