"""Built-in offline retrieval data with hard negatives for MoCa stage 2 (docs/method.md §3).

``cmpt data synth --kind retrieval`` writes, from the built-in scene, chart and document generators::

    out/train.jsonl                      pairs (MMEB-train layout, cmpt.data.pairs), k = 2 negatives
    out/images/train/<task>/*.png
    out/eval/<task>.jsonl                MMEB-style: {"task", "qry_text", "qry_img_path",
                                         "tgt_text": [..], "tgt_img_path": [..]}, positive at index 0
    out/eval/page_retrieval/             ViDoRe-style: queries.jsonl {"id", "text"} (bare question),
        queries.jsonl corpus.jsonl       corpus.jsonl {"id", "image_path"} (relative to that
        qrels.jsonl images/              directory), qrels.jsonl {"query_id", "corpus_id", "score"}
    out/eval/images/<task>/*.png         (MMEB image paths are relative to out/eval/)
    out/eval/tasks.json                  {task: "mmeb" | "vidore"}

Tasks (hard negatives come from the same generator with another answer or attribute):

* ``caption2image``: caption → scene. A family is a scene and two edits of it (the largest shape
  recoloured; one small shape recoloured); each member's caption retrieves it, its siblings are
  its negatives.
* ``question2chart``: question → chart. A family is three charts of the same type, title,
  categories, size and style with other values; the question states a fact only its chart holds.
* ``page_retrieval``: question → document page (bare question, no instruction, as ViDoRe's
  queries). A family is three documents of one type sharing a customer / store / person and their
  style; the question names the page by a field only it has.
* ``image2class``: scene → class name ``"<colour> <shape>"`` of the largest object (24 classes;
  negatives: the same shape in another colour, the same colour with another shape). Class names
  repeat within a batch, as in MMEB's classification sets.
* ``vqa2image``: an interleaved query (text with its own ``<image>``: a scene and an edit request)
  → the edited scene; negatives: another colour, and the unedited scene.

Sizes: ``n`` training pairs split over the tasks by :data:`SHARES` (charts, the slowest to render,
get the smallest share); ``n_eval`` evaluation queries per task (default ``max(8, n // 25)``), each
with ``1 + 7`` candidates (its hard negatives first, then targets of other queries). Training uses
the seed stream of ``train``, evaluation that of ``test`` (:func:`cmpt.demo.synthetic.split_seed`),
so the evaluation data are held out. Deterministic per seed (family ``i`` of a task draws from its
own stream); images are drawn or downscaled to ``max_side`` pixels.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from cmpt.demo.synth_documents import _downscale, _write_jsonl
from cmpt.demo.synthetic import claim_output_dir, sample_image_size, save_png, split_seed

__all__ = ["SHARES", "TASKS", "make_family", "synth_retrieval_main", "write_eval", "write_train"]

TASKS: tuple[str, ...] = ("caption2image", "question2chart", "page_retrieval", "image2class", "vqa2image")
SHARES: dict[str, float] = {
    "caption2image": 0.25, "question2chart": 0.1, "page_retrieval": 0.25, "image2class": 0.2,
    "vqa2image": 0.2,
}  # fmt: skip
IMAGE_TEXT = "Represent the given image."
INSTRUCTIONS = {
    "caption2image": "Find an image that matches the given caption: ",
    "question2chart": "Find the chart that answers the question: ",
    "image2class": "Represent the given image for classification: what are the colour and shape of the "
    "largest object?",
}
TARGET_TEXT = {
    "question2chart": "Represent the given chart.",
    "page_retrieval": "Represent the given document image.",
}
NUM_CANDIDATES = 8

Item = dict[str, Any]  # {"text": str, "image": PIL image | None, "name": file stem when image}


def _rng(*key: Any) -> random.Random:
    return random.Random("cmpt-retrieval/" + "/".join(str(k) for k in key))


def _img(text: str, image: Image.Image, name: str) -> Item:
    return {"text": text, "image": image, "name": name}


def _txt(text: str) -> Item:
    return {"text": text, "image": None, "name": ""}


# -- scenes ----------------------------------------------------------------------------------------
def _scene(rng: random.Random) -> tuple[Image.Image, dict[str, Any]]:
    from cmpt.demo.synth_scenes import make_scene

    s = make_scene(rng)
    return s.image, s.meta


def _recolor(image: Image.Image, meta: dict[str, Any], which: int, color: str, max_side: int):
    """The scene with shape ``which`` redrawn in ``color`` (same geometry, no anti-aliasing)."""
    from cmpt.demo.synth_scenes import COLORS, _draw

    out = image.copy()
    _draw(ImageDraw.Draw(out), meta["shapes"][which], COLORS[color])
    shapes = [dict(s) for s in meta["shapes"]]
    shapes[which]["color"] = color
    return _downscale(out, max_side), {**meta, "shapes": shapes}


def _scene_caption(meta: dict[str, Any]) -> str:
    from cmpt.demo.synth_scenes import _join

    shapes = meta["shapes"]
    parts = [f"a {s['size']} {s['color']} {s['shape']} {s['position']}" for s in shapes]
    return (
        f"A picture of {len(shapes)} shapes on {meta['background']['text']}: {_join(parts)}. "
        f"The largest shape is a {shapes[0]['color']} {shapes[0]['shape']}."
    )


def _other_color(rng: random.Random, *avoid: str) -> str:
    from cmpt.demo.synth_scenes import COLORS

    return rng.choice([c for c in sorted(COLORS) if c not in avoid])


def _caption2image(rng: random.Random, fam: str, max_side: int) -> list[tuple[Item, Item, list[Item]]]:
    image, meta = _scene(rng)
    small = rng.randrange(1, len(meta["shapes"]))
    variants = [(_downscale(image, max_side), meta)]
    variants.append(_recolor(image, meta, 0, _other_color(rng, meta["shapes"][0]["color"]), max_side))
    variants.append(_recolor(image, meta, small, _other_color(rng, meta["shapes"][small]["color"]), max_side))
    targets = [_img(IMAGE_TEXT, im, f"{fam}-{m}") for m, (im, _) in enumerate(variants)]
    return [
        (_txt(INSTRUCTIONS["caption2image"] + _scene_caption(mt)), targets[m], targets[:m] + targets[m + 1 :])
        for m, (_, mt) in enumerate(variants)
    ]


def _image2class(rng: random.Random, fam: str, max_side: int) -> list[tuple[Item, Item, list[Item]]]:
    from cmpt.demo.synth_scenes import CLASSES

    image, meta = _scene(rng)
    color, shape = meta["shapes"][0]["color"], meta["shapes"][0]["shape"]
    other_shape = rng.choice([c for c in CLASSES if c != shape])
    negs = [_txt(f"{_other_color(rng, color)} {shape}"), _txt(f"{color} {other_shape}")]
    query = _img(INSTRUCTIONS["image2class"], _downscale(image, max_side), f"{fam}-q")
    return [(query, _txt(f"{color} {shape}"), negs)]


def _vqa2image(rng: random.Random, fam: str, max_side: int) -> list[tuple[Item, Item, list[Item]]]:
    image, meta = _scene(rng)
    largest = meta["shapes"][0]
    new = _other_color(rng, largest["color"])
    other = _other_color(rng, largest["color"], new)
    text = (
        f"Given the picture <image> find the same picture with the largest {largest['shape']} coloured {new}."
    )
    query = _img(text, _downscale(image, max_side), f"{fam}-q")
    pos = _img(IMAGE_TEXT, _recolor(image, meta, 0, new, max_side)[0], f"{fam}-p")
    negs = [
        _img(IMAGE_TEXT, _recolor(image, meta, 0, other, max_side)[0], f"{fam}-n0"),
        {**query, "text": IMAGE_TEXT},
    ]
    return [(query, pos, negs)]


# -- charts and documents --------------------------------------------------------------------------
def _chart_facts(chart: str, title: str, table: dict[str, int]) -> list[tuple[str, str]]:
    from cmpt.demo.synth_charts import CHART_NAMES

    name, what = CHART_NAMES[chart], "month" if chart == "line" else "category"
    largest = max(table, key=table.__getitem__)
    facts = [(f"v:{c}:{v}", f'Which {name} titled "{title}" shows {c} at {v}?') for c, v in table.items()]
    return [*facts, (f"max:{largest}", f'Which {name} titled "{title}" has {largest} as its largest {what}?')]


def _question2chart(rng: random.Random, fam: str, max_side: int) -> list[tuple[Item, Item, list[Item]]]:
    from cmpt.demo.synth_charts import CHART_TYPES, _random_table, render_chart

    chart = rng.choice(CHART_TYPES)
    title, base = _random_table(rng, chart)
    while True:  # siblings: same categories, other values, until each chart has a fact of its own
        tables = [base] + [dict(zip(base, rng.sample(range(1, 100), len(base)))) for _ in range(2)]
        facts = [dict(_chart_facts(chart, title, t)) for t in tables]
        unique = [[k for k in fm if all(k not in f for f in facts if f is not fm)] for fm in facts]
        if all(unique):
            break
    size, style = sample_image_size(rng, max_side=max_side), rng.getrandbits(64)
    targets = [
        _img(
            TARGET_TEXT["question2chart"],
            render_chart(chart, title, t, size, random.Random(style)),
            f"{fam}-{m}",
        )
        for m, t in enumerate(tables)
    ]
    out = []
    for m in range(len(tables)):
        question = facts[m][rng.choice(unique[m])]
        out.append(
            (_txt(INSTRUCTIONS["question2chart"] + question), targets[m], targets[:m] + targets[m + 1 :])
        )
    return out


_SHARED = {"invoice": ("Customer", "City"), "receipt": ("Store",), "form": ("Name", "City")}
_ASK = {
    "invoice": ("Total", "Due Date", "Date", "Tax"),
    "receipt": ("Total", "Cashier"),
    "form": ("Phone", "Date of Birth", "Country"),
}


def _doc_question(doc: str, f: dict[str, str], ask: str) -> str:
    if doc == "invoice":
        return f"What is the {ask} of invoice {f['Invoice No']} for {f['Customer']}?"
    if doc == "receipt":
        return f"What is the {ask} on the {f['Store']} receipt of {f['Date']} at {f['Time']}?"
    return f"What is the {ask} of {f['Name']} with ID number {f['ID Number']}?"


def _page_retrieval(rng: random.Random, fam: str, max_side: int) -> list[tuple[Item, Item, list[Item]]]:
    from cmpt.demo.synth_docs import DOC_TYPES, _fields, render_document

    doc = rng.choice(DOC_TYPES)
    title, base = _fields(random.Random(rng.getrandbits(64)), doc)
    members = [base]
    while len(members) < 3:
        _, f = _fields(random.Random(rng.getrandbits(64)), doc)
        f.update({k: base[k] for k in _SHARED[doc]})
        questions = {_doc_question(doc, m, "x") for m in members}
        if _doc_question(doc, f, "x") not in questions:  # the page is named by a field only it has
            members.append(f)
    size, style = sample_image_size(rng, max_side=max_side), rng.getrandbits(64)
    text = TARGET_TEXT["page_retrieval"]
    pages = [
        _img(text, render_document(title, f, size, random.Random(style))[0], f"{fam}-{m}")
        for m, f in enumerate(members)
    ]
    return [
        (_txt(_doc_question(doc, f, rng.choice(_ASK[doc]))), pages[m], pages[:m] + pages[m + 1 :])
        for m, f in enumerate(members)
    ]


MAKERS = {
    "caption2image": _caption2image,
    "question2chart": _question2chart,
    "page_retrieval": _page_retrieval,
    "image2class": _image2class,
    "vqa2image": _vqa2image,
}


def make_family(task: str, seed: int, index: int, max_side: int = 256) -> list[tuple[Item, Item, list[Item]]]:
    """The ``(query, positive, hard negatives)`` examples of family ``index`` of ``task`` (items are
    ``{"text", "image", "name"}``), drawn from the stream ``(task, seed, index)``."""
    if task not in MAKERS:
        raise ValueError(f"unknown retrieval task {task!r}; expected one of {TASKS}")
    return MAKERS[task](_rng(task, seed, index), f"{index:05d}", max_side)


def _examples(task: str, n: int, seed: int, max_side: int) -> list[tuple[int, tuple[Item, Item, list[Item]]]]:
    out: list[tuple[int, tuple[Item, Item, list[Item]]]] = []
    f = 0
    while len(out) < n:
        out += [(f, ex) for ex in make_family(task, seed, f, max_side)][: n - len(out)]
        f += 1
    return out


def _saver(root: Path, rel_dir: str):
    saved: dict[str, str] = {}

    def save(item: Item) -> str | None:
        if item["image"] is None:
            return None
        if item["name"] not in saved:
            rel = f"{rel_dir}/{item['name']}.png"
            save_png(item["image"], root / rel)
            saved[item["name"]] = rel
        return saved[item["name"]]

    return save


def _counts(n: int, tasks: list[str]) -> dict[str, int]:
    weights = [SHARES[t] for t in tasks]
    exact = [n * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(tasks)), key=lambda i: -(exact[i] - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    return dict(zip(tasks, counts))


def write_train(
    out: str | Path, n: int, *, seed: int = 0, tasks: list[str] | None = None, max_side: int = 256
) -> Path:
    """Write ``n`` training pairs (``out/train.jsonl`` + images); returns the JSONL path."""
    root, rows = Path(out), []
    for task, count in _counts(n, list(tasks or TASKS)).items():
        save = _saver(root, f"images/train/{task}")
        for m, (fam, (q, p, negs)) in enumerate(_examples(task, count, seed, max_side)):
            rows.append({
                "id": f"{task}-{m:05d}", "task": task,
                "qry": q["text"], "qry_image_path": save(q),
                "pos_text": p["text"], "pos_image_path": save(p),
                "neg_text": [x["text"] for x in negs], "neg_image_path": [save(x) for x in negs],
                "meta": {"family": fam, "seed": seed},
            })  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    _write_jsonl(root / "train.jsonl", rows)
    return root / "train.jsonl"


def _candidates(rng: random.Random, task: str, pos: Item, negs: list[Item], pool: list[Item]) -> list[Item]:
    if task == "image2class":
        from cmpt.demo.synth_scenes import CLASSES, COLORS

        pool = [_txt(f"{c} {s}") for c in sorted(COLORS) for s in CLASSES]
    key = (lambda x: x["name"]) if pos["image"] is not None else (lambda x: x["text"])
    out, seen = [], set()
    for x in [pos, *negs, *rng.sample(pool, len(pool))]:
        if key(x) not in seen and len(out) < NUM_CANDIDATES:
            seen.add(key(x))
            out.append(x)
    return out


def write_eval(
    out: str | Path, n_eval: int, *, seed: int = 0, tasks: list[str] | None = None, max_side: int = 256
) -> dict[str, str]:
    """Write ``n_eval`` evaluation queries per task under ``out/eval`` (MMEB JSONL, ViDoRe directory
    for ``page_retrieval``); returns ``{task: path}``."""
    root = Path(out) / "eval"
    written: dict[str, str] = {}
    for task in tasks or TASKS:
        examples = _examples(task, n_eval, seed, max_side)
        if task == "page_retrieval":
            d = root / task
            save = _saver(d, "images")
            queries = [{"id": f"q{m:05d}", "text": q["text"]} for m, (_, (q, _, _)) in enumerate(examples)]
            pages = {x["name"]: x for _, (_, p, negs) in examples for x in [p, *negs]}
            corpus = [{"id": f"p{name}", "image_path": save(x)} for name, x in sorted(pages.items())]
            qrels = [{"query_id": f"q{m:05d}", "corpus_id": f"p{p['name']}", "score": 1}
                     for m, (_, (_, p, _)) in enumerate(examples)]  # fmt: skip
            for name, rows in (("queries", queries), ("corpus", corpus), ("qrels", qrels)):
                d.mkdir(parents=True, exist_ok=True)
                _write_jsonl(d / f"{name}.jsonl", rows)
            written[task] = str(d)
            continue
        save = _saver(root, f"images/{task}")
        pool = [x for _, (_, p, negs) in examples for x in [p, *negs]]
        rows = []
        for m, (fam, (q, p, negs)) in enumerate(examples):
            others = [x for (f, (_, pp, nn)) in examples if f != fam for x in [pp, *nn]] or pool
            cands = _candidates(_rng(task, seed, "candidates", m), task, p, negs, others)
            rows.append({
                "task": task, "qry_text": q["text"], "qry_img_path": save(q) or "",
                "tgt_text": [x["text"] for x in cands], "tgt_img_path": [save(x) or "" for x in cands],
            })  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        _write_jsonl(root / f"{task}.jsonl", rows)
        written[task] = str(root / f"{task}.jsonl")
    kinds = {t: "vidore" if t == "page_retrieval" else "mmeb" for t in written}
    (root / "tasks.json").write_text(json.dumps(kinds, indent=1) + "\n", encoding="utf-8")
    return written


def synth_retrieval_main(
    n: int, out: str | Path, seed: int = 0, *, n_eval: int | None = None, tasks: list[str] | None = None,
    max_side: int = 256,
) -> dict[str, Any]:  # fmt: skip
    """``cmpt data synth --kind retrieval``: ``n`` training pairs and the held-out evaluation data
    (a file or a non-empty directory synth did not write is refused:
    :func:`cmpt.demo.synthetic.claim_output_dir`)."""
    if n < 1 or max_side < 56:
        raise ValueError(f"need n >= 1 and max_side >= 56, got {n}, {max_side}")
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown retrieval task(s) {unknown}; expected some of {TASKS}")
    claim_output_dir(out)
    start = time.perf_counter()
    n_eval = max(8, n // 25) if n_eval is None else int(n_eval)
    train = write_train(out, n, seed=split_seed(seed, "train"), tasks=tasks, max_side=max_side)
    evals = write_eval(out, n_eval, seed=split_seed(seed, "test"), tasks=tasks, max_side=max_side)
    return {
        "kind": "retrieval", "out": str(out), "seed": seed, "train": str(train),
        "pairs": _counts(n, list(tasks or TASKS)), "eval": evals, "eval_queries_per_task": n_eval,
        "seconds": round(time.perf_counter() - start, 3),
    }  # fmt: skip
