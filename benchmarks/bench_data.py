"""Data loading throughput per source format (docs/method.md §4): LLaVA JSON + image files, tar shards,
a Hugging Face dataset saved to disk and parquet.

Generates ``--n`` synthetic samples (``scenes`` or ``charts``) once, converts them with
:mod:`cmpt.data.convert`, then for each format builds the loader with :func:`build_loader` (same
processor, tokenizer, budgets; ``--workers`` DataLoader workers) and times

  setup    ``build_loader``: opening the source and, for map-style sources, the length index
           (image headers + tokenization of every record; no cache)
  epoch    iterating micro-batches until ``--n`` samples were yielded, worker start-up included
  read     records/s of reading the source alone in one process (image bytes read, not decoded)

Best of ``--repeats`` runs, formats interleaved per run (a shared host disturbs them alike).
Prints a table; the last line is one JSON object.
Run: ``python benchmarks/bench_data.py [--n 200] [--workers 2] [--repeats 3] [--kind scenes]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

from cmpt.data.config import DataConfig
from cmpt.data.convert import llava_to_hf, llava_to_wds
from cmpt.data.loader import build_loader
from cmpt.data.open import open_source
from cmpt.demo.synthetic import generate
from cmpt.demo.tiny_lm import default_corpus, train_tokenizer
from cmpt.vision.processor import ImageProcessor
from cmpt.vlm.chat import ensure_vision_tokens


def make_forms(root: Path, kind: str, n: int) -> dict[str, str]:
    """The same ``n`` samples as JSON + PNG files, tar shards, HF on disk and parquet."""
    js = generate(kind, n, root, seed=0)
    wds = llava_to_wds(js, root / "wds", samples_per_shard=max(1, n // 8))
    disk = llava_to_hf(js, root / "hf_disk", format="disk")
    pq = llava_to_hf(js, root / "hf_parquet", format="parquet")
    return {"json": str(js), "tar": wds["pattern"], "hf_disk": disk["path"], "parquet": pq["path"]}


def run_once(path: str, processor, tokenizer, n: int, workers: int) -> tuple[float, float, int]:
    """``(setup seconds, epoch seconds, samples)`` of one fresh loader."""
    cfg = DataConfig(
        path=path, vision_budget=2048, text_budget=16384, max_samples_per_batch=16, max_text_tokens=4096,
        num_workers=workers, shuffle_buffer=64,
    )  # fmt: skip
    t0 = time.perf_counter()
    loader = build_loader(cfg, processor, tokenizer)
    t1 = time.perf_counter()
    seen = 0
    it = iter(loader)
    while seen < n:
        seen += next(it)["num_samples"]
    t2 = time.perf_counter()
    assert loader.bad_seen == 0, f"{path}: {loader.bad_seen} bad samples in synthetic data"
    del it, loader
    return t1 - t0, t2 - t1, seen


def read_rate(path: str) -> float:
    """Records/s of reading the source alone, one process: records with their image bytes or paths,
    no decoding (what the format itself costs)."""
    t = time.perf_counter()
    src = open_source(path)
    if hasattr(src, "__getitem__"):
        recs = [src[i] for i in range(len(src))]
        for r in recs:  # JSON: read the image files too, as the other formats hold the bytes
            for i in range(len(r.images)):
                s = r.image_source(i)
                if isinstance(s, str):
                    with open(s, "rb") as fh:
                        fh.read()
    else:
        recs = list(src.iter_records())
    return len(recs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kind", default="scenes", choices=["scenes", "charts", "docs"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tokenizer = train_tokenizer(default_corpus(300), vocab_size=400)
    ensure_vision_tokens(tokenizer)
    processor = ImageProcessor(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        forms = make_forms(Path(tmp), args.kind, args.n)
        prep = time.perf_counter() - t
        best = {k: (math.inf, math.inf, 0) for k in forms}
        reads = {k: max(read_rate(p) for _ in range(args.repeats)) for k, p in forms.items()}
        for _ in range(args.repeats):
            for name, path in forms.items():
                setup, epoch, seen = run_once(path, processor, tokenizer, args.n, args.workers)
                old = best[name]
                best[name] = (min(old[0], setup), min(old[1], epoch), seen if epoch < old[1] else old[2])
    head = f"{args.n} {args.kind} samples, {args.workers} workers, best of {args.repeats}"
    print(f"{head} (data made and converted in {prep:.1f} s)")
    print(f"{'format':<10}{'setup s':>9}{'epoch s':>9}{'samples/s':>11}{'read rec/s':>12}")
    results = {}
    for name, (setup, epoch, seen) in best.items():
        rate = seen / epoch
        results[name] = {
            "setup_s": round(setup, 3),
            "epoch_s": round(epoch, 3),
            "samples_per_s": round(rate, 1),
            "read_records_per_s": round(reads[name], 1),
        }
        print(f"{name:<10}{setup:>9.2f}{epoch:>9.2f}{rate:>11.1f}{reads[name]:>12.0f}")
    summary = {"bench": "data", "n": args.n, "kind": args.kind, "workers": args.workers}
    print(json.dumps({**summary, "results": results}))


if __name__ == "__main__":
    main()
