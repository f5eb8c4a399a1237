"""Inputs prepared ahead in threads (docs/method.md §7 "Inference inputs prepared ahead"):
:func:`cmpt.prefetch.ordered_map` keeps the input order, stays within its window, raises a
worker's error at its item's turn and leaves no thread behind; ``cmpt encode``, the probe features
and ``Embedder.encode`` give the same outputs with and without workers, and ``Embedder.encode``
holds a bounded window of preprocessed inputs."""

from __future__ import annotations

import functools
import random
import threading
import time
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hf_tiny
from cmpt.cli import main
from cmpt.prefetch import MAX_DEFAULT_WORKERS, check_workers, default_workers, ordered_map
from cmpt.vision.image_io import ImageLoadError
from vlm_fixtures import build_dirs, build_vlm


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cmpt-prefetch")]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_come_in_input_order(workers):
    rng = random.Random(0)
    delays = [rng.random() * 0.004 for _ in range(40)]

    def slow_square(i: int) -> int:
        time.sleep(delays[i])  # later items often finish first
        return i * i

    assert list(ordered_map(slow_square, range(40), workers=workers, ahead=7)) == [i * i for i in range(40)]
    assert not _prefetch_threads()


def test_work_stays_within_the_window_and_items_are_read_lazily():
    started: list[int] = []
    read: list[int] = []

    def items():
        for i in range(100):
            read.append(i)
            yield i

    def fn(i: int) -> int:
        started.append(i)
        return i

    it = ordered_map(fn, items(), workers=2, ahead=5)
    for taken in range(10):
        assert next(it) == taken
        time.sleep(0.01)  # let the threads run as far as they may
        assert max(started) <= taken + 5 and max(read) <= taken + 5  # the next 5 at most, no more
    it.close()
    time.sleep(0.01)
    assert max(read) <= 14 and len(started) <= 15  # nothing was started after the close
    assert not _prefetch_threads()


def test_workers_zero_runs_lazily_in_the_callers_thread():
    seen = []
    it = ordered_map(lambda i: seen.append(threading.current_thread()) or i, range(5), workers=0)
    assert seen == []  # nothing before the first result is asked for
    assert next(it) == 0 and seen == [threading.current_thread()]


def test_a_workers_error_comes_at_its_turn_and_stops_the_iterator():
    def fn(i: int) -> int:
        if i == 6:
            raise KeyError(f"item {i} is bad")
        return i

    it = ordered_map(fn, range(20), workers=3, ahead=4)
    assert [next(it) for _ in range(6)] == list(range(6))
    with pytest.raises(KeyError, match="item 6 is bad"):  # the worker's own exception type
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert not _prefetch_threads()


def test_worker_counts_are_checked():
    assert 1 <= default_workers() <= MAX_DEFAULT_WORKERS and check_workers(None) == default_workers()
    assert check_workers(0) == 0 and check_workers(3) == 3
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"workers must be an integer >= 0"):
            check_workers(bad)
    with pytest.raises(ValueError, match="ahead must be >= 1"):
        list(ordered_map(abs, [1], workers=1, ahead=0))


# ---------------------------------------------------------------- the inference entry points


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, (w, h) in enumerate([(120, 80), (64, 200), (150, 150), (90, 40), (60, 60), (200, 70), (33, 99)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(root / "imgs" / f"im{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(paths[-1])
    return root, paths


def test_cmpt_encode_output_does_not_depend_on_workers_and_bad_images_still_skip(images, tmp_path, capsys):
    root, paths = images
    ckpt = hf_tiny.save("dinov2", root)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then zeros: the header pass fails
    inputs = [str(p) for p in paths[:3]] + [str(bad)] + [str(p) for p in paths[3:]]
    outs = {}
    for workers in ("0", "3"):
        outs[workers] = tmp_path / f"w{workers}.safetensors"
        args = ["encode", "--model", str(ckpt), *inputs, "--out", str(outs[workers]), "--quiet"]
        assert main([*args, "--token-budget", "60", "--workers", workers, "--skip-bad"]) == 0
        assert main([*args, "--workers", workers]) == 2  # without --skip-bad: named, no traceback
        err = capsys.readouterr().err
        assert "broken.png" in err and "Traceback" not in err
    a, b = load_file(outs["0"]), load_file(outs["3"])
    assert a.keys() == b.keys() and a["grid_hw"].shape == (len(paths), 2)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(SystemExit):
        main(["encode", "--model", str(ckpt), str(paths[0]), "--out", str(tmp_path / "x"), "--workers", "-1"])
    assert "--workers: expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_probe_feature_batches_do_not_depend_on_workers(images):
    from cmpt.eval.features import _packed_batches
    from cmpt.vision.processor import ImageProcessor

    _, paths = images
    proc = ImageProcessor(14, 2, max_pixels=112 * 112)
    inputs = [*paths, Image.open(paths[0]).convert("RGB")]  # a path or an image in memory
    serial = list(_packed_batches(inputs, proc, 64, workers=0))
    threaded = list(_packed_batches(inputs, proc, 64, workers=3))
    assert len(serial) == len(threaded) > 2
    for (i0, p0, g0), (i1, p1, g1) in zip(serial, threaded):
        assert i0 == i1 and g0 == g1 and torch.equal(p0, p1)
    assert [i for idx, _, _ in serial for i in idx] == list(range(len(inputs)))


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    from cmpt.embed.embedder import Embedder

    return Embedder(build_vlm(build_dirs(tmp_path_factory.mktemp("emb")), "qwen2"), batch_tokens=96)


def _inputs(n: int) -> tuple[list, list]:
    rng = random.Random(1)
    texts = [None if i % 5 == 1 and i % 3 else "word " * rng.randrange(1, 30) for i in range(n)]
    imgs = [
        None
        if i % 3 == 0
        else Image.new("RGB", (28 * rng.randrange(1, 4), 28 * rng.randrange(1, 3)), (i, 9, 9))
        for i in range(n)
    ]
    return texts, imgs


def test_embedder_windows_and_workers_change_nothing(emb, monkeypatch):
    import cmpt.embed.embedder as embedder

    texts, imgs = _inputs(11)
    ref = emb.encode(texts, imgs, workers=0)
    torch.testing.assert_close(emb.encode(texts, imgs, workers=3), ref, rtol=0, atol=0)
    monkeypatch.setattr(embedder, "RENDER_WINDOW", 4)  # three windows, the last one short
    torch.testing.assert_close(emb.encode(texts, imgs, workers=2), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        emb.encode(texts, imgs, workers=-2)


def test_embedder_holds_a_bounded_window_of_preprocessed_inputs(emb, monkeypatch):
    """Preprocessed but not yet embedded: at most the window being embedded, the next one and the
    item in hand (was: every input, before the first forward)."""
    import cmpt.embed.embedder as embedder

    monkeypatch.setattr(embedder, "RENDER_WINDOW", 3)
    texts, imgs = _inputs(15)
    lock, state = threading.Lock(), {"made": 0, "embedded": 0, "peak": 0}
    real_images, real_forward = emb._images, emb._forward

    def images(item):
        out = real_images(item)
        with lock:
            state["made"] += 1
            state["peak"] = max(state["peak"], state["made"] - state["embedded"])
        return out

    def forward(items):
        out = real_forward(items)
        with lock:
            state["embedded"] += len(items)
        return out

    monkeypatch.setattr(emb, "_images", images)
    monkeypatch.setattr(emb, "_forward", forward)
    emb.encode(texts, imgs, workers=2)
    assert state["made"] == state["embedded"] == 15
    assert 3 <= state["peak"] <= 2 * 3 + 1


def test_embedder_checks_every_input_before_any_forward(emb, monkeypatch):
    texts, imgs = _inputs(9)
    texts[8], imgs[8] = "", None  # the last input is empty
    calls = []
    handle = emb.backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="input 8 is empty"):
            emb.encode(texts, imgs, workers=2)
        texts[8] = "<image> and <image>"
        with pytest.raises(ValueError, match="input 8: its text has 2 <image> placeholder"):
            emb.encode(texts, imgs, workers=2)
    finally:
        handle.remove()
    assert calls == [] and not _prefetch_threads()


def test_embedder_names_a_bad_image_and_leaves_no_thread(emb):
    texts, imgs = _inputs(6)
    imgs[4] = b"not an image"
    with pytest.raises(ImageLoadError, match="image"):
        emb.encode(texts, imgs, workers=2)
    assert not _prefetch_threads()


def test_one_lazily_opened_image_shared_by_many_inputs(emb, tmp_path):
    """``Image.open`` decodes on first use, in place, not thread-safely: one such image given for
    every text (or repeated in a list) is read under a lock by ``load_image``, so preparation
    threads give the same result as none (was: truncated-data errors with 2 or more workers)."""
    import numpy as np

    from cmpt.vision.image_io import load_image

    path = tmp_path / "page.jpg"
    Image.fromarray((np.random.default_rng(0).random((1200, 900, 3)) * 255).astype(np.uint8)).save(path)
    ref = np.asarray(load_image(path))
    for _ in range(3):
        loaded = list(ordered_map(lambda im: np.asarray(load_image(im)), [Image.open(path)] * 8, workers=8))
        assert all(np.array_equal(x, ref) for x in loaded)
    texts = [f"question {i}" for i in range(8)]
    expected = emb.encode(texts, Image.open(path), workers=0)
    for _ in range(2):
        torch.testing.assert_close(emb.encode(texts, Image.open(path), workers=4), expected, rtol=0, atol=0)
    assert not _prefetch_threads()


def test_distinct_lazily_opened_images_are_read_in_parallel(tmp_path):
    """Each caller's PIL image has its own lock: two distinct lazily opened images are decoded at
    the same time (each ``load`` waits at a two-party barrier, which a lock shared by all images
    would break), and no lock outlives its image."""
    import gc

    import cmpt.vision.image_io as image_io

    barrier, waited = threading.Barrier(2, timeout=10), set()

    def decode(img: Image.Image) -> Any:  # an image's first load waits; PIL calls load again later
        if id(img) not in waited:
            waited.add(id(img))
            barrier.wait()
        return type(img).load(img)

    images = []
    for i in range(2):
        Image.new("RGB", (16, 12), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        images.append(Image.open(tmp_path / f"{i}.png"))
        images[-1].load = functools.partial(decode, images[-1])
    loaded = list(ordered_map(image_io.load_image, images, workers=2))
    assert [im.getpixel((0, 0)) for im in loaded] == [(0, 0, 0), (40, 0, 0)]
    keys = {id(im) for im in images}
    assert keys <= set(image_io._IMAGE_LOCKS)
    del images, loaded
    gc.collect()
    assert not keys & set(image_io._IMAGE_LOCKS)


def test_text_only_inputs_start_no_thread(emb, monkeypatch):
    import cmpt.embed.embedder as embedder

    started = []
    real = embedder.ordered_map

    def spy(fn, items, **kwargs):
        started.append(kwargs["workers"])
        return real(fn, items, **kwargs)

    monkeypatch.setattr(embedder, "ordered_map", spy)
    texts, imgs = _inputs(6)
    emb.encode([t or "x" for t in texts], workers=3)
    emb.encode(texts, imgs, workers=3)
    assert started == [0, 3]
