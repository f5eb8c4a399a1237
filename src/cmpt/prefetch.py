"""Host-side input preparation run ahead of the model, in threads (docs/method.md §7 "Inference
inputs prepared ahead").

Inference entry points (``cmpt encode``, the probe features, :meth:`cmpt.Embedder.encode`) decode,
resize and patchify their images on the host. Done in the caller's thread between forwards, that
work leaves the device idle; :func:`ordered_map` runs it in a small thread pool a bounded number of
items ahead of the consumer. Threads, not processes: PIL's decoders and resampling and numpy's
large copies release the GIL, and nothing needs pickling. Results come back in input order, so
outputs do not depend on the number of workers.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["default_workers", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")

#: at most this many preparation threads by default (image decoding saturates well before)
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Preparation threads when the caller names none: the CPUs this process may use, at most
    :data:`MAX_DEFAULT_WORKERS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus))


def check_workers(workers: int | None, key: str = "workers") -> int:
    """``workers`` as a thread count (None: :func:`default_workers`); a negative one is a
    ``ValueError`` naming ``key``."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(
            f"{key} must be an integer >= 0 (0: prepare inputs in the caller's thread), got {workers!r}"
        )
    return workers


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None, ahead: int | None = None
) -> Iterator[R]:
    """``fn(item)`` for each of ``items``, yielded in order; ``workers`` threads compute them at
    most ``ahead`` items (default ``4 * workers``) beyond the one the consumer takes, so at most
    ``ahead + 1`` results are held at once. ``workers=0``: each ``fn(item)`` runs in the caller's
    thread when its turn comes (no thread, nothing ahead). An exception raised by ``fn`` is raised
    at its item's turn, after the results before it; the iterator then stops, as does one the
    consumer closes, and the items not started are dropped (those running finish first).
    ``items`` is read in the caller's thread, only as far as needed.
    """
    workers = check_workers(workers)
    if workers == 0:
        yield from map(fn, items)
        return
    ahead = 4 * workers if ahead is None else ahead
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1 with workers > 0, got {ahead}")
    source, done = iter(items), object()
    pending: deque[Future[R]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cmpt-prefetch")
    try:
        while True:
            while len(pending) <= ahead:  # the next item and ``ahead`` beyond it
                item = next(source, done)
                if item is done:
                    break
                pending.append(pool.submit(fn, item))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
