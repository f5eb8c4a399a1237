"""Builders of small LLaVA corpora for the data tests: a clean one and one full of broken inputs.

``build_broken_corpus(tmp)`` writes ``tmp/corpus/data.jsonl`` and its images and returns the ids of
the good records and, for each bad record, the set of reasons the checker must report (docs/method.md §4).
CMYK, 16-bit, palette and alpha images are *valid* and must not be reported.
"""

from __future__ import annotations

import functools
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
from cmpt.vlm.chat import ensure_vision_tokens


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """The tests' tiny ChatML tokenizer with the vision tokens (shared; do not modify it)."""
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    ensure_vision_tokens(tok)
    return tok


def tiny_processor():
    """A small-resolution processor: patch 14, merge 2, at most 16 merged tokens per image."""
    from cmpt.vision.processor import ImageProcessor

    return ImageProcessor(patch_size=14, merge_size=2, min_pixels=28 * 28, max_pixels=28 * 28 * 16)


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def conv(question: str = "<image>\nWhat is shown?", *answers: str) -> list[dict]:
    """A LLaVA conversation: the question, then one answer (or several rounds of answers)."""
    answers = answers or ("A red circle.",)
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answers[0]}]
    for a in answers[1:]:
        turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": a}]
    return turns


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width × height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _truncated(img: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


@dataclass
class Corpus:
    path: Path  # the JSONL file
    root: Path  # the image root (= the JSONL's directory)
    good: list[str] = field(default_factory=list)
    bad: dict[str, set[str]] = field(default_factory=dict)  # id -> expected reasons


def _write(path: Path, rows: list[dict | bytes]) -> None:
    with path.open("wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")


def build_clean_corpus(tmp: Path, n: int = 6) -> Corpus:
    """``n`` valid records over a few RGB images of different sizes, one of them text-only."""
    root = tmp / "clean"
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows: list[dict | bytes] = []
    for i in range(n):
        if i == n - 1:
            rows.append({"id": f"c{i}", "conversations": conv("Say something.", "Something.")})
            continue
        noise(40 + 17 * i, 30 + 11 * i, seed=i).save(root / "img" / f"{i}.png")
        rows.append({"id": f"c{i}", "image": f"img/{i}.png", "conversations": conv()})
    _write(root / "data.jsonl", rows)
    return Corpus(root / "data.jsonl", root, good=[str(r["id"]) for r in rows if isinstance(r, dict)])


def build_broken_corpus(tmp: Path) -> Corpus:
    """A JSONL corpus mixing valid records (unusual but valid image modes) with every kind of bad one."""
    root = tmp / "corpus"
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    noise(60, 45).save(img / "rgb.png")
    noise(50, 70, seed=1).save(img / "rgb.jpg", quality=90)
    noise(64, 48, "CMYK", seed=2).save(img / "cmyk.jpg")
    gray16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(gray16).save(img / "gray16.png")  # mode I;16
    pal = noise(40, 40, seed=3).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(img / "palette.png", transparency=0)
    noise(40, 56, "RGBA", seed=4).save(img / "rgba.png")
    (img / "trunc.png").write_bytes(_truncated(noise(200, 200, seed=5), "PNG"))
    (img / "trunc.jpg").write_bytes(_truncated(noise(200, 200, seed=6), "JPEG"))
    (img / "empty.jpg").write_bytes(b"")
    (img / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    (img / "bomb.png").write_bytes(bomb_png())
    Image.new("RGB", (20000, 1), "white").save(img / "thin.png")
    outside = tmp / "outside.png"
    noise(40, 40, seed=7).save(outside)

    def rec(rid: str, image, question: str = "<image>\nWhat is shown?") -> dict:
        return {"id": rid, "image": image, "conversations": conv(question)}

    good = [
        rec("g_rgb", "img/rgb.png"),
        rec("g_jpg", "img/rgb.jpg"),
        rec("g_cmyk", "img/cmyk.jpg"),
        rec("g_gray16", "img/gray16.png"),
        rec("g_palette", "img/palette.png"),
        rec("g_rgba", "img/rgba.png"),
        rec("g_multi", ["img/rgb.png", "img/rgba.png"], "<image>\n<image>\nCompare them."),
        {"id": "g_text", "conversations": conv("Tell me a fact.", "Bars are red.", "Dots are blue.")},
    ]
    bad: list[tuple[dict | bytes, set[str]]] = [
        (rec("b_trunc_png", "img/trunc.png"), {"unreadable_image"}),
        (rec("b_trunc_jpg", "img/trunc.jpg"), {"unreadable_image"}),
        (rec("b_empty", "img/empty.jpg"), {"unreadable_image"}),
        (rec("b_html", "img/page.jpg"), {"unreadable_image"}),
        (rec("b_bomb", "img/bomb.png"), {"unreadable_image"}),
        (rec("b_thin", "img/thin.png"), {"extreme_aspect_ratio"}),
        (rec("b_dotdot", "../outside.png"), {"path_escape"}),
        (rec("b_abs", str(outside)), {"path_escape"}),
        (rec("b_missing", "img/nope.png"), {"missing_image"}),
        ({"id": "b_noconv", "image": "img/rgb.png"}, {"missing_key"}),
        (rec("b_two_ph", "img/rgb.png", "<image>\n<image>\nWhat?"), {"placeholder_mismatch"}),
        (rec("b_no_ph", "img/rgb.png", "What is shown?"), {"placeholder_mismatch"}),
        ({"id": "b_empty_conv", "conversations": []}, {"empty_conversation"}),
        ({"id": "b_no_asst", "conversations": [{"from": "human", "value": "Hi"}]}, {"no_assistant_turn"}),
        (
            {
                "id": "b_nonstr",
                "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}],
            },
            {"bad_value"},
        ),
        (b'{"id": "b_utf8", "conversations": [{"from": "human", "value": "\xff\xfe"}]}\n', {"invalid_json"}),
        (b'{"id": "b_syntax", "conversations": [\n', {"invalid_json"}),
    ]
    # bad records first, then the good ones: with shuffle off the last micro-batch holds a good sample
    rows = [r for r, _ in bad] + good
    _write(root / "data.jsonl", rows)
    expected: dict[str, set[str]] = {}
    for i, (r, reasons) in enumerate(bad):
        rid = r["id"] if isinstance(r, dict) else f"data.jsonl:{i}"
        expected[rid] = reasons
    return Corpus(root / "data.jsonl", root, good=[r["id"] for r in good], bad=expected)
