"""Synthetic documents (a DocVQA analogue): invoices, receipts and forms rendered with Pillow.

Text is drawn with Pillow's built-in font (``ImageFont.load_default(size=...)``, the embedded
Aileron face through FreeType; the fixed-size bitmap font when Pillow lacks FreeType), in small
sizes chosen so that every line fits the (randomly sized) page. Each document is a title line
followed by ``Key: Value`` lines; the caption is the document's text and the QA pairs are key→value
look-ups. Amounts are consistent: an invoice's Subtotal + Tax = Total, a receipt's items add up to
its Total.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
from typing import Any

from PIL import Image, ImageDraw, ImageFont, features

from cmpt.demo.synthetic import SynthSample, sample_image_size

__all__ = ["DOC_TYPES", "make_document", "render_document"]

DOC_TYPES: tuple[str, ...] = ("invoice", "receipt", "form")
FONT_SIZES: tuple[int, ...] = tuple(range(22, 7, -1))

FIRST_NAMES = (
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Irene", "Jonas", "Keiko",
    "Liam", "Maria", "Nadia", "Omar", "Paula", "Quinn", "Rosa", "Samir", "Tara", "Victor", "Wendy",
)  # fmt: skip
LAST_NAMES = (
    "Adams", "Baker", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hansen", "Ito", "Jensen", "Khan",
    "Lopez", "Meyer", "Novak", "Okafor", "Patel", "Rossi", "Silva", "Tanaka", "Weber", "Young",
)  # fmt: skip
CITIES = (
    "Berlin", "Boston", "Cairo", "Denver", "Dublin", "Lisbon", "Lyon", "Madrid", "Nairobi", "Osaka",
    "Oslo", "Porto", "Prague", "Quito", "Seattle", "Sydney", "Toronto", "Vienna", "Warsaw", "Zurich",
)  # fmt: skip
COUNTRIES = ("Austria", "Brazil", "Canada", "Chile", "Egypt", "France", "Ghana", "India", "Japan", "Kenya")
STORES = ("Green Market", "Corner Shop", "City Bakery", "Sun Pharmacy", "Book Nook", "Fresh Foods")
ITEMS = (
    "Apples", "Bread", "Butter", "Cheese", "Coffee", "Eggs", "Milk", "Pasta", "Rice", "Soap", "Tea",
    "Tomatoes", "Yogurt", "Juice", "Honey", "Pens", "Notebook", "Batteries",
)  # fmt: skip
FORM_TITLES = ("REGISTRATION FORM", "APPLICATION FORM", "MEMBERSHIP FORM")
PAPERS = ((255, 255, 255), (250, 248, 240), (245, 245, 245), (255, 252, 235))
INKS = ((0, 0, 0), (30, 30, 30), (20, 30, 80), (60, 40, 20))


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (bitmap fallback without FreeType)."""
    if features.check("freetype2"):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            pass
    return ImageFont.load_default()


def _fmt_amount(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _date(rng: random.Random, lo: int = 2015, hi: int = 2025) -> dt.date:
    start = dt.date(lo, 1, 1).toordinal()
    return dt.date.fromordinal(rng.randint(start, dt.date(hi, 12, 31).toordinal()))


def _name(rng: random.Random) -> tuple[str, str]:
    return rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)


def _fields(rng: random.Random, doc_type: str) -> tuple[str, dict[str, str]]:
    """The title and ordered ``{key: value}`` fields of a random document."""
    if doc_type == "invoice":
        first, last = _name(rng)
        date = _date(rng)
        subtotal = rng.randint(1_000, 99_999)
        tax = subtotal * rng.choice((5, 8, 10, 20)) // 100
        fields = {
            "Invoice No": str(rng.randint(1000, 99999)),
            "Date": date.isoformat(),
            "Due Date": (date + dt.timedelta(days=rng.choice((14, 30, 45, 60)))).isoformat(),
            "Customer": f"{first} {last}",
            "City": rng.choice(CITIES),
            "Subtotal": _fmt_amount(subtotal),
            "Tax": _fmt_amount(tax),
            "Total": _fmt_amount(subtotal + tax),
        }
        return "INVOICE", fields
    if doc_type == "receipt":
        items = rng.sample(ITEMS, rng.randint(2, 4))
        prices = [rng.randint(50, 2_500) for _ in items]
        fields = {
            "Store": rng.choice(STORES),
            "Date": _date(rng).isoformat(),
            "Time": f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}",
        }
        fields.update({item: _fmt_amount(p) for item, p in zip(items, prices)})
        fields["Total"] = _fmt_amount(sum(prices))
        fields["Cashier"] = rng.choice(FIRST_NAMES)
        return "RECEIPT", fields
    if doc_type == "form":
        first, last = _name(rng)
        fields = {
            "Name": f"{first} {last}",
            "Date of Birth": _date(rng, 1950, 2005).isoformat(),
            "City": rng.choice(CITIES),
            "Country": rng.choice(COUNTRIES),
            "Phone": f"555-{rng.randint(0, 9999):04d}",
            "ID Number": f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(100000, 999999)}",
            "Email": f"{first[0].lower()}{last.lower()}@mail.com",
        }
        return rng.choice(FORM_TITLES), fields
    raise ValueError(f"unknown document type {doc_type!r}")


def _layout(
    title: str, lines: list[str], width: int, height: int, margin: int
) -> tuple[int, int, int] | None:
    """The largest ``(font_size, columns, line_height)`` at which the text fits, else ``None``."""
    for size in FONT_SIZES:
        font, title_font = _font(size), _font(size + 4)
        line_h = size + max(2, size // 3)
        title_h = size + 4 + max(3, size // 2)
        if title_font.getlength(title) > width - 2 * margin:
            continue
        longest = max(font.getlength(line) for line in lines)
        for columns in (1, 2):
            rows = -(-len(lines) // columns)
            col_w = (width - 2 * margin - (columns - 1) * 2 * margin) / columns
            if longest <= col_w and title_h + rows * line_h <= height - 2 * margin:
                return size, columns, line_h
    return None


def render_document(
    title: str, fields: dict[str, str], size: tuple[int, int], rng: random.Random
) -> tuple[Image.Image, str]:
    """Render the document; returns the image and its text (title + ``Key: Value`` lines).

    The page grows beyond ``size`` (up to 640 px a side) only when the text cannot fit at 8 px.
    """
    lines = [f"{k}: {v}" for k, v in fields.items()]
    width, height = size
    margin = max(4, min(width, height) // 24)
    fit = _layout(title, lines, width, height, margin)
    while fit is None:
        width, height = min(640, width + 32), min(640, height + 32)
        margin = max(4, min(width, height) // 24)
        fit = _layout(title, lines, width, height, margin)
        if fit is None and width == height == 640:
            raise RuntimeError("document text does not fit a 640x640 page")
    font_size, columns, line_h = fit
    paper, ink = rng.choice(PAPERS), rng.choice(INKS)
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.rectangle((1, 1, width - 2, height - 2), outline=(150, 150, 150))
    font, title_font = _font(font_size), _font(font_size + 4)
    title_w = title_font.getlength(title)
    tx = margin if rng.random() < 0.5 else int((width - title_w) // 2)
    draw.text((tx, margin), title, fill=ink, font=title_font)
    y0 = margin + font_size + 4 + max(3, font_size // 2)
    draw.line((margin, y0 - 2, width - margin, y0 - 2), fill=(120, 120, 120), width=1)
    rows = -(-len(lines) // columns)
    col_w = (width - 2 * margin - (columns - 1) * 2 * margin) / columns
    for i, line in enumerate(lines):
        col, row = divmod(i, rows)
        x = margin + int(col * (col_w + 2 * margin))
        draw.text((x, y0 + row * line_h), line, fill=ink, font=font)
    return image, "\n".join([title, *lines])


def make_document(rng: random.Random) -> SynthSample:
    """One random document with caption (its text), key look-up QA and ``meta``."""
    doc_type = rng.choice(DOC_TYPES)
    title, fields = _fields(rng, doc_type)
    image, text = render_document(title, fields, sample_image_size(rng), rng)
    keys = rng.sample(list(fields), 3)
    qa: list[dict[str, Any]] = []
    for key in keys:
        is_item = doc_type == "receipt" and key in ITEMS
        q = f"What is the price of {key}?" if is_item else f"What is the {key}?"
        qa.append({"q": q, "a": fields[key], "type": "lookup", "key": key})
    caption = f"A {doc_type} with the following text:\n{text}"
    meta = {"doc_type": doc_type, "title": title, "fields": fields, "text": text}
    return SynthSample(image, caption, qa, meta)
