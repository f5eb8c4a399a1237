"""The scan behind :class:`~cmpt.data.length_index.LengthIndex`: every record's processor-independent
entry (image sizes from the headers, content tokens, turns), in parallel (docs/method.md §4).

This is the part of a length index that reads the data — every image *header*, every text through
the tokenizer — and so dominates a run's start on large datasets; :mod:`cmpt.data.length_cache`
stores its result by content and :func:`cmpt.data.length_index.derive_lengths` turns it into a
stage's lengths. :func:`scan_source` splits the records into chunks and scans them

* in forked worker processes by default (header parsing in PIL is mostly Python and holds the GIL;
  ``benchmarks/bench_startup.py`` measures threads vs processes), in threads with
  ``backend="thread"`` (or where ``fork`` is unavailable: not Linux, or inside a daemonic DataLoader
  worker), serially for a source of one chunk or ``workers <= 1``;
* tokenizing every chunk's texts in one batched call, through the fast tokenizer's backend when it
  gives the same counts as the tokenizer (checked on a sample of the source).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from cmpt.data import length_cache as LC
from cmpt.data.pipeline import turn_texts, usable_structure
from cmpt.data.sources import BadSample, Record

__all__ = ["Stats", "count_tokens", "default_workers", "scan_source"]

Stats = dict[str, tuple[int, int]]  # image path -> (size, mtime_ns); (-1, -1): could not be opened


@dataclass
class _Job:
    source: Any
    tokenizer: Any
    fast: bool
    lock: threading.Lock = field(default_factory=threading.Lock)


_JOB: _Job | None = None  # the build in progress; forked workers inherit it


def default_workers() -> int:
    """Workers of a parallel build: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def _backend_counts(backend: Any, texts: list[str]) -> list[int]:
    enc = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    return [len(e.ids) for e in enc(texts, add_special_tokens=False)]


def count_tokens(tokenizer: Any, texts: list[str], fast: bool = False, lock: Any = None) -> list[int]:
    """Token count of each text without special tokens: one batched call (``fast``: the fast
    tokenizer's backend directly, skipping offsets and Python lists of ids)."""
    if not texts:
        return []
    if fast:
        return _backend_counts(tokenizer.backend_tokenizer, texts)
    with lock if lock is not None else contextlib.nullcontext():
        return [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _fast_matches(tokenizer: Any, texts: list[str]) -> bool:
    """Whether the backend's counts equal the tokenizer's on ``texts`` (then the fast path is used)."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or not texts:
        return False
    try:
        return count_tokens(tokenizer, texts, fast=True) == count_tokens(tokenizer, texts)
    except Exception:
        return False


def _header_sizes(record: Record, stats: Stats) -> tuple[list[int], bool, int]:
    """``(w1, h1, w2, h2, ...)`` of ``record``'s images from their headers, up to the first that cannot
    be read (then ``failed``), and the number of headers read; the size and mtime of every image
    file opened go to ``stats``. As :func:`cmpt.data.pipeline.vision_tokens` reads them."""
    sizes: list[int] = []
    reads = 0
    for i in range(len(record.images)):
        try:
            src = record.image_source(i)
            if isinstance(src, bytes):
                fh: Any = io.BytesIO(src)
            else:
                try:
                    fh = open(src, "rb")  # noqa: SIM115 - closed below
                except OSError:
                    stats[src] = (-1, -1)
                    raise
                st = os.fstat(fh.fileno())
                stats[src] = (st.st_size, st.st_mtime_ns)
            with fh:
                reads += 1
                with Image.open(fh) as im:
                    width, height = im.size
        except Exception:  # escape, missing, not an image, bomb: fails at build
            return sizes, True, reads
        sizes += [int(width), int(height)]
    return sizes, False, reads


def _scan(job: _Job, bounds: tuple[int, int]) -> tuple[list[Any], Stats, int]:
    """Records ``[start, stop)`` → their processor-independent entries (``None``: unusable record;
    else ``[content tokens, turns, is document, header failed, w1, h1, ...]``), the image files
    read, the number of headers read."""
    recs: list[Record | None] = []
    for i in range(*bounds):
        try:
            rec = job.source[i]
        except BadSample:
            rec = None
        recs.append(rec if usable_structure(rec) else None)
    stats: Stats = {}
    reads, texts, turns, heads = 0, [], [], []
    for r in recs:
        if r is None:
            continue
        sizes, failed, n = _header_sizes(r, stats)
        reads += n
        heads.append((sizes, failed))
        mine = turn_texts(r)
        texts.extend(mine)
        turns.append(len(mine))
    counts, it = iter(count_tokens(job.tokenizer, texts, job.fast, job.lock)), iter(zip(turns, heads))
    out: list[Any] = []
    for r in recs:
        if r is None:
            out.append(None)
            continue
        nt, (sizes, failed) = next(it)
        content = sum(next(counts) for _ in range(nt))
        n_turns = 1 if r.is_document else len(r.conversations)
        out.append([content, n_turns, int(r.is_document), int(failed), *sizes])
    return out, stats, reads


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; its handlers are inherited
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warnings.simplefilter("ignore")  # PIL's decompression-bomb warnings: the builder reports them


def _worker(bounds: tuple[int, int]) -> tuple[list[Any], Stats, int]:
    assert _JOB is not None, "a length-index worker without a job"
    return _scan(_JOB, bounds)


def _can_fork() -> bool:
    linux = sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
    return linux and not mp.current_process().daemon  # a daemon (a DataLoader worker) has no children


@contextlib.contextmanager
def _quiet_forks() -> Any:
    """Forked workers tokenize single-threaded and without the tokenizers' fork warning."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _run(job: _Job, chunks: list[tuple[int, int]], workers: int, backend: str, beat: Callable) -> Iterable:
    """The chunks' results, in order."""
    global _JOB
    if backend == "process":
        _JOB = job
        try:
            with _quiet_forks():
                pool = mp.get_context("fork").Pool(workers, initializer=_worker_init)
            try:
                for res in pool.imap(_worker, chunks):
                    beat()
                    yield res
                pool.close()
            except BaseException:
                pool.terminate()
                raise
            finally:
                pool.join()
        finally:
            _JOB = None
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "thread":
            with ThreadPoolExecutor(workers) as pool:
                for res in pool.map(lambda b: _scan(job, b), chunks):
                    beat()
                    yield res
        else:
            for b in chunks:
                yield _scan(job, b)
                beat()


def scan_source(
    source: Any, tokenizer: Any, workers: int | None, backend: str, chunk: int, beat: Callable[[], None]
) -> dict[str, Any]:
    """Every record's entry (``None``: unusable record; else ``[content tokens, turns, is document,
    header failed, w1, h1, ...]``), scanned by ``workers`` (default :func:`default_workers`)
    processes or threads (``backend``) in chunks of ``chunk`` records, ``beat()`` after each chunk;
    with the image files read and the build's figures: what the cache stores (docs/method.md §4)."""
    t0, n = time.perf_counter(), len(source)
    chunks = [(s, min(s + chunk, n)) for s in range(0, n, max(1, int(chunk)))]
    workers = default_workers() if workers is None else int(workers)
    workers = min(workers, len(chunks))
    if workers <= 1 or backend == "serial":
        backend, workers = "serial", 1
    elif backend == "process" and not _can_fork():
        backend = "thread"
    job = _Job(source, tokenizer, _fast_matches(tokenizer, _sample_texts(source, 64)))
    records: list[Any] = []
    stats: Stats = {}
    reads = 0
    for part, st, r in _run(job, chunks, workers, backend, beat):
        records.extend(part)
        stats.update(st)
        reads += r
    return {
        "records": records,
        "images": LC.pack_images(stats),
        "header_reads": reads,
        "build": {"seconds": round(time.perf_counter() - t0, 3), "backend": backend, "workers": workers},
    }


def _sample_texts(source: Any, k: int) -> list[str]:
    texts: list[str] = []
    for i in range(min(k, len(source))):
        try:
            rec = source[i]
        except BadSample:
            continue
        if usable_structure(rec):
            texts.extend(turn_texts(rec))
    return texts
