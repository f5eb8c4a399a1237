"""Per-record length estimates for token-budget batching, built once and in parallel (docs/method.md §4).

:class:`LengthIndex` (also importable from :mod:`cmpt.data.pipeline`) holds one ``(vision_tokens,
text_tokens)`` pair per record of a map-style source. Building it reads every image *header* and
tokenizes every text, which dominates a run's start on large datasets, so that part — the *scan*,
one entry per record: image sizes from the headers, content tokens, turns — is separated from
what depends on the stage (the processor's resize policy, the builder's text overhead), which
:func:`derive_lengths` applies in a moment. The scan:

* runs in parallel over chunks of records: forked worker processes by default (header parsing in
  PIL is mostly Python and holds the GIL; ``benchmarks/bench_startup.py`` measures threads vs
  processes), threads with ``backend="thread"`` (or where ``fork`` is unavailable), serially for
  small sources or ``workers <= 1``; every chunk's texts are tokenized in one batched call, through
  the fast tokenizer's backend when it gives the same counts as the tokenizer (checked on a sample);
* is cached by content (:mod:`cmpt.data.length_cache`: the source's files, the tokenizer): every
  stage on the same data — whatever its resolution —, a restarted run, another job read the file,
  after one ``stat`` per image file;
* with ``shared=True`` under a process group, happens on rank 0 alone; the other ranks receive the
  lengths (:func:`cmpt.data.length_cache.share_from_rank0`).

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

__all__ = ["LengthIndex", "count_tokens", "default_workers", "derive_lengths"]

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


def derive_lengths(entries: list[Any], processor: Any, overhead: tuple[int, int]) -> list[tuple[int, int]]:
    """``(vision, text)`` per record from the scanned entries, for this processor and text overhead:
    what :func:`cmpt.data.pipeline.estimate_lengths` gives, without reading anything (docs/method.md §4)."""
    f, out = processor.factor, []
    tokens: dict[tuple[int, int], int | None] = {}  # (w, h) -> merged tokens; None: the resize fails

    def merged(w: int, h: int) -> int | None:
        if (w, h) not in tokens:
            try:
                th, tw = processor.target_size(h, w)
                tokens[w, h] = (th // f) * (tw // f)
            except Exception:  # aspect ratio above 200, ...: fails at build
                tokens[w, h] = None
        return tokens[w, h]

    for e in entries:
        if e is None or e[3]:
            out.append((0, 0))
            continue
        content, n_turns, doc, _, *wh = e
        per_image = [merged(w, h) for w, h in zip(wh[0::2], wh[1::2])]
        if None in per_image:
            out.append((0, 0))
            continue
        vision = sum(per_image)  # type: ignore[arg-type]
        images, turns = [None] * (len(wh) // 2), None if doc else [None] * n_turns
        shape = Record("", images, turns, text="" if doc else None)  # what text_estimate looks at
        out.append((vision, text_estimate(shape, content, vision, overhead)))
    return out


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

    VERSION = 4

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

        ``cache_dir``: read / write the scan as ``lengths-<key>.json`` there
        (:mod:`cmpt.data.length_cache`; the processor and ``overhead`` are applied after);
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
        key_src = {
            "version": cls.VERSION,
            "source": source.fingerprint(),
            "tokenizer": LC.tokenizer_identity(tokenizer),
            "follow_symlinks": sources.FOLLOW_SYMLINKS,  # decides which image paths are path_escape
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
        path = Path(os.fspath(cache_dir)) / f"lengths-{key[:20]}.json" if cache_dir else None

        def scan(beat: Callable[[], None]) -> dict[str, Any]:
            return {"key_source": key_src, **cls._scan_all(source, tokenizer, workers, backend, chunk, beat)}

        data, how = LC.load_or_build(path, key, len(source), scan)
        overhead = template_overhead(tokenizer) if overhead is None else tuple(overhead)
        lengths = derive_lengths(data["records"], processor, overhead)  # type: ignore[arg-type]
        reads = int(data.get("header_reads", 0)) if how == "built" else 0
        return cls(lengths, how=how, seconds=time.perf_counter() - t0, header_reads=reads)

    @staticmethod
    def _scan_all(
        source: Any, tokenizer: Any, workers: int | None, backend: str, chunk: int, beat: Callable[[], None]
    ) -> dict[str, Any]:
        """Every record's entry (:func:`derive_lengths`), in parallel chunks; what the cache stores."""
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


def _group_size() -> int:
    try:
        import torch.distributed as dist
    except ImportError:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
