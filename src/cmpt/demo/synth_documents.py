"""Built-in offline MoCa data: interleaved documents and text-only passages (docs/method.md §3).

Two kinds, written as JSON Lines plus PNG images (``cmpt data synth --kind documents|passages``)::

    out_dir/<split>.jsonl
    out_dir/images/<split>/<id>-<k>.png          (documents only)

* ``documents``: ``{"id", "text", "images", "meta"}``. Each document holds 1–``max_images``
  images drawn from the built-in generators (:mod:`cmpt.demo.synthetic`: documents, shape scenes
  and, less often, charts — the slowest to render) placed inside text written from their captions
  and question/answer pairs, e.g. ``"Figure 2 <image> A bar chart titled ..."``; the i-th
  ``<image>`` of ``text`` is the i-th entry of ``images`` (paths relative to ``out_dir``).
* ``passages``: ``{"id", "text", "meta"}``: a few sentences stating the facts of 2–3 synthetic
  charts, documents or scenes, with no image (charts are not rendered for them).

``meta`` keeps the kind, split, seed, index and the facts used (caption and QA of every source), so
answers can be re-derived. Determinism: document / passage ``i`` draws from its own random stream
keyed by ``(kind, seed, i)`` and image ``k`` of it from ``(seed, i, k)``; the same seed gives
byte-identical files, and the first ``m`` records do not depend on ``n``. Splits get their own
seed streams (:func:`cmpt.demo.synthetic.split_seed`). Images are downscaled to ``max_side``
pixels (long side) before saving, which keeps generation fast (about 200 documents in seconds).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from PIL import Image

from cmpt.demo.synthetic import SynthSample, _generator, _parse_splits, claim_output_dir, save_png, split_seed
from cmpt.io_atomic import atomic_file

__all__ = ["DOCUMENT_KINDS", "generate_documents", "generate_passages", "synth_documents_main"]

DOCUMENT_KINDS: tuple[str, ...] = ("documents", "passages")
#: Image generators of the documents and their weights (a chart takes ~10x longer to render).
IMAGE_KINDS: tuple[tuple[str, float], ...] = (("docs", 0.5), ("scenes", 0.42), ("charts", 0.08))

_TITLES = ("Field notes", "Quarterly digest", "Archive extract", "Working paper", "Briefing", "Survey")
_INTROS = (
    "This {what} collects {n} figure{s} with short comments.",
    "The {what} below walks through {n} exhibit{s}.",
    "We review {n} item{s} in this {what}.",
)
_LEADS = (
    "Figure {k} {img} {caption}",
    "As Figure {k} shows, {img} {caption}",
    "{img}\nFigure {k}: {caption}",
    "See the image below.\n{img}\n{caption}",
    "Exhibit {k} {img} is described as follows. {caption}",
)
_QA = ('Asked "{q}", the answer is {a}.', "{q} {a}.", "Q: {q} A: {a}.")
_CLOSINGS = ("That concludes the {what}.", "Further figures follow in the next {what}.", "")


def _rng(*key: Any) -> random.Random:
    return random.Random("cmpt-synth/" + "/".join(str(k) for k in key))


def _qa_sentences(rng: random.Random, qa: list[dict[str, Any]], k: int) -> list[str]:
    return [rng.choice(_QA).format(q=x["q"], a=x["a"]) for x in rng.sample(qa, min(k, len(qa)))]


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def _fact(rng: random.Random, kind: str) -> tuple[str, list[dict[str, Any]]]:
    """Caption and QA of one synthetic item without rendering a chart (passages)."""
    if kind == "charts":
        from cmpt.demo.synth_charts import CHART_TYPES, _random_table, chart_caption, chart_qa

        chart_type = rng.choice(CHART_TYPES)
        title, table = _random_table(rng, chart_type)
        return chart_caption(chart_type, title, table), chart_qa(rng, table)
    sample = _generator(kind)(rng)
    return sample.caption, sample.qa


def make_document(seed: int, index: int, max_images: int = 3) -> tuple[str, list[SynthSample], dict]:
    """``(text, image samples, meta)`` of document ``index``: 1–``max_images`` images in prose."""
    rng = _rng("documents", seed, index)
    n = rng.randint(1, max_images)
    names, weights = zip(*IMAGE_KINDS)
    kinds = rng.choices(names, weights=weights, k=n)
    samples = [_generator(kind)(_rng("documents", seed, index, "image", k)) for k, kind in enumerate(kinds)]
    what = rng.choice(("report", "note", "article", "memo"))
    parts = [
        f"{rng.choice(_TITLES)} {rng.randint(1, 99)}.",
        rng.choice(_INTROS).format(what=what, n=n, s="" if n == 1 else "s"),
    ]
    for k, sample in enumerate(samples, 1):
        lead = rng.choice(_LEADS).format(k=k, img="<image>", caption=sample.caption)
        parts.append(" ".join([lead, *_qa_sentences(rng, sample.qa, rng.randint(1, 2))]))
    closing = rng.choice(_CLOSINGS).format(what=what)
    if closing:
        parts.append(closing)
    meta = {"sources": [{"kind": kd, "caption": s.caption, "qa": s.qa} for kd, s in zip(kinds, samples)]}
    return "\n\n".join(parts), samples, meta


def make_passage(seed: int, index: int) -> tuple[str, dict]:
    """``(text, meta)`` of text-only passage ``index``: the facts of 2–3 synthetic items."""
    rng = _rng("passages", seed, index)
    kinds = rng.choices([k for k, _ in IMAGE_KINDS], k=rng.randint(2, 3))
    facts = [_fact(_rng("passages", seed, index, "fact", k), kind) for k, kind in enumerate(kinds)]
    sentences = []
    for caption, qa in facts:
        sentences += [caption.replace("\n", "; "), *_qa_sentences(rng, qa, rng.randint(1, 3))]
    meta = {"sources": [{"kind": kd, "caption": c, "qa": qa} for kd, (c, qa) in zip(kinds, facts)]}
    return " ".join(sentences), meta


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate_documents(
    n: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    split: str = "train",
    max_images: int = 3,
    max_side: int = 320,
) -> Path:
    """Write ``n`` interleaved documents to ``out_dir/<split>.jsonl`` (+ images); returns the path."""
    if n < 0 or max_images < 1 or max_side < 28:
        raise ValueError(f"need n >= 0, max_images >= 1, max_side >= 28; got {n}, {max_images}, {max_side}")
    out = Path(out_dir)
    rows = []
    for i in range(n):
        text, samples, meta = make_document(seed, i, max_images)
        rid = f"documents-{split}-{i:06d}"
        rels = [f"images/{split}/{rid}-{k}.png" for k in range(len(samples))]
        for rel, sample in zip(rels, samples):
            save_png(_downscale(sample.image, max_side), out / rel)
        info = {"kind": "documents", "split": split, "seed": seed, "index": i, **meta}
        rows.append({"id": rid, "text": text, "images": rels, "meta": info})
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    _write_jsonl(path, rows)
    return path


def generate_passages(n: int, out_dir: str | Path, *, seed: int = 0, split: str = "train") -> Path:
    """Write ``n`` text-only passages to ``out_dir/<split>.jsonl``; returns the path."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        text, meta = make_passage(seed, i)
        info = {"kind": "passages", "split": split, "seed": seed, "index": i, **meta}
        rows.append({"id": f"passages-{split}-{i:06d}", "text": text, "meta": info})
    path = out / f"{split}.jsonl"
    _write_jsonl(path, rows)
    return path


def synth_documents_main(
    kind: str, n: int, out: str | Path, seed: int = 0, splits: str = "train,val"
) -> dict[str, Any]:
    """``cmpt data synth --kind documents|passages``: the listed splits (``train`` gets ``n``, the
    others ``n // 4``), each with its own seed stream; the summary of
    :func:`cmpt.demo.synthetic.synth_main` (``"json"`` is the split's JSONL file). A file or a
    non-empty directory synth did not write is refused (:func:`cmpt.demo.synthetic.claim_output_dir`)."""
    if kind not in DOCUMENT_KINDS:
        raise ValueError(f"unknown document data kind {kind!r}; expected one of {DOCUMENT_KINDS}")
    counts = _parse_splits(splits, n)
    claim_output_dir(out)
    start = time.perf_counter()
    summary: dict[str, Any] = {"kind": kind, "out": str(out), "seed": seed, "splits": {}}
    for split, count in counts.items():
        stream = split_seed(seed, split)
        if kind == "documents":
            path = generate_documents(count, out, seed=stream, split=split)
        else:
            path = generate_passages(count, out, seed=stream, split=split)
        summary["splits"][split] = {"json": str(path), "n": count, "seed": stream}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
