"""The length index's content-keyed cache, shared by stages, ranks and jobs (docs/method.md §4).

What a :class:`~cmpt.data.length_index.LengthIndex` reads — every record's image sizes (headers)
and content token counts — is stored as ``<dir>/lengths-<key>.json``, where the key hashes what
that depends on: the source's fingerprint (its files' paths, sizes and mtimes), the tokenizer's
identity (:func:`tokenizer_identity`: its model, normalizer, pre-tokenizer and added tokens, not
its path, so stage 2 loading stage 1's output finds stage 1's file) and the symlink policy. The
processor's resize policy and the builder's text overhead are applied when it is read (no I/O), so
stages at other resolutions share it too. The directory is ``cache_root()/lengths`` unless
``data.length_cache`` names another (:func:`length_cache_dir`), never ``run.dir``.

The file also lists the size and mtime of every image file read while building: a cached index
is used only if they still match (one ``stat`` per image, no header read), so touching, replacing
or deleting an image, or creating a missing one, rebuilds it.

Files not used for :data:`UNUSED_DAYS` days are deleted when a new one is written.

Writers: :func:`load_or_build` takes ``<file>.lock`` (created exclusively; holds host and pid,
touched as the build progresses); whoever gets it builds and writes the file atomically (a
temporary file renamed into place), the others poll until the file appears and read it. A lock
whose process is dead (same host) or that was not touched for :data:`STALE_S` seconds is broken.
Ranks of one process group: :func:`share_from_rank0` — rank 0 loads or builds, the other ranks
receive the lengths by a broadcast on a gloo group with a long timeout (so a long build is waited
for whatever the job's own collective timeout): no shared file system is needed.

:func:`first_step_message` is the trainer's "time to first step" line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cmpt.io_atomic import atomic_file

__all__ = ["STALE_S", "first_step_message", "length_cache_dir", "load_or_build", "process_age_s"]
__all__ += ["share_from_rank0", "tokenizer_identity"]

log = logging.getLogger("cmpt.data")
STALE_S = 600.0  # a lock not touched for this long belongs to a dead builder
UNUSED_DAYS = 30  # cache files not used for this long are deleted when another is written
_IMPORTED = time.time()


def length_cache_dir(setting: str | os.PathLike | None = "") -> Path | None:
    """Where length indexes are cached: ``""`` / ``None`` = ``cache_root()/lengths``; ``"off"`` = no
    cache; else the directory named (``{cache}``, ``~`` and ``$VARS`` expand)."""
    from cmpt.paths import cache_root, expand_path

    text = "" if setting is None else str(setting).strip()
    if text.lower() in ("off", "none", "false"):
        return None
    return Path(expand_path(text)) if text else cache_root() / "lengths"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What the token counts depend on: a hash of the backend's model, normalizer, pre-tokenizer and
    added tokens (fast tokenizers), else of the sorted vocabulary; plus the size. The path it was
    loaded from and its padding / truncation state are left out."""
    ident: dict[str, Any] = {"size": len(tokenizer)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is not None:
            spec = json.loads(backend.to_str())
            keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
            text = json.dumps(keep, sort_keys=True)
        else:
            text = json.dumps(sorted(tokenizer.get_vocab().items()))
        ident["sha256"] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    except Exception:  # an unusual tokenizer: its class and size only
        ident["class"] = type(tokenizer).__name__
    return ident


# -- image files: what was read, and whether it changed ------------------------------------------
def pack_images(stats: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """``{path: (size, mtime_ns)}`` (``(-1, -1)``: could not be opened) → the cache file's form."""
    paths = sorted(stats)
    root = os.path.commonpath(paths) if paths else ""
    if paths and (root in paths or not os.path.isabs(root)):
        root = os.path.dirname(root)
    return {"root": root, "files": [[os.path.relpath(p, root), *stats[p]] for p in paths]}


def _stat_all(paths: Sequence[str]) -> list[tuple[int, int]]:
    def one(block: Sequence[str]) -> list[tuple[int, int]]:
        out = []
        for p in block:
            try:
                st = os.stat(p)
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((-1, -1))
        return out

    step = 4096
    blocks = [paths[i : i + step] for i in range(0, len(paths), step)]
    if len(blocks) <= 1:
        return one(paths)
    with ThreadPoolExecutor(min(8, len(blocks))) as pool:  # stat releases the GIL: overlaps on NFS
        return [x for part in pool.map(one, blocks) for x in part]


def changed_images(images: dict[str, Any]) -> list[str]:
    """The image files of a cache file whose size or mtime differ now (or that appeared / vanished)."""
    root, files = images.get("root", ""), images.get("files", [])
    paths = [os.path.join(root, f[0]) for f in files]
    return [p for p, f, now in zip(paths, files, _stat_all(paths)) if (f[1], f[2]) != now]


# -- one file, several writers -------------------------------------------------------------------
def _read(path: Path, key: str, n: int) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("ignoring an unreadable length cache %s", path)
        return None
    if not isinstance(data, dict) or data.get("key") != key or len(data.get("records", ())) != n:
        return None
    changed = changed_images(data.get("images") or {})
    if changed:
        log.info(
            "%d image file(s) changed since the length index %s was built (e.g. %s): rebuilding",
            len(changed), path.name, changed[0],
        )  # fmt: skip
        return None
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path, durable=True) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, separators=(",", ":"))
    _prune(path.parent)


def _prune(directory: Path) -> None:
    """Delete the cache files nobody used for :data:`UNUSED_DAYS` days (a hit touches its file)."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for old in directory.glob("lengths-*.json"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock(lock: Path) -> bool:
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, fh)
    return True


def _stale(lock: Path) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    try:
        owner = json.loads(lock.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        owner = {}  # being written: judged by its age
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if isinstance(pid, int) and owner.get("host") == socket.gethostname() and not _pid_alive(pid):
        return True
    return age >= STALE_S


def load_or_build(
    path: Path | None,
    key: str,
    n: int,
    build: Callable[[Callable[[], None]], dict[str, Any]],
    *,
    poll_s: float = 0.2,
) -> tuple[dict[str, Any], str]:
    """``(data, how)``: the cache file ``path`` if valid (``how = "cached"``), else ``build(beat)``
    written there (``"built"``; ``beat()`` keeps the lock fresh), built by one process at a time:
    the others wait for it (docs/method.md §4). ``path=None``: always build, no file."""
    if path is None:
        return build(lambda: None), "built"
    lock = path.with_name(path.name + ".lock")
    waited = False
    while True:
        data = _read(path, key, n)
        if data is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # used: kept by _prune
            return data, "cached"
        try:
            locked = _try_lock(lock)
        except OSError as e:  # a read-only or missing cache directory: build without it
            log.warning("length cache %s unusable (%s): building the index without caching it", path, e)
            return build(lambda: None), "built"
        if locked:
            try:
                data = _read(path, key, n)  # written between our read and our lock
                if data is not None:
                    return data, "cached"

                def beat() -> None:
                    with contextlib.suppress(OSError):
                        os.utime(lock)

                data = build(beat)
                try:
                    _write(path, {"key": key, **data})
                except OSError as e:
                    log.warning("could not write the length cache %s: %s", path, e)
                return data, "built"
            finally:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
        if _stale(lock):
            log.warning("breaking the stale lock %s (its builder died)", lock)
            aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
            with contextlib.suppress(OSError):
                os.replace(lock, aside)
                os.unlink(aside)
            continue
        if not waited:
            log.info("waiting for another process building the length index (%s)", lock)
            waited = True
        time.sleep(poll_s)


# -- ranks of one process group ------------------------------------------------------------------
def share_from_rank0(compute: Callable[[], Any], *, timeout_s: float = 6 * 3600) -> Any:
    """``compute()`` on rank 0 only; every rank returns its result (picklable), received by a
    broadcast on a CPU (gloo) group whose timeout is ``timeout_s``: a long build is waited for
    whatever the job's collective timeout, NCCL jobs included (docs/method.md §4). An exception on
    rank 0 is raised there and reported on the other ranks. Every rank must call it."""
    import datetime

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                box = [("ok", compute())]
            except BaseException as e:
                dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0, group=group)
                raise
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    status, value = box[0]
    if status != "ok":
        raise RuntimeError(f"rank 0 could not build the length index: {value}")
    return value


# -- time to first step --------------------------------------------------------------------------
def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``; elsewhere since cmpt's data modules loaded)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def first_step_message(loader: Any) -> str:
    """The trainer's line after its first optimizer step: seconds since the process started, and
    the part spent on the length index (``loader.length_index``, set by ``build_loader``)."""
    msg = f"time to first step: {process_age_s():.1f} s since the process started"
    info = getattr(loader, "length_index", None)
    if isinstance(info, dict):
        msg += f" (length index: {info['seconds']:.2f} s, {info['how']}, {info['records']} records)"
    return msg
