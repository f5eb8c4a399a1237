"""Caller-owned PIL images prepared in threads (docs/method.md §7 "Inference inputs prepared ahead"):
``load_image`` holds a lock while it reads a caller's PIL image (PIL decodes a lazily opened file in
place, not thread-safely). With one lock for all such images, distinct images given as
``[Image.open(p) for p in paths]`` were decoded one at a time; with a lock per image they are
decoded in parallel.

Measured: decode + resize (to at most ``--max-pixels``) + patchify
(:meth:`~cmpt.vision.processor.ImageProcessor.preprocess`) of 64 JPEGs through
:func:`cmpt.prefetch.ordered_map` with ``workers`` 0 and 2, given as paths and as lazily opened PIL
images (opened inside the timed run), no model; and the share of that time spent decoding (the
part one lock for all images serialises: it bounds the speedup at 1/share whatever the number of
workers). ``--before DIR`` measures an older checkout of cmpt (its ``src/``, e.g.
``mkdir DIR && git archive REV | tar -x -C DIR``) the same way; each checkout runs in its own child
process, the two alternating for every repeat.
Prints a table; the last line is one JSON object of the figures.
Run: ``python benchmarks/bench_caller_images.py [--before DIR] [--repeats 3] [--images 64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_PIXELS = 224 * 224
VARIANTS = ("paths, workers=0", "paths, workers=2", "opened, workers=0", "opened, workers=2")


def child(image_dir: Path, max_pixels: int) -> dict[str, float]:
    """In a child process whose ``PYTHONPATH`` names one checkout: wall seconds of each variant once."""
    from PIL import Image

    from cmpt.prefetch import ordered_map
    from cmpt.vision.processor import ImageProcessor

    processor = ImageProcessor(14, 2, min_pixels=28 * 28, max_pixels=max_pixels)
    paths = sorted(image_dir.glob("*.jpg"))

    def run(opened: bool, workers: int) -> float:
        t0 = time.perf_counter()
        items = [Image.open(p) for p in paths] if opened else paths
        sum(len(x) for x, _ in ordered_map(processor.preprocess, items, workers=workers))
        return time.perf_counter() - t0

    run(True, 2)  # warm-up
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.load()
    decode = time.perf_counter() - t0
    times = {name: run(name.startswith("opened"), int(name[-1])) for name in VARIANTS}
    return {**times, "decode share": decode / times["opened, workers=0"]}


def in_child(src: Path, image_dir: Path, max_pixels: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(image_dir)]
    cmd += ["--max-pixels", str(max_pixels)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring with {src} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="an older checkout of cmpt to measure too")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="the processor's cap (224*224)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.max_pixels)))
        return {}
    checkouts = {"now": HERE.parent / "src"}
    if args.before:
        if not (args.before / "src" / "cmpt" / "prefetch.py").is_file():
            raise SystemExit(f"--before {args.before}: not a cmpt checkout with src/cmpt/prefetch.py")
        checkouts = {"before": args.before.resolve() / "src", **checkouts}
    sys.path.insert(0, str(HERE))
    from bench_prefetch import make_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp), args.images)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
        for _ in range(args.repeats):
            for name, src in checkouts.items():
                runs[name].append(in_child(src, Path(tmp), args.max_pixels))
    med = {c: {v: statistics.median(r[v] for r in runs[c]) for v in VARIANTS} for c in checkouts}
    print(
        f"{args.images} JPEGs 640x480-1280x960, max_pixels {args.max_pixels}, median of {args.repeats}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'variant':<20}" + "".join(f"{c + ' (s)':>14}" for c in checkouts))
    for v in VARIANTS:
        print(f"{v:<20}" + "".join(f"{med[c][v]:>14.3f}" for c in checkouts))
    figures: dict = {"bench": "caller_images"}
    for c in checkouts:
        for given in ("opened", "paths"):
            figures[f"{given}_speedup_w2_{c}"] = round(
                med[c][f"{given}, workers=0"] / med[c][f"{given}, workers=2"], 3
            )
    share = statistics.median(r["decode share"] for r in runs["now"])
    print(f"decoding: {share:.0%} of the preparation in turn (one lock for all: at most {1 / share:.1f}x)")
    figures["decode_share"] = round(share, 3)
    if args.before:
        figures["opened_w2_before_over_now"] = round(
            med["before"]["opened, workers=2"] / med["now"]["opened, workers=2"], 3
        )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
