"""Start-up: the length index of a large image dataset, before and after (docs/method.md §4).

Writes ``--n`` (default 20,000) small PNG / JPEG files of varied sizes (48 distinct encoded images,
16–1024 px a side, copied: the cost measured is the header read, not the pixels) and a LLaVA JSON
once, then times, in one run and interleaved, best of ``--repeats``:

  before     the length index as built until now: one process, every record's image headers in
             turn, its texts through ``tokenizer(...)`` in chunks of 1,024 (a copy of that code);
             the cache lived in ``run.dir``, so every stage and every new run paid this
  serial     the new build with one worker (the fast tokenizer's backend, header sizes only)
  threads    the new build, ``--workers`` threads
  processes  the new build, ``--workers`` forked processes (the default backend)
  cached     a cache hit: the file read, one ``stat`` per image, lengths derived
  stage II   a cache hit at another resolution (what the next stage gets)

Every variant must give the same lengths as ``before``. CPU seconds include the workers'. The host
is shared: wall times vary with its load, CPU seconds much less. Prints a table; the last line is
one JSON object of figures and ratios.
Run: ``python benchmarks/bench_startup.py [--n 20000] [--workers 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from cmpt.data.length_index import LengthIndex, default_workers
from cmpt.data.llava_source import LlavaSource
from cmpt.data.pipeline import template_overhead, text_estimate, turn_texts, usable_structure, vision_tokens
from cmpt.data.sources import BadSample
from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
from cmpt.vision.processor import ImageProcessor
from cmpt.vlm.chat import ensure_vision_tokens


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """``root/data.json`` with ``n`` one-image records and ``root/img/*.{png,jpg}``."""
    rng = random.Random(seed)
    blobs = []
    for k in range(48):
        w, h = rng.randint(16, 1024), rng.randint(16, 1024)
        fmt, ext = ("PNG", "png") if k % 2 else ("JPEG", "jpg")
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (k * 5 % 256, 80, 160)).save(buf, fmt)
        blobs.append((buf.getvalue(), ext))
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        data, ext = blobs[i % len(blobs)]
        rel = f"img/{i:06d}.{ext}"
        (root / rel).write_bytes(data)
        q = "<image>\nDescribe the chart in detail." if i % 3 else "<image>\nWhat is the largest bar?"
        a = f"A bar chart with {i % 9 + 2} bars; the largest one is {('blue', 'red', 'green')[i % 3]}."
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rows.append({"id": f"r{i}", "image": rel, "conversations": conv})
    path = root / "data.json"
    path.write_text(json.dumps(rows))
    return path


def before(source: Any, processor: Any, tokenizer: Any, chunk: int = 1024) -> list[tuple[int, int]]:
    """The serial build as it was (the code of ``LengthIndex.build`` before this change, no cache)."""
    base, per_turn = template_overhead(tokenizer)
    lengths: list[tuple[int, int]] = []
    for start in range(0, len(source), chunk):
        recs = []
        for i in range(start, min(start + chunk, len(source))):
            try:
                rec = source[i]
            except BadSample:
                rec = None
            recs.append(rec if usable_structure(rec) else None)
        live = [r for r in recs if r is not None]
        vision = [vision_tokens(r, processor) for r in live]
        texts = [x for r in live for x in turn_texts(r)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        pos, it = 0, iter(zip(live, vision))
        for r in recs:
            if r is None:
                lengths.append((0, 0))
                continue
            rec, v = next(it)
            nt = 1 if rec.is_document else len(rec.conversations)
            content = sum(len(x) for x in ids[pos : pos + nt])
            pos += nt
            lengths.append((0, 0) if v is None else (v, text_estimate(rec, content, v, (base, per_turn))))
    return lengths


def cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tokenizer = train_tokenizer(default_corpus(300), vocab_size=400)
    ensure_vision_tokens(tokenizer)
    stage1 = ImageProcessor(patch_size=14, merge_size=2, policy="fixed", fixed_size=384)
    stage2 = ImageProcessor(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 3000)
    w = args.workers
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = make_dataset(Path(tmp) / "data", args.n)
        made = time.perf_counter() - t
        cache = Path(tmp) / "cache"

        source = LlavaSource(data)  # opened once: the index alone is timed

        def new(backend: str, workers: int, proc: Any = stage1, cache_dir: Any = None) -> list:
            return LengthIndex.build(
                source, proc, tokenizer, workers=workers, backend=backend, cache_dir=cache_dir
            ).lengths

        variants = {
            "before": lambda: before(source, stage1, tokenizer),
            "serial": lambda: new("serial", 1),
            "threads": lambda: new("thread", w),
            "processes": lambda: new("process", w),
            "cached": lambda: new("process", w, cache_dir=cache),
            "stage II": lambda: new("process", w, stage2, cache_dir=cache),
        }
        new("process", w, cache_dir=cache)  # the file the cache hits read
        ref = before(source, stage1, tokenizer)
        ref2 = new("serial", 1, stage2)
        best = {k: (math.inf, math.inf) for k in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                c, t = cpu_s(), time.perf_counter()
                out = fn()
                wall, cpu = time.perf_counter() - t, cpu_s() - c
                assert out == (ref2 if name == "stage II" else ref), f"{name}: other lengths than before"
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    print(f"length index of {args.n} images ({args.n} records), {w} workers, best of {args.repeats}")
    print(f"(dataset written in {made:.1f} s; every variant gave the serial build's lengths)")
    print(f"{'variant':<11}{'wall s':>9}{'CPU s':>9}{'vs before':>11}")
    b_wall = best["before"][0]
    for name, (wall, cpu) in best.items():
        print(f"{name:<11}{wall:>9.3f}{cpu:>9.2f}{b_wall / wall:>10.1f}×")
    res = {k: {"wall_s": round(v[0], 3), "cpu_s": round(v[1], 2)} for k, v in best.items()}
    ratios = {
        "before_over_processes": round(b_wall / best["processes"][0], 2),
        "before_over_cached": round(b_wall / best["cached"][0], 1),
        "serial_over_processes": round(best["serial"][0] / best["processes"][0], 2),
        "threads_over_processes": round(best["threads"][0] / best["processes"][0], 2),
        "before_over_serial": round(b_wall / best["serial"][0], 2),
    }
    print(json.dumps({"bench": "startup", "n": args.n, "workers": w, "results": res, "ratios": ratios}))


if __name__ == "__main__":
    main()
