"""Built-in offline data: synthetic charts, documents and shape scenes (deterministic by seed).

Every generator writes a LLaVA-style JSON list plus PNG images::

    out_dir/<split>.json
    out_dir/images/<split>/<id>.png          (and <id>_mask.png for scenes)

Each record is ``{"id", "image", "conversations", "meta"}`` where ``image`` is relative to
``out_dir``, the first human turn starts with the single ``<image>`` placeholder and asks for a
dense caption, and the following turns are question/answer pairs whose answers are correct by
construction. ``meta`` holds everything needed to re-derive the answers (the chart table, the
document fields, the scene's shapes) plus ``meta["caption"]`` and ``meta["qa"]``.

Determinism: sample ``i`` is drawn from its own ``random.Random`` keyed by ``(kind, seed, i)``, so
the same seed gives byte-identical JSON and PNG files (PNGs are written by Pillow without any
metadata chunk), and the first ``k`` samples do not depend on ``n``. The ``split`` argument of
:func:`generate` only names the output; :func:`generate_splits` gives validation and test their own
seed streams (``seed + VAL_SEED_OFFSET`` and ``seed + TEST_SEED_OFFSET``).

Kinds:

* ``charts`` (ChartQA analogue, relaxed accuracy): bar / line / pie charts rendered by matplotlib.
* ``docs`` (DocVQA analogue, ANLS): invoices, receipts and forms rendered by Pillow.
* ``scenes`` (classification + segmentation probes): 2–5 non-overlapping shapes; the class label is
  the shape of the largest object and the mask is exact (drawn without anti-aliasing).

MoCa's ``documents`` (interleaved text and images) and ``passages`` (text only) are JSONL kinds
built from these generators by :mod:`cmpt.demo.synth_documents`, MoCa's contrastive ``retrieval``
pairs (hard negatives, held-out MMEB / ViDoRe-style evaluation) by :mod:`cmpt.demo.synth_retrieval`;
:func:`synth_main` dispatches to them.

``cmpt data synth --out DIR`` (:func:`synth_main` and the ``*_main`` entry points it dispatches to)
never overwrites data it did not generate: :func:`claim_output_dir` accepts a new or empty ``DIR``,
marks it with ``.cmpt-synth.json``, and later rewrites a marked ``DIR`` (or the demo's cache) freely
(reruns, more splits); a file or a non-empty unmarked directory is refused. The generator functions
themselves write where they are told (the demo builds its cache in fresh temporary directories,
:mod:`cmpt.demo.tiny_models`).
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cmpt.io_atomic import COMPLETE_MARKER, atomic_file

__all__ = [
    "KINDS",
    "MAX_SIDE",
    "SYNTH_MARKER",
    "TEST_SEED_OFFSET",
    "VAL_SEED_OFFSET",
    "SynthSample",
    "claim_output_dir",
    "generate",
    "generate_splits",
    "sample_image_size",
    "synth_main",
]

KINDS: tuple[str, ...] = ("charts", "docs", "scenes")
VAL_SEED_OFFSET = 500_009
TEST_SEED_OFFSET = 1_000_003
SYNTH_MARKER = ".cmpt-synth.json"
MIN_WIDTH, MIN_HEIGHT, MAX_SIDE = 160, 120, 640
MAX_ASPECT = 3.0  # width / height within [1 / MAX_ASPECT, MAX_ASPECT]

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Give a detailed description of the image.",
    "What does this image show? Describe it thoroughly.",
    "Write a dense caption for this image.",
)


@dataclass
class SynthSample:
    """One generated sample before it is written to disk.

    Attributes:
        image: the RGB image.
        caption: dense caption (the answer to the first, describing turn).
        qa: question/answer dicts ``{"q", "a", "type", ...}`` asked after the caption.
        meta: kind-specific fields (table, fields, shapes, ...); ``caption`` and ``qa`` are added.
        extra_images: additional images saved as ``<id>_<name>.png``; their relative path is stored
            in ``meta[name]`` (scenes use ``{"mask": ...}``).
    """

    image: Image.Image
    caption: str
    qa: list[dict[str, Any]]
    meta: dict[str, Any]
    extra_images: dict[str, Image.Image] = field(default_factory=dict)


def sample_image_size(
    rng: random.Random,
    *,
    min_width: int = MIN_WIDTH,
    min_height: int = MIN_HEIGHT,
    max_side: int = MAX_SIDE,
    max_aspect: float = MAX_ASPECT,
) -> tuple[int, int]:
    """Draw ``(width, height)`` with a log-uniform aspect ratio in ``[1/max_aspect, max_aspect]``.

    The long side is uniform between the smallest value compatible with the minimum width/height
    and ``max_side``, so widths span ``[min_width, max_side]`` and heights ``[min_height, max_side]``.
    """
    ratio = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))  # width / height
    if ratio >= 1.0:
        long_side = rng.uniform(max(min_width, min_height * ratio), max_side)
        width, height = long_side, long_side / ratio
    else:
        long_side = rng.uniform(max(min_height, min_width / ratio), max_side)
        width, height = long_side * ratio, long_side
    width = min(max(round(width), min_width), max_side)
    height = min(max(round(height), min_height), max_side)
    return width, height


def sample_rng(kind: str, seed: int, index: int) -> random.Random:
    """The private random stream of sample ``index`` (string seeds are hashed with SHA-512)."""
    return random.Random(f"cmpt-synth/{kind}/{seed}/{index}")


def _generator(kind: str) -> Callable[[random.Random], SynthSample]:
    """The sample function of ``kind`` (imported lazily: charts need matplotlib)."""
    if kind == "charts":
        from cmpt.demo.synth_charts import make_chart

        return make_chart
    if kind == "docs":
        from cmpt.demo.synth_docs import make_document

        return make_document
    if kind == "scenes":
        from cmpt.demo.synth_scenes import make_scene

        return make_scene
    raise ValueError(f"unknown synthetic data kind {kind!r}; expected one of {KINDS}")


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a PNG with no metadata chunks (byte-identical for identical pixels)."""
    clean = Image.frombytes(image.mode, image.size, image.tobytes())  # drop any ``info``
    with atomic_file(path) as tmp:
        clean.save(tmp, format="PNG", compress_level=6)


def claim_output_dir(out_dir: str | Path) -> Path:
    """Make ``out_dir`` an output of ``cmpt data synth`` before anything is written there; returns
    it. Accepted: a new or empty directory (then marked with :data:`SYNTH_MARKER`, the same bytes
    every time: outputs stay byte-identical per seed), one already marked, and a cmpt output (the
    demo's data cache carries ``.cmpt-complete.json``). Refused: a file, and any other non-empty
    directory (data synth did not write it: the user's)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: pass a directory for the generated data")
    if any((out / marker).is_file() for marker in (SYNTH_MARKER, COMPLETE_MARKER)):
        return out
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"--out {out} is a non-empty directory not written by `cmpt data synth` (no {SYNTH_MARKER}): "
            "not writing into it, its files could be overwritten; choose a new or empty directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    marker = {"writer": "cmpt data synth", "note": "generated data: synth may overwrite it"}
    with atomic_file(out / SYNTH_MARKER) as tmp:
        tmp.write_text(json.dumps(marker) + "\n")
    return out


def _conversations(rng: random.Random, sample: SynthSample) -> list[dict[str, str]]:
    """Caption turn (carrying the single ``<image>``) followed by the QA turns."""
    turns = [
        {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
        {"from": "gpt", "value": sample.caption},
    ]
    for qa in sample.qa:
        turns.append({"from": "human", "value": qa["q"]})
        turns.append({"from": "gpt", "value": qa["a"]})
    return turns


def generate(kind: str, n: int, out_dir: str | Path, *, seed: int = 0, split: str = "train") -> Path:
    """Generate ``n`` samples of ``kind`` into ``out_dir`` and return the path of ``<split>.json``.

    Args:
        kind: ``"charts"``, ``"docs"`` or ``"scenes"``.
        n: number of samples.
        out_dir: dataset root; images go to ``out_dir/images/<split>/``.
        seed: seed of the random stream (same seed → byte-identical files).
        split: split name, used for file names and ids only (not for the random stream).

    Returns:
        The path of the written LLaVA JSON list.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    make = _generator(kind)
    out = Path(out_dir)
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for i in range(n):
        rng = sample_rng(kind, seed, i)
        sample = make(rng)
        sample_id = f"{kind}-{split}-{i:06d}"
        rel = f"images/{split}/{sample_id}.png"
        save_png(sample.image, out / rel)
        meta: dict[str, Any] = {"kind": kind, "split": split, "seed": seed, "index": i}
        meta.update(sample.meta)
        meta["width"], meta["height"] = sample.image.size
        for name, extra in sample.extra_images.items():
            extra_rel = f"images/{split}/{sample_id}_{name}.png"
            save_png(extra, out / extra_rel)
            meta[name] = extra_rel
        meta["caption"] = sample.caption
        meta["qa"] = sample.qa
        records.append(
            {"id": sample_id, "image": rel, "conversations": _conversations(rng, sample), "meta": meta}
        )
    json_path = out / f"{split}.json"
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return json_path


def split_seed(seed: int, split: str) -> int:
    """Seed of a split's stream: ``train`` uses ``seed``; ``val`` and ``test`` are offset."""
    if split == "train":
        return seed
    if split == "val":
        return seed + VAL_SEED_OFFSET
    if split == "test":
        return seed + TEST_SEED_OFFSET
    return seed + 2_000_000 + zlib.crc32(split.encode("utf-8")) % 1_000_000


def generate_splits(
    kind: str, out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0
) -> dict[str, Path]:
    """Generate train/val/test splits with separate seed streams; returns ``{split: json_path}``."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {
        split: generate(kind, n, out_dir, seed=split_seed(seed, split), split=split)
        for split, n in sizes.items()
    }


def _parse_splits(splits: str, n: int) -> dict[str, int]:
    """``"train,val,test"`` or ``"train:200,test:50"`` → ``{split: count}``.

    Without an explicit count, ``train`` (or the only split listed) gets ``n`` and the others
    ``max(1, n // 4)``.
    """
    names = [s.strip() for s in splits.split(",") if s.strip()]
    if not names:
        raise ValueError("no split given")
    counts: dict[str, int] = {}
    for item in names:
        name, _, count = item.partition(":")
        name = name.strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"bad split name {name!r}")
        if count:
            counts[name] = int(count)
        elif name == "train" or len(names) == 1:
            counts[name] = n
        else:
            counts[name] = max(1, n // 4)
    return counts


def synth_main(kind: str, n: int, out: str | Path, seed: int = 0, splits: str = "train,val,test") -> dict:
    """Entry point of ``cmpt data synth``: generate the listed splits and return a summary. An
    ``out`` that is a file or a non-empty directory synth did not write is refused
    (:func:`claim_output_dir`).

    Returns a JSON-serialisable dict ``{"kind", "out", "seed", "seconds", "splits": {name:
    {"json": path, "n": count, "seed": stream_seed}}}``.
    """
    if kind == "moca":  # the MoCa CPT corpus: documents + passages + mixtures (docs/method.md §3)
        from cmpt.demo.moca_data import write_moca_corpus

        sizes = {k: (n, max(1, n // 5)) for k in ("documents", "passages")}
        claim_output_dir(out)
        start = time.perf_counter()
        info = write_moca_corpus(out, sizes, seed)
        return {
            "kind": kind,
            "out": str(out),
            "seed": seed,
            **info,
            "seconds": round(time.perf_counter() - start, 3),
        }
    if kind == "retrieval":  # MoCa stage 2 pairs with hard negatives + held-out eval (docs/method.md §3)
        from cmpt.demo.synth_retrieval import synth_retrieval_main

        return synth_retrieval_main(n, out, seed=seed)
    if kind in ("documents", "passages"):  # MoCa data (docs/method.md §3)
        from cmpt.demo.synth_documents import synth_documents_main

        return synth_documents_main(kind, n, out, seed=seed, splits=splits)
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic data kind {kind!r}; expected one of {KINDS}")
    counts = _parse_splits(splits, n)
    claim_output_dir(out)
    start = time.perf_counter()
    summary: dict[str, Any] = {"kind": kind, "out": str(out), "seed": seed, "splits": {}}
    for split, count in counts.items():
        stream = split_seed(seed, split)
        path = generate(kind, count, out, seed=stream, split=split)
        summary["splits"][split] = {"json": str(path), "n": count, "seed": stream}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
