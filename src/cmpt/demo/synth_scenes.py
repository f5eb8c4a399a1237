"""Synthetic shape scenes for the classification and segmentation probes.

Each scene holds 2–5 non-overlapping filled shapes (circle, square, triangle; squares and triangles
rotated) in saturated colours on a plain or gradient background that is either light (every
channel ≥ 185) or dark (every channel ≤ 70), so no background pixel ever equals a shape colour.

* Class label: the shape of the largest object, whose area (10–16 % of ``min(W, H)²``) exceeds the
  summed area of all the other shapes (each 0.8–1.8 %), so it also owns the most mask pixels.
* Mask: mode ``"L"``, value = index into ``SEG_CLASSES`` (0 = background, 1 circle, 2 square,
  3 triangle). Shapes are drawn with Pillow's non-anti-aliased rasteriser using the same integer
  geometry for the image and the mask, so the mask is exact: the ignore value 255 is reserved for
  the probes but never written.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cmpt.demo.synthetic import SynthSample, sample_image_size

__all__ = ["CLASSES", "COLORS", "IGNORE_INDEX", "SEG_CLASSES", "make_scene"]

CLASSES: tuple[str, ...] = ("circle", "square", "triangle")
SEG_CLASSES: tuple[str, ...] = ("background", *CLASSES)
IGNORE_INDEX = 255
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 130, 20),
    "purple": (140, 60, 190),
    "cyan": (30, 190, 210),
    "pink": (235, 100, 175),
}
LIGHT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (215, 215, 215),
    "cream": (250, 240, 200),
    "light blue": (200, 225, 250),
    "light pink": (250, 215, 225),
    "mint": (205, 245, 220),
}
DARK_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark grey": (55, 55, 55),
    "navy": (15, 20, 65),
    "dark green": (15, 60, 30),
}
LARGEST_AREA = (0.10, 0.16)  # fraction of min(W, H)²
OTHER_AREA = (0.008, 0.018)
GAP = 3  # minimum pixels between the bounding boxes of two shapes


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _background(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, dict[str, Any]]:
    """A plain or linear-gradient background, light or dark, and its description."""
    width, height = size
    palette = LIGHT_BACKGROUNDS if rng.random() < 0.7 else DARK_BACKGROUNDS
    names = sorted(palette)
    if rng.random() < 0.5:
        name = rng.choice(names)
        image = Image.new("RGB", size, palette[name])
        return image, {"kind": "plain", "colors": [name], "text": f"a plain {name} background"}
    a, b = rng.sample(names, 2)
    direction = rng.choice(("horizontal", "vertical", "diagonal"))
    xs = np.linspace(0.0, 1.0, width, dtype=np.float64)[None, :]
    ys = np.linspace(0.0, 1.0, height, dtype=np.float64)[:, None]
    if direction == "horizontal":
        t = np.broadcast_to(xs, (height, width))
    elif direction == "vertical":
        t = np.broadcast_to(ys, (height, width))
    else:
        t = (xs + ys) / 2.0
    c0, c1 = np.array(palette[a], dtype=np.float64), np.array(palette[b], dtype=np.float64)
    rgb = np.rint(c0 * (1.0 - t[..., None]) + c1 * t[..., None]).astype(np.uint8)
    text = f"a {direction} gradient background from {a} to {b}"
    return Image.fromarray(rgb, mode="RGB"), {
        "kind": "gradient",
        "colors": [a, b],
        "direction": direction,
        "text": text,
    }


def _shoelace(points: list[tuple[int, int]]) -> float:
    s = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        s += x0 * y1 - x1 * y0
    return abs(s) / 2.0


def _geometry(shape: str, area: float, rng: random.Random) -> tuple[list[tuple[float, float]] | float, float]:
    """Centre-relative polygon vertices (or the circle radius) and the rotation in degrees."""
    if shape == "circle":
        return max(3.0, math.sqrt(area / math.pi)), 0.0
    if shape == "square":
        s = math.sqrt(area)
        rel = [(-s / 2, -s / 2), (s / 2, -s / 2), (s / 2, s / 2), (-s / 2, s / 2)]
        angle = rng.uniform(0.0, 90.0)
    else:  # isosceles triangle, base = height = s, centred on its centroid
        s = math.sqrt(2.0 * area)
        rel = [(-s / 2, s / 3), (s / 2, s / 3), (0.0, -2 * s / 3)]
        angle = rng.uniform(0.0, 360.0)
    c, sn = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x * c - y * sn, x * sn + y * c) for x, y in rel], angle


def _place(
    shape: str,
    area: float,
    size: tuple[int, int],
    taken: list[list[int]],
    rng: random.Random,
    tries: int = 60,
) -> dict[str, Any] | None:
    """Sample a position whose bounding box lies inside the image, clear of ``taken`` boxes."""
    width, height = size
    geom, angle = _geometry(shape, area, rng)
    for _ in range(tries):
        if isinstance(geom, float):
            r = round(geom)
            lo_x, hi_x, lo_y, hi_y = r + 1, width - 2 - r, r + 1, height - 2 - r
            if lo_x > hi_x or lo_y > hi_y:
                return None
            cx, cy = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
            bbox = [cx - r, cy - r, cx + r, cy + r]
            # Pillow fills the inclusive box: a disc of diameter 2r + 1 pixels.
            spec: dict[str, Any] = {"radius": r, "area": round(math.pi * (r + 0.5) ** 2, 1)}
        else:
            min_x, max_x = min(p[0] for p in geom), max(p[0] for p in geom)
            min_y, max_y = min(p[1] for p in geom), max(p[1] for p in geom)
            lo_x, hi_x = math.ceil(1 - min_x), math.floor(width - 2 - max_x)
            lo_y, hi_y = math.ceil(1 - min_y), math.floor(height - 2 - max_y)
            if lo_x > hi_x or lo_y > hi_y:
                return None
            cx, cy = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
            points = [(round(cx + x), round(cy + y)) for x, y in geom]
            bbox = [min(p[0] for p in points), min(p[1] for p in points)]
            bbox += [max(p[0] for p in points), max(p[1] for p in points)]
            spec = {"points": [list(p) for p in points], "angle": round(angle, 2), "area": _shoelace(points)}
        if all(
            bbox[2] + GAP < o[0] or o[2] + GAP < bbox[0] or bbox[3] + GAP < o[1] or o[3] + GAP < bbox[1]
            for o in taken
        ):
            return {"shape": shape, "center": [cx, cy], "bbox": bbox, **spec}
    return None


def _position(center: list[int], size: tuple[int, int]) -> str:
    """Coarse 3×3 position word of a point."""
    col = min(2, center[0] * 3 // size[0])
    row = min(2, center[1] * 3 // size[1])
    vert, horiz = ("top", "", "bottom")[row], ("left", "", "right")[col]
    if vert and horiz:
        return f"in the {vert} {horiz}"
    if vert:
        return f"at the {vert}"
    return f"on the {horiz}" if horiz else "in the center"


def _layout(rng: random.Random, size: tuple[int, int]) -> list[dict[str, Any]]:
    """2–5 non-overlapping shapes, the largest first; retried until at least two fit."""
    m2 = min(size) ** 2
    for _ in range(100):
        count = rng.randint(2, 5)
        label = rng.choice(CLASSES)
        first = _place(label, rng.uniform(*LARGEST_AREA) * m2, size, [], rng)
        if first is None:
            continue
        shapes = [first]
        for _ in range(count - 1):
            placed = _place(
                rng.choice(CLASSES), rng.uniform(*OTHER_AREA) * m2, size, [s["bbox"] for s in shapes], rng
            )
            if placed is not None:
                shapes.append(placed)
        if len(shapes) >= 2:
            return shapes
    raise RuntimeError(f"could not lay out a scene of size {size}")


def _draw(draw: ImageDraw.ImageDraw, shape: dict[str, Any], fill: int | tuple[int, int, int]) -> None:
    """Fill one shape without anti-aliasing or outline (same pixels in RGB and L images)."""
    if shape["shape"] == "circle":
        draw.ellipse(shape["bbox"], fill=fill)
    else:
        draw.polygon([tuple(p) for p in shape["points"]], fill=fill)


def _qa(rng: random.Random, shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    largest = shapes[0]
    color = rng.choice(sorted({s["color"] for s in shapes}) if rng.random() < 0.7 else sorted(COLORS))
    kind = rng.choice(CLASSES)
    return [
        {"q": "How many shapes are there?", "a": str(len(shapes)), "type": "count"},
        {"q": "What colour is the largest shape?", "a": largest["color"], "type": "largest_color"},
        {"q": "What shape is the largest object?", "a": largest["shape"], "type": "largest_shape"},
        {
            "q": f"How many {color} shapes are there?",
            "a": str(sum(s["color"] == color for s in shapes)),
            "type": "count_color",
            "args": [color],
        },
        {
            "q": f"How many {kind}s are there?",
            "a": str(sum(s["shape"] == kind for s in shapes)),
            "type": "count_shape",
            "args": [kind],
        },
    ]


def make_scene(rng: random.Random) -> SynthSample:
    """One random scene with caption, QA, class label and exact segmentation mask."""
    size = sample_image_size(rng)
    image, background = _background(rng, size)
    shapes = _layout(rng, size)
    mask = Image.new("L", size, 0)
    draw_img, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for i, shape in enumerate(shapes):
        shape["color"] = rng.choice(sorted(COLORS))
        shape["rgb"] = list(COLORS[shape["color"]])
        shape["size"] = "large" if i == 0 else "small"
        shape["position"] = _position(shape["center"], size)
        _draw(draw_img, shape, COLORS[shape["color"]])
        _draw(draw_mask, shape, SEG_CLASSES.index(shape["shape"]))
    parts = [f"a {s['size']} {s['color']} {s['shape']} {s['position']}" for s in shapes]
    largest = shapes[0]
    caption = (
        f"A picture of {len(shapes)} shapes on {background['text']}: {_join(parts)}. "
        f"The largest shape is a {largest['color']} {largest['shape']}."
    )
    meta = {
        "background": background,
        "shapes": shapes,
        "label": CLASSES.index(largest["shape"]),
        "label_name": largest["shape"],
        "classes": list(CLASSES),
        "seg_classes": list(SEG_CLASSES),
        "ignore_index": IGNORE_INDEX,
    }
    return SynthSample(image, caption, _qa(rng, shapes), meta, extra_images={"mask": mask})
