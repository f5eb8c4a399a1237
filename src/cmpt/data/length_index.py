"""Per-record length estimates for token-budget batching, built once and in parallel (docs/method.md §4).

:class:`LengthIndex` (also importable from :mod:`cmpt.data.pipeline`) holds one ``(vision_tokens,
text_tokens)`` pair per record of a map-style source. Building it reads every image *header* and
tokenizes every text, which dominates a run's start on large datasets, so:

* it runs in parallel over chunks of records: forked worker processes by default (header parsing
  in PIL is mostly Python and holds the GIL; ``benchmarks/bench_startup.py`` measures threads vs
  processes), threads with ``backend="thread"`` (or where ``fork`` is unavailable), serially for
  small sources or ``workers <= 1``; every chunk's texts are tokenized in one batched call, through
  the fast tokenizer's backend when it gives the same counts as the tokenizer (checked on a sample);
* it is cached by content (:mod:`cmpt.data.length_cache`): a second stage, a restarted run or
  another job on the same data reads the file, after one ``stat`` per image file;
* with ``shared=True`` under a process group, rank 0 alone loads or builds it and the other ranks
  receive it (:func:`cmpt.data.length_cache.share_from_rank0`).

The estimates are those of :func:`cmpt.data.pipeline.estimate_lengths`, record by record, whatever
the backend: header sizes through the processor's resize policy, turn contents tokenized without
the template plus the measured overhead plus ``N + 2`` per image; ``(0, 0)`` for a record whose
structure or image headers cannot be read (it fails, and is counted, in the builder).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from cmpt.data import length_cache as LC
from cmpt.data import sources
from cmpt.data.pipeline import template_overhead, text_estimate, turn_texts, usable_structure
from cmpt.data.sources import BadSample, Record

__all__ = ["LengthIndex", "count_tokens", "default_workers"]

Stats = dict[str, tuple[int, int]]  # image path -> (size, mtime_ns); (-1, -1): could not be opened


@dataclass
class _Job:
    source: Any
    processor: Any
    tokenizer: Any
    overhead: tuple[int, int]
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


def _header_tokens(record: Record, processor: Any, stats: Stats) -> tuple[int | None, int]:
    """``(merged vision tokens or None, headers read)``, as :func:`cmpt.data.pipeline.vision_tokens`;
    the size and mtime of every image file opened go to ``stats``."""
    total = reads = 0
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
            h, w = processor.target_size(height, width)
        except Exception:  # escape, missing, not an image, bomb, aspect ratio: fails at build
            return None, reads
        total += (h // processor.factor) * (w // processor.factor)
    return total, reads


def _estimate(job: _Job, bounds: tuple[int, int]) -> tuple[list[tuple[int, int]], Stats, int]:
    """Records ``[start, stop)``: their lengths, the image files read, the number of headers read."""
    recs: list[Record | None] = []
    for i in range(*bounds):
        try:
            rec = job.source[i]
        except BadSample:
            rec = None
        recs.append(rec if usable_structure(rec) else None)
    stats: Stats = {}
    reads, vision = 0, []
    for r in recs:
        v, n = _header_tokens(r, job.processor, stats) if r is not None else (None, 0)
        vision.append(v)
        reads += n
    texts: list[str] = []
    turns: list[int] = []  # texts per estimable record
    for r, v in zip(recs, vision):
        if r is not None and v is not None:
            mine = turn_texts(r)
            texts.extend(mine)
            turns.append(len(mine))
    counts, nturns = iter(count_tokens(job.tokenizer, texts, job.fast, job.lock)), iter(turns)
    out: list[tuple[int, int]] = []
    for r, v in zip(recs, vision):
        if r is None or v is None:
            out.append((0, 0))
            continue
        content = sum(next(counts) for _ in range(next(nturns)))
        out.append((v, text_estimate(r, content, v, job.overhead)))
    return out, stats, reads


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; its handlers are inherited
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warnings.simplefilter("ignore")  # PIL's decompression-bomb warnings: the builder reports them


def _worker(bounds: tuple[int, int]) -> tuple[list[tuple[int, int]], Stats, int]:
    assert _JOB is not None, "a length-index worker without a job"
    return _estimate(_JOB, bounds)


def _can_fork() -> bool:
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


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
                for res in pool.map(lambda b: _estimate(job, b), chunks):
                    beat()
                    yield res
        else:
            for b in chunks:
                yield _estimate(job, b)
                beat()


class LengthIndex:
    """Per-record ``(vision_tokens, text_tokens)`` estimates for token-budget batching (docs/method.md §4).

    Vision tokens are exact: image headers only (``PIL.Image.open(...).size``) through the
    processor's resize policy, ``(H/factor)·(W/factor)`` merged tokens. Text tokens are estimated:
    the turn contents tokenized without the template, plus the template's measured overhead
    (``overhead``, default :func:`~cmpt.data.pipeline.template_overhead`;
    :func:`~cmpt.data.pipeline.length_overhead` of the builder), plus ``N + 2`` per image; a
    document record (docs/method.md §3): its text without placeholders plus ``N + 2`` per image. A
    record whose structure or image headers cannot be read gets ``(0, 0)``: it is batched and then
    fails (and is counted) in the builder. ``how`` says where this instance came from (``"built"``,
    ``"cached"``, ``"received"`` from rank 0), ``seconds`` how long it took, ``header_reads`` how
    many image headers this process (and its workers) read for it.
    """

    VERSION = 3

    def __init__(
        self, lengths: Iterable[Any], *, how: str = "built", seconds: float = 0.0, header_reads: int = 0
    ) -> None:
        self.lengths = [(int(v), int(t)) for v, t in lengths]
        self.how, self.seconds, self.header_reads = how, float(seconds), int(header_reads)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.lengths[i]

    @property
    def num_failed(self) -> int:
        """Records whose length could not be estimated (``(0, 0)``)."""
        return sum(1 for v, t in self.lengths if v == 0 and t == 0)

    @classmethod
    def build(
        cls,
        source: Any,
        processor: Any,
        tokenizer: Any,
        *,
        cache_dir: str | os.PathLike | None = None,
        workers: int | None = None,
        backend: Literal["process", "thread", "serial"] = "process",
        chunk: int = 1024,
        overhead: tuple[int, int] | None = None,
        shared: bool = False,
        num_threads: int | None = None,
    ) -> LengthIndex:
        """Estimate every record of a map-style ``source`` (docs/method.md §4).

        ``cache_dir``: read / write ``lengths-<key>.json`` there (:mod:`cmpt.data.length_cache`);
        ``None``: no cache. ``workers`` (default :func:`default_workers`) processes or threads
        (``backend``) share the chunks of ``chunk`` records; a source of at most one chunk, or
        ``workers <= 1``, is estimated serially. ``shared``: every rank of the default process
        group calls this; rank 0 loads or builds, the others receive. ``num_threads``: the old
        spelling of ``workers`` with ``backend="thread"``.
        """
        t0 = time.perf_counter()
        if shared and _group_size() > 1:
            import torch.distributed as dist

            def on_rank0() -> tuple[np.ndarray, str, int]:
                idx = cls.build(
                    source, processor, tokenizer, cache_dir=cache_dir, workers=workers, backend=backend,
                    chunk=chunk, overhead=overhead,
                )  # fmt: skip
                return np.asarray(idx.lengths, dtype=np.int64).reshape(-1, 2), idx.how, idx.header_reads

            arr, how, reads = LC.share_from_rank0(on_rank0)
            mine = dist.get_rank() == 0
            return cls(
                arr.tolist(), how=how if mine else "received", seconds=time.perf_counter() - t0,
                header_reads=reads if mine else 0,
            )  # fmt: skip
        if num_threads is not None:
            workers, backend = num_threads, "thread"
        overhead = template_overhead(tokenizer) if overhead is None else tuple(overhead)
        key_src = {
            "version": cls.VERSION,
            "source": source.fingerprint(),
            "processor": processor.to_dict(),
            "tokenizer": LC.tokenizer_identity(tokenizer),
            "overhead": list(overhead),
            "follow_symlinks": sources.FOLLOW_SYMLINKS,  # decides which image paths are path_escape
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
        path = Path(os.fspath(cache_dir)) / f"lengths-{key[:20]}.json" if cache_dir else None

        def compute(beat: Callable[[], None]) -> dict[str, Any]:
            return cls._compute(source, processor, tokenizer, overhead, workers, backend, chunk, beat) | {
                "key_source": key_src
            }

        data, how = LC.load_or_build(path, key, len(source), compute)
        reads = int(data.get("header_reads", 0)) if how == "built" else 0
        return cls(data["lengths"], how=how, seconds=time.perf_counter() - t0, header_reads=reads)

    @staticmethod
    def _compute(
        source: Any,
        processor: Any,
        tokenizer: Any,
        overhead: tuple[int, int],
        workers: int | None,
        backend: str,
        chunk: int,
        beat: Callable[[], None],
    ) -> dict[str, Any]:
        t0, n = time.perf_counter(), len(source)
        chunks = [(s, min(s + chunk, n)) for s in range(0, n, max(1, int(chunk)))]
        workers = default_workers() if workers is None else int(workers)
        workers = min(workers, len(chunks))
        if workers <= 1 or backend == "serial":
            backend, workers = "serial", 1
        elif backend == "process" and not _can_fork():
            backend = "thread"
        sample = _sample_texts(source, 64)
        job = _Job(source, processor, tokenizer, tuple(overhead), _fast_matches(tokenizer, sample))
        lengths: list[tuple[int, int]] = []
        stats: Stats = {}
        reads = 0
        for part, st, r in _run(job, chunks, workers, backend, beat):
            lengths.extend(part)
            stats.update(st)
            reads += r
        return {
            "lengths": lengths,
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


def _group_size() -> int:
    try:
        import torch.distributed as dist
    except ImportError:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
