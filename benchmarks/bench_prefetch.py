"""Inference inputs prepared ahead in threads (docs/method.md §7 "Inference inputs prepared ahead"):
what :func:`cmpt.prefetch.ordered_map` changes for ``cmpt encode`` and ``Embedder.encode``.

0. The preparation alone: :meth:`~cmpt.vision.processor.ImageProcessor.preprocess` of each JPEG
   through :func:`cmpt.prefetch.ordered_map` with ``workers`` 0, 1, 2 and 4, no model: whether
   decoding and patchifying scale over threads on this host (they release the GIL).
   The same for ``cmpt eval embed``'s data check (:func:`cmpt.eval.embed_data.load_embed_data`
   decodes every image of an MMEB task once): decoded in turn (before) vs by threads (now).
1. ``cmpt encode`` (:func:`cmpt.encode.encode_images`) over JPEGs of 640x480 to 1280x960 written
   offline (smooth colour blobs plus noise, so decoding is real work), with ``workers`` 0, 2 and 4.
2. ``Embedder.encode`` over inputs of a short text and one JPEG path each: *before* is the old
   behaviour (``workers=0`` and ``RENDER_WINDOW`` = every input: all images preprocessed serially
   before the first forward), *now* the shipped window (:data:`cmpt.embed.embedder.RENDER_WINDOW`)
   with ``workers=2``. Besides wall time: the peak bytes of preprocessed patches held at once
   (made by ``Embedder._images``, minus those ``Embedder._forward`` has embedded; *before* holds
   all of them, *now* at most about two windows) and, in a child process per variant, the peak
   resident memory above the level before the call.

The models are tiny random ones (a NativeViT; a VLM from :mod:`cmpt.demo.tiny_lm`) run with one
torch thread and small ``max_pixels``, so that, as on a GPU, image decoding and resizing dominate
the host's time. Wall times are medians of interleaved repeats; on a small shared machine they are
noisy, and on a 2-core host the preparation threads compete with the forward and each other.
Prints a table; the last line is one JSON object of the figures.
Run: ``python benchmarks/bench_prefetch.py [--quick] [--repeats 3] [--inputs 600]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import cmpt.embed.embedder as embedder
from cmpt.demo.tiny_lm import build_tiny_causal_lm, default_corpus, train_tokenizer
from cmpt.embed.embedder import Embedder
from cmpt.encode import encode_images
from cmpt.prefetch import ordered_map
from cmpt.vision.processor import ImageProcessor
from cmpt.vision.vit import NativeViT, NativeViTConfig
from cmpt.vlm.model import VisionLanguageModel

ENCODE_MAX_PIXELS = 224 * 224  # 256 patches an image: the tiny ViT's forward stays cheap
EMBED_MAX_PIXELS = 112 * 112  # 16 merged tokens an image
ENCODE_WORKERS = (0, 2, 4)
PREPARE_WORKERS = (0, 1, 2, 4)
#: per variant, wall seconds of each run and CPU seconds (all threads) per wall second of each run
Timings = tuple[dict[str, list[float]], dict[str, list[float]]]


def make_jpegs(root: Path, n: int, seed: int = 0, small: bool = False) -> list[Path]:
    """``n`` JPEGs (quality 90) of random sizes between 640x480 and 1280x960 (``small``: half
    that): upscaled random colour blobs plus pixel noise, about 300 KB a megapixel."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    scale = 2 if small else 1
    paths = []
    for i in range(n):
        w, h = int(rng.integers(640, 1281)) // scale, int(rng.integers(480, 961)) // scale
        blobs = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(blobs).resize((w, h), Image.Resampling.BILINEAR), np.int16)
        noisy = np.clip(base + rng.integers(-24, 25, (h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
        paths.append(root / f"img{i:04d}.jpg")
        Image.fromarray(noisy).save(paths[-1], quality=90)
    return paths


def tiny_vit(seed: int = 0) -> NativeViT:
    """A random NativeViT of two 32-wide layers (patch 14, merge 2)."""
    torch.manual_seed(seed)
    cfg = NativeViTConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, pos_grid=4)
    return NativeViT(cfg).eval()


def tiny_embedder() -> Embedder:
    """An Embedder over a tiny random VLM: :func:`tiny_vit` and a 64-wide, 2-layer Qwen2."""
    tok = train_tokenizer(default_corpus(300), vocab_size=400)
    processor = ImageProcessor(14, 2, min_pixels=28 * 28, max_pixels=EMBED_MAX_PIXELS)
    vlm = VisionLanguageModel.build(tiny_vit(), build_tiny_causal_lm(tok, "qwen2"), tok, processor=processor)
    return Embedder(vlm)


def embed_inputs(paths: list[Path], n: int) -> tuple[list[str], list[Path]]:
    """``n`` inputs: a short caption and one of ``paths`` (in turn) each."""
    return [f"photo {i}: the chart on page {i % 7}" for i in range(n)], [
        paths[i % len(paths)] for i in range(n)
    ]


@contextlib.contextmanager
def render_window(size: int) -> Iterator[None]:
    """``Embedder.encode`` renders and packs ``size`` inputs at a time inside the block."""
    saved, embedder.RENDER_WINDOW = embedder.RENDER_WINDOW, size
    try:
        yield
    finally:
        embedder.RENDER_WINDOW = saved


class PatchLedger:
    """Bytes of preprocessed patches that an Embedder holds: made by ``_images`` minus embedded by
    ``_forward`` (wrapped on the instance); ``peak`` is the most at once since :meth:`reset`."""

    def __init__(self, emb: Embedder) -> None:
        self.lock, self.held, self.peak = threading.Lock(), 0, 0
        images, forward = emb._images, emb._forward

        def counted_images(items: list[Any]) -> Any:
            packed = images(items)
            with self.lock:
                self.held += 0 if packed is None else packed.patches.nbytes
                self.peak = max(self.peak, self.held)
            return packed

        def counted_forward(items: list[tuple]) -> torch.Tensor:
            out = forward(items)
            with self.lock:
                self.held -= sum(x[1].patches.nbytes for x in items if x[1] is not None)
            return out

        emb._images, emb._forward = counted_images, counted_forward

    def reset(self) -> None:
        self.held = self.peak = 0


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int) -> Timings:
    """Wall seconds of each variant, ``repeats`` rounds of all variants in turn; and the CPU seconds
    of this process (all its threads) per wall second in each run: above 1, work ran in parallel."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append((time.process_time() - c0) / wall[name][-1])
    return wall, cpu


def embed_variants(n: int, window: int) -> dict[str, tuple[int, int]]:
    """``{name: (workers, render window)}``: the old behaviour and the shipped one."""
    return {"before": (0, n), "now": (2, window)}


def child_rss(variant: str, image_dir: Path, n: int, window: int) -> int:
    """In this process (run as a child): build the Embedder, warm it up, then the peak resident
    bytes above the level before one ``encode`` of ``n`` inputs in ``variant``."""
    from bench_common import current_rss, peak_rss_during

    emb = tiny_embedder()
    texts, images = embed_inputs(sorted(image_dir.glob("*.jpg")), n)
    workers, size = embed_variants(n, window)[variant]
    emb.encode(texts[:8], images[:8], workers=workers, progress=False)  # warm-up
    with render_window(size):
        base = current_rss()
        return peak_rss_during(lambda: emb.encode(texts, images, workers=workers, progress=False)) - base


def peak_rss_in_child(variant: str, image_dir: Path, n: int, window: int, threads: int) -> int:
    """:func:`child_rss` in a fresh Python process (so one variant's heap does not inflate the other's)."""
    args = [sys.executable, __file__, "--child-rss", variant, "--image-dir", str(image_dir)]
    args += ["--inputs", str(n), "--window", str(window), "--torch-threads", str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def bench_prepare(paths: list[Path], repeats: int) -> Timings:
    """Every JPEG decoded, resized and patchified through :func:`~cmpt.prefetch.ordered_map` with
    each of :data:`PREPARE_WORKERS`, no model (the processor of ``cmpt encode``'s section)."""
    processor = ImageProcessor.for_vit(tiny_vit(), max_pixels=ENCODE_MAX_PIXELS)

    def prepare(workers: int) -> Callable[[], Any]:
        return lambda: sum(len(x) for x, _ in ordered_map(processor.preprocess, paths, workers=workers))

    prepare(0)()
    return interleaved({f"workers={w}": prepare(w) for w in PREPARE_WORKERS}, repeats)


def bench_embed_data(paths: list[Path], root: Path, repeats: int) -> Timings:
    """``load_embed_data`` of one MMEB task whose queries are ``paths`` (images relative to ``root``),
    each image decoded in turn (the old single pass) vs by :func:`~cmpt.prefetch.ordered_map`."""
    import cmpt.eval.embed_data as embed_data

    rows = [
        {"qry_img_path": str(q.relative_to(root)), "tgt_text": [f"caption {i}", "other"]}
        for i, q in enumerate(paths)
    ]
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    threaded = embed_data.ordered_map

    def load(in_turn: bool) -> Callable[[], Any]:
        def run() -> Any:
            embed_data.ordered_map = (lambda fn, items, **kw: map(fn, items)) if in_turn else threaded
            try:
                return embed_data.load_embed_data(task)
            finally:
                embed_data.ordered_map = threaded

        return run

    load(False)()
    return interleaved({"in turn": load(True), "threads": load(False)}, repeats)


def bench_encode(paths: list[Path], out: Path, repeats: int) -> Timings:
    """``cmpt encode``'s :func:`~cmpt.encode.encode_images` over ``paths`` with each of
    :data:`ENCODE_WORKERS`, after a warm-up on four images."""
    vit = tiny_vit()
    processor = ImageProcessor.for_vit(vit, max_pixels=ENCODE_MAX_PIXELS)

    def encode(workers: int, images: list[Path] = paths) -> Callable[[], Any]:
        kw = dict(device="cpu", precision="fp32", progress=False, workers=workers)
        return lambda: encode_images(vit, processor, images, out, **kw)

    for w in ENCODE_WORKERS:
        encode(w, paths[:4])()
    return interleaved({f"workers={w}": encode(w) for w in ENCODE_WORKERS}, repeats)


def bench_embed(paths: list[Path], n: int, window: int, repeats: int) -> tuple[Timings, dict[str, int]]:
    """``Embedder.encode`` of ``n`` inputs in each of :func:`embed_variants`, after a warm-up on
    eight; also each variant's peak bytes of preprocessed patches (:class:`PatchLedger`)."""
    emb = tiny_embedder()
    texts, images = embed_inputs(paths, n)
    emb.encode(texts[:8], images[:8], workers=2, progress=False)
    ledger, peaks = PatchLedger(emb), {}

    def embed(name: str, workers: int, size: int) -> Callable[[], None]:
        def run() -> None:
            ledger.reset()
            with render_window(size):
                emb.encode(texts, images, workers=workers, progress=False)
            peaks[name] = max(peaks.get(name, 0), ledger.peak)

        return run

    variants = embed_variants(n, window)
    return interleaved({name: embed(name, *v) for name, v in variants.items()}, repeats), peaks


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def print_table(title: str, timings: Timings, base: str, extra: dict[str, dict[str, str]]) -> None:
    """One row a variant: median wall seconds, speedup over ``base``, median CPU/wall, the
    ``extra`` columns (``{column: {variant: text}}``) and every run's seconds."""
    wall, cpu = timings
    med = {name: statistics.median(runs) for name, runs in wall.items()}
    width = max(len(name) for name in wall) + 2
    print(title)
    head = f"  {'variant':<{width}}{'median s':>9} {'speedup':>8} {'cpu/wall':>9}"
    print(head + "".join(f" {col:>13}" for col in extra) + "  runs (s)")
    for name, runs in wall.items():
        row = f"  {name:<{width}}{med[name]:>9.3f} {med[base] / med[name]:>7.2f}x"
        row += f" {statistics.median(cpu[name]):>9.2f}"
        row += "".join(f" {col[name]:>13}" for col in extra.values())
        print(row + "  " + " ".join(f"{t:.3f}" for t in runs))


def speedup(wall: dict[str, list[float]], base: str, name: str) -> float:
    return round(statistics.median(wall[base]) / statistics.median(wall[name]), 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table and the JSON line; returns the JSON's figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few small images, one repeat, no RSS")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--images", type=int, default=None, help="JPEGs written (default 64; --quick 8)")
    ap.add_argument("--inputs", type=int, default=None, help="Embedder inputs (default 600; --quick 40)")
    ap.add_argument("--window", type=int, default=None, help="window of 'now' (default: shipped; --quick 8)")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the forward (1)")
    ap.add_argument(
        "--rss", action=argparse.BooleanOptionalAction, default=None, help="peak RSS (default: not --quick)"
    )
    ap.add_argument("--child-rss", choices=["before", "now"], help=argparse.SUPPRESS)
    ap.add_argument("--image-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.child_rss:
        print(child_rss(args.child_rss, args.image_dir, args.inputs, args.window))
        return {}
    q = args.quick
    repeats = args.repeats or (1 if q else 3)
    n_images, n = args.images or (8 if q else 64), args.inputs or (40 if q else 600)
    window = args.window or (8 if q else embedder.RENDER_WINDOW)
    rss = not q if args.rss is None else args.rss
    with tempfile.TemporaryDirectory(prefix="bench_prefetch_") as tmp:
        paths = make_jpegs(Path(tmp) / "images", n_images, small=q)
        prep = bench_prepare(paths, repeats)
        check = bench_embed_data(paths, Path(tmp), repeats)
        enc = bench_encode(paths, Path(tmp) / "features.safetensors", repeats)
        emb, peaks = bench_embed(paths, n, window, repeats)
        variants = embed_variants(n, window)
        threads = args.torch_threads
        rss_peak = (
            {v: peak_rss_in_child(v, paths[0].parent, n, window, threads) for v in variants} if rss else {}
        )

    print_table(
        f"preparation only (no model): {n_images} JPEGs decoded, resized, patchified; median of {repeats}",
        prep,
        "workers=0",
        {},
    )
    print_table(
        f"cmpt eval embed data check: {n_images} query images decoded once each; median of {repeats}",
        check,
        "in turn",
        {},
    )
    print_table(
        f"cmpt encode: {n_images} JPEGs, max_pixels {ENCODE_MAX_PIXELS}, torch threads {threads}, "
        f"median of {repeats} interleaved runs",
        enc,
        "workers=0",
        {},
    )
    labels = {name: f"{name} (workers={w}, window {size})" for name, (w, size) in variants.items()}
    rows = tuple({labels[k]: v for k, v in d.items()} for d in emb)
    extra = {"peak patches": {labels[k]: mb(v) for k, v in peaks.items()}}
    extra["peak RSS +"] = {labels[k]: mb(rss_peak[k]) if rss else "-" for k in variants}
    print_table(
        f"Embedder.encode: {n} inputs (a text and one JPEG path each), max_pixels {EMBED_MAX_PIXELS}",
        rows,
        labels["before"],
        extra,
    )
    figures: dict[str, Any] = {"bench": "prefetch"}
    figures["embed_data_check_speedup"] = speedup(check[0], "in turn", "threads")
    figures.update(
        {f"prepare_speedup_w{w}": speedup(prep[0], "workers=0", f"workers={w}") for w in PREPARE_WORKERS[1:]}
    )
    figures.update(
        {f"encode_speedup_w{w}": speedup(enc[0], "workers=0", f"workers={w}") for w in ENCODE_WORKERS[1:]}
    )
    figures.update(
        embed_speedup=speedup(emb[0], "before", "now"),
        embed_peak_bytes_before=peaks["before"],
        embed_peak_bytes_now=peaks["now"],
        embed_peak_bytes_ratio=round(peaks["now"] / peaks["before"], 3),
    )
    if rss:
        figures["embed_peak_rss_ratio"] = round(rss_peak["now"] / max(rss_peak["before"], 1), 3)
    figures.update(
        images=n_images, inputs=n, window=window, repeats=repeats, cpus=len(os.sched_getaffinity(0))
    )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
