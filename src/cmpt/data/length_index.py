"""Per-record length estimates for token-budget batching, built once and in parallel (docs/method.md §4).

:class:`LengthIndex` (also importable from :mod:`cmpt.data.pipeline`) holds one ``(vision_tokens,
text_tokens)`` pair per record of a map-style source. Building it reads every image *header* and
tokenizes every text, which dominates a run's start on large datasets, so that part — the *scan*,
one entry per record: image sizes from the headers, content tokens, turns — is separated from
what depends on the stage (the processor's resize policy, the builder's text overhead), which
:func:`derive_lengths` applies in a moment. The scan:

* runs in parallel over chunks of records (:mod:`cmpt.data.length_scan`: forked worker processes by
  default, threads, or serially; batched tokenization, through the fast tokenizer's backend when it
  gives the same counts);
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

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cmpt.data import length_cache as LC
from cmpt.data import sources
from cmpt.data.length_scan import count_tokens, default_workers, scan_source
from cmpt.data.pipeline import template_overhead, text_estimate
from cmpt.data.sources import Record

__all__ = ["LengthIndex", "count_tokens", "default_workers", "derive_lengths"]  # the first two: length_scan


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
            return {"key_source": key_src, **scan_source(source, tokenizer, workers, backend, chunk, beat)}

        data, how = LC.load_or_build(path, key, len(source), scan)
        overhead = template_overhead(tokenizer) if overhead is None else tuple(overhead)
        lengths = derive_lengths(data["records"], processor, overhead)  # type: ignore[arg-type]
        reads = int(data.get("header_reads", 0)) if how == "built" else 0
        return cls(lengths, how=how, seconds=time.perf_counter() - t0, header_reads=reads)


def _group_size() -> int:
    try:
        import torch.distributed as dist
    except ImportError:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
