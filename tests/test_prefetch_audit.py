"""Inputs prepared ahead in threads, pinned where a mutation audit of the change found the tests silent
(docs/method.md §7 "Inference inputs prepared ahead").

Each test here failed on a mutant of ``src/cmpt`` that the earlier tests let through, and passes on
the code as shipped:

* :func:`cmpt.prefetch.ordered_map` reads exactly ``ahead`` items beyond the one taken (default
  ``4 * workers``), cancels the queued items it has not started when closed, and checks its own
  ``workers``; :func:`cmpt.prefetch.default_workers` is the usable CPUs, capped;
* ``Embedder.encode`` prepares the next window while one is embedded (not less, not more), packs
  each window longest first by the token budget, leaves no thread behind when a forward fails and
  refuses a bad ``workers`` before looking at its inputs;
* ``cmpt encode`` (:func:`cmpt.encode.encode_images`): an image whose header reads but whose pixels do
  not fails in a preparation thread, and is raised or skipped at its own turn (the earlier test's
  "broken" PNG already fails at the header pass, so this path was never run), with no thread left
  behind; ``--workers`` (default: none given) reaches the preparation;
* the probe batches equal one processor call per batch, prepared in threads when asked; retrieval
  pools every image of a record, with the grids of its own images, and leaves no thread behind;
* ``cmpt eval embed`` hands its token budget to its single ``encode`` call.

No wall time is asserted: waits only bound how long a condition may take to become true.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cmpt.prefetch as prefetch
import hf_tiny
from cmpt.cli import main
from cmpt.prefetch import MAX_DEFAULT_WORKERS, default_workers, ordered_map
from cmpt.vision.image_io import ImageLoadError, load_image
from cmpt.vision.processor import ImageProcessor
from vlm_fixtures import build_dirs, build_vlm


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cmpt-prefetch")]


def _wait_for(condition, timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.002)
    return bool(condition())


# ---------------------------------------------------------------- cmpt.prefetch


@pytest.mark.parametrize(("workers", "ahead", "expected"), [(2, 5, 5), (2, None, 8), (1, None, 4), (3, 1, 1)])
def test_ordered_map_reads_exactly_ahead_items_beyond_the_one_taken(workers, ahead, expected):
    """Items are read in the caller's thread before each result is handed over: after taking item k,
    exactly k + 1 + ahead have been read (``ahead`` default ``4 * workers``), not fewer."""
    read: list[int] = []

    def items():
        for i in range(40):
            read.append(i)
            yield i

    it = ordered_map(lambda i: -i, items(), workers=workers, ahead=ahead)
    for taken in range(12):
        assert next(it) == -taken
        assert len(read) == taken + 1 + expected
    assert list(it) == [-i for i in range(12, 40)] and len(read) == 40
    assert not _prefetch_threads()


def test_closing_cancels_the_queued_items_not_started(monkeypatch):
    """Closed while its one thread runs item 1: items 2.. (queued, not started) are cancelled, never
    run; the running one finishes first."""
    submitted = []

    class RecordingPool(ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            submitted.append(future)
            return future

    monkeypatch.setattr(prefetch, "ThreadPoolExecutor", RecordingPool)
    started: list[int] = []

    def fn(i: int) -> int:
        started.append(i)
        if i == 1:  # hold the only thread until the close has cancelled what is queued behind it
            _wait_for(lambda: len(submitted) > 2 and submitted[2].cancelled(), timeout=3)
        return i

    it = ordered_map(fn, range(20), workers=1, ahead=4)
    assert next(it) == 0
    it.close()
    assert started in ([0], [0, 1])  # item 1 ran only if the thread had already taken it
    assert len(submitted) == 5 and all(f.cancelled() for f in submitted[2:])
    assert not _prefetch_threads()


def test_ordered_map_checks_its_own_workers():
    """Callers that do not check ``workers`` themselves (the probe batches) rely on this message."""
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=r"workers must be an integer >= 0"):
            next(ordered_map(abs, [1], workers=bad))


def test_default_workers_is_the_usable_cpus_capped(monkeypatch):
    monkeypatch.setattr(prefetch.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == MAX_DEFAULT_WORKERS == 8  # docs/method.md §7: at most 8
    monkeypatch.setattr(prefetch.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert default_workers() == 1
    monkeypatch.delattr(prefetch.os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(prefetch.os, "cpu_count", lambda: 3)
    assert default_workers() == 3
    monkeypatch.setattr(prefetch.os, "cpu_count", lambda: None)
    assert default_workers() == 1


# ---------------------------------------------------------------- Embedder.encode


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    from cmpt.embed.embedder import Embedder

    return Embedder(build_vlm(build_dirs(tmp_path_factory.mktemp("emb_audit")), "qwen2"), batch_tokens=96)


def _inputs(n: int, every_image: bool = False) -> tuple[list, list]:
    texts = [
        None if i % 4 == 1 and (i % 3 or every_image) else "word " * (1 + (7 * i) % 23) for i in range(n)
    ]
    imgs = [
        None
        if i % 3 == 0 and not every_image
        else Image.new("RGB", (28 * (1 + i % 3), 28 * (1 + i % 2)), (i, 9, 9))
        for i in range(n)
    ]
    return texts, imgs


def test_embedder_prepares_the_next_window_while_one_is_embedded(emb, monkeypatch):
    """At the first forward, the window in hand and the whole next one are preprocessed (2 windows),
    and nothing beyond them."""
    import cmpt.embed.embedder as embedder

    window = 3
    monkeypatch.setattr(embedder, "RENDER_WINDOW", window)
    texts, imgs = _inputs(12, every_image=True)
    lock, state = threading.Lock(), {"made": 0, "at_first_forward": None, "reached": None}
    real_images, real_forward = emb._images, emb._forward

    def images(item):
        out = real_images(item)
        with lock:
            state["made"] += 1
        return out

    def forward(items):
        if state["at_first_forward"] is None:
            state["reached"] = _wait_for(lambda: state["made"] >= 2 * window)
            time.sleep(0.05)  # let the threads run as far as they may
            state["at_first_forward"] = state["made"]
        return real_forward(items)

    monkeypatch.setattr(emb, "_images", images)
    monkeypatch.setattr(emb, "_forward", forward)
    emb.encode(texts, imgs, workers=2)
    assert state["reached"] and state["at_first_forward"] == 2 * window
    assert state["made"] == 12


def test_embedder_packs_each_window_longest_first_within_the_token_budget(emb, monkeypatch):
    """Each window's inputs go to the forwards sorted by token count, longest first, greedily packed
    within ``batch_tokens`` (an oversize input alone); no forward mixes two windows."""
    import cmpt.embed.embedder as embedder

    window, budget = 4, 96
    monkeypatch.setattr(embedder, "RENDER_WINDOW", window)
    texts, imgs = _inputs(11)
    lengths = []
    for i, (t, im) in enumerate(zip(texts, imgs)):
        ims = [] if im is None else [im]
        lengths.append(len(emb._render(emb._text(t, len(ims), None, i), emb._images(ims), i)[0]))
    expected = []
    for start in range(0, len(lengths), window):
        group, used = [], 0
        for length in sorted(lengths[start : start + window], reverse=True):
            if group and used + length > budget:
                expected.append(group)
                group, used = [], 0
            group.append(length)
            used += length
        expected.append(group)
    assert len(set(lengths)) > 3 and len(expected) > 3  # several lengths, several forwards per window

    forwards: list[list[int]] = []
    real_forward = emb._forward

    def forward(items):
        forwards.append([len(x[0]) for x in items])
        return real_forward(items)

    monkeypatch.setattr(emb, "_forward", forward)
    out = emb.encode(texts, imgs, workers=2, batch_tokens=budget)
    assert forwards == expected
    monkeypatch.setattr(emb, "_forward", real_forward)
    torch.testing.assert_close(
        out, emb.encode(texts, imgs, workers=0, batch_tokens=10_000), rtol=1e-5, atol=1e-6
    )


def test_embedder_leaves_no_thread_when_a_forward_fails(emb, monkeypatch):
    """A forward that fails (e.g. out of device memory) while images are being prepared ahead: the
    preparation threads are stopped before the error reaches the caller, not when it is dropped."""
    import cmpt.embed.embedder as embedder

    monkeypatch.setattr(embedder, "RENDER_WINDOW", 3)
    texts, imgs = _inputs(12, every_image=True)

    def forward(items):
        raise RuntimeError("device lost")

    monkeypatch.setattr(emb, "_forward", forward)
    was_training = emb.backbone.training
    with pytest.raises(RuntimeError, match="device lost") as info:
        emb.encode(texts, imgs, workers=2)
    assert info.tb is not None and not _prefetch_threads()  # the traceback (and its frames) still held
    assert emb.backbone.training == was_training


def test_a_bad_workers_value_is_refused_before_the_inputs_are_looked_at(emb, tmp_path):
    from cmpt.encode import encode_images, load_vision_model

    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        emb.encode([""], workers=-1)  # not "input 0 is empty"
    vit, proc = load_vision_model(hf_tiny.save("dinov2", tmp_path / "model"))
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):  # not the missing image
        encode_images(vit, proc, [tmp_path / "missing.png"], tmp_path / "o.safetensors", workers=-1)


# ---------------------------------------------------------------- cmpt encode


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch_audit")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, (w, h) in enumerate([(120, 80), (64, 200), (150, 150), (90, 40), (60, 60), (200, 70)]):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(root / "imgs" / f"im{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(paths[-1])
    buf = io.BytesIO()
    Image.fromarray((torch.rand(80, 120, 3, generator=g) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
    truncated = root / "imgs" / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header reads, the pixels do not
    with Image.open(truncated) as im:
        assert im.size == (120, 80)
    return root, paths, truncated


@pytest.fixture(scope="module")
def vit_proc(images):
    from cmpt.encode import load_vision_model

    root, _, _ = images
    ckpt = hf_tiny.save("dinov2", root)
    return ckpt, *load_vision_model(ckpt)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_bad_only_when_decoded_is_skipped_or_raised_at_its_turn(images, vit_proc, tmp_path, workers):
    from cmpt.encode import encode_images

    _, paths, truncated = images
    _, vit, proc = vit_proc
    inputs = [*paths[:3], truncated, *paths[3:]]
    kw = dict(token_budget=60, progress=False, workers=workers)
    ref = encode_images(vit, proc, paths, tmp_path / "ref.safetensors", **kw)
    res = encode_images(vit, proc, inputs, tmp_path / "skip.safetensors", skip_bad=True, **kw)
    assert res.images == ref.images == [str(p) for p in paths]
    assert list(res.skipped) == [str(truncated)] and "truncated" in res.skipped[str(truncated)]
    a, b = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "skip.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "fail.safetensors"
    with pytest.raises(ImageLoadError, match=r"truncated\.png") as info:
        encode_images(vit, proc, inputs, out, **kw)
    assert info.tb is not None and not _prefetch_threads()  # stopped, not left to the garbage collector
    assert not out.exists() and not list(tmp_path.glob("fail*"))


def test_cmpt_encode_hands_workers_to_the_preparation(images, vit_proc, tmp_path, monkeypatch):
    import cmpt.encode as encode

    _, paths, _ = images
    ckpt, _, _ = vit_proc
    seen = []
    real = encode.ordered_map

    def spy(fn, items, **kwargs):
        seen.append(kwargs.get("workers", "not given"))
        return real(fn, items, **kwargs)

    monkeypatch.setattr(encode, "ordered_map", spy)
    for i, flags in enumerate((["--workers", "0"], ["--workers", "3"], [])):
        out = tmp_path / f"o{i}.safetensors"
        assert (
            main(["encode", "--model", str(ckpt), *map(str, paths[:2]), "--out", str(out), "--quiet", *flags])
            == 0
        )
    assert seen == [0, 3, None]  # none given: default_workers(), decided in cmpt.prefetch


# ---------------------------------------------------------------- probe and retrieval features


def test_probe_batches_equal_one_processor_call_per_batch_prepared_in_threads(images):
    from cmpt.eval.features import _packed_batches

    _, paths, _ = images
    names: list[str] = []

    class RecordingProcessor(ImageProcessor):
        def __call__(self, imgs, names_=None):
            names.append(threading.current_thread().name)
            return super().__call__(imgs, names_)

    plain = ImageProcessor(14, 2, max_pixels=112 * 112)
    inputs = [*paths, Image.open(paths[3]).convert("RGB"), paths[5], paths[0]]
    for workers in (0, 2):
        names.clear()
        batches = list(_packed_batches(inputs, RecordingProcessor(14, 2, max_pixels=112 * 112), 100, workers))
        assert any(len({tuple(g) for g in grids}) > 1 for _, _, grids in batches)  # mixed sizes in a batch
        for idx, patches, grids in batches:
            direct = plain([load_image(inputs[i]) for i in idx])
            assert torch.equal(patches, direct.patches)
            assert grids == [tuple(g) for g in direct.grid_hw.tolist()]
        assert [i for idx, _, _ in batches for i in idx] == list(range(len(inputs)))
        assert len(names) == len(inputs)
        in_threads = [n.startswith("cmpt-prefetch") for n in names]
        assert all(in_threads) if workers else not any(in_threads)
    assert not _prefetch_threads()


class _GridModel:
    """Merged tokens: each merge window's first 8 pixel values plus a tag ``100·h + w`` of the grid of
    the image it belongs to (so a grid given to the wrong image shows)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def encode_images(self, patches, grid_hw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("device lost")
        counts = [int(h) * int(w) // 4 for h, w in grid_hw.tolist()]
        assert sum(counts) * 4 == patches.shape[0]
        tags = torch.cat(
            [torch.full((c, 1), float(100 * h + w)) for c, (h, w) in zip(counts, grid_hw.tolist())]
        )
        return patches.reshape(patches.shape[0] // 4, -1)[:, :8] + tags


def test_retrieval_pools_every_image_of_a_record_with_its_own_grids(tmp_path):
    from cmpt.eval.retrieval import _vision_features

    proc = ImageProcessor(14, 2, mean=(0, 0, 0), std=(1, 1, 1), min_pixels=28 * 28)
    files = []
    for k, (w, h) in enumerate([(56, 56), (84, 56), (112, 56), (56, 84), (28, 28), (84, 84)]):
        files.append(tmp_path / f"{k}.png")
        Image.new("RGB", (w, h), (20 * k + 10, 5 * k, 200 - 10 * k)).save(files[-1])
    records = [
        {"images": [files[0], files[1]]},
        {"images": [files[2]]},
        {"images": [files[3], files[4], files[5]]},
        {"images": [files[1]]},
        {"images": [files[5], files[2]]},
    ]
    feats = _vision_features(_GridModel(), records, proc, batch_size=2)
    assert feats.shape == (len(records), 8)
    for r, f in zip(records, feats):
        packed = proc([load_image(p) for p in r["images"]])
        torch.testing.assert_close(f, _GridModel().encode_images(packed.patches, packed.grid_hw).mean(0))
    assert not _prefetch_threads()
    with pytest.raises(RuntimeError, match="device lost") as info:
        _vision_features(_GridModel(fail_at=2), records, proc, batch_size=2)
    assert info.tb is not None and not _prefetch_threads()


# ---------------------------------------------------------------- cmpt eval embed


def test_evaluate_embed_hands_its_token_budget_to_one_encode_call(emb, tmp_path):
    from cmpt.eval.embed import evaluate_embed
    from test_embed_eval import make_data

    data = make_data(tmp_path / "data")
    calls = []

    class Spy:
        def encode(self, texts, images, **kwargs):
            calls.append((len(texts), kwargs))
            return emb.encode(texts, images, **kwargs)

    res = evaluate_embed(Spy(), data, batch_tokens=77)
    assert calls == [(res["n_embedded"], {"batch_tokens": 77})]
