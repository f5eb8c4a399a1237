"""Atomic outputs: files and directories written to a temporary sibling, then renamed into place.

A single file (a summary, a results JSON, a safetensors, a shard) goes through :func:`atomic_file`:
the caller writes a hidden temporary sibling of this host and process, renamed onto the target when
the write finished and removed when it failed, so the target is the old file or the new one; a
writer killed before it could remove its temporary leaves it, and the next write of the same target
on this host removes it.

Every directory cmpt hands out as a result — a run's ``final/``, ``VisionLanguageModel``,
``NativeViT`` and ``Embedder`` saves, ``cmpt export`` — goes through :func:`atomic_directory`:

1. stale temporaries of the same target left by a dead writer (this host) are removed;
2. ``<name>.tmp-<pid>-<hex>/`` is created next to the target, holding ``.cmpt-writing.json``
   (host, pid, writer, start time): the *in-progress* marker;
3. the caller writes into it; on an exception it is removed and the exception propagates;
4. on success every file is fsync'ed, ``.cmpt-complete.json`` (what wrote it, when, cmpt
   version, extra info) replaces the in-progress marker, and the directory takes the target's
   place: an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``) with an existing target, whose
   old content is then deleted, or a plain rename; where the exchange is unsupported, the old
   target is renamed to ``<name>.old-<pid>-<hex>`` first (a crash between the two renames leaves
   both siblings; the next write of the target restores or discards them).

So the target is always either the complete old directory or the complete new one: a reader never
sees a mix. Nested use (a writer of the target called while the target is this process's own
in-progress directory, e.g. ``save_pretrained`` inside a recipe's ``save_final`` inside the
trainer's ``final/``) writes in place: the outer directory is swapped in once, complete.

Only what cmpt may discard is replaced (:func:`check_replaceable`): an empty directory or a previous
cmpt output (``.cmpt-complete.json``). A file, a non-empty directory without the marker (a run
directory, a dataset, a user's folder; also a cmpt directory written before the marker existed) and
the working directory are refused before anything is written: a typo in an output path must not
delete a training run. :func:`check_not_overlapping` refuses an output that is, holds or lies inside
the directory it is made from (``cmpt export``).

Loaders call :func:`check_loadable`. It refuses a directory holding the in-progress marker and a
directory whose temporary sibling is being written by a live process (or by one on another host,
whose liveness cannot be checked: the message names the sibling to remove). A directory *without*
``.cmpt-complete.json`` still loads: directories written before this change, and plain Hugging
Face checkpoints, have none, and a directory is only ever renamed into place complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import glob
import json
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["COMPLETE_MARKER", "WRITING_MARKER", "IncompleteOutputError", "atomic_directory"]
__all__ += ["atomic_file", "check_loadable", "check_not_overlapping", "check_replaceable", "read_marker"]

logger = logging.getLogger("cmpt.io")
COMPLETE_MARKER = ".cmpt-complete.json"
WRITING_MARKER = ".cmpt-writing.json"
_TMP, _OLD = ".tmp-", ".old-"


class IncompleteOutputError(OSError):
    """A directory that is being written, or was left half-written, and must not be loaded."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cmpt")
    except Exception:  # not installed as a distribution
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_marker(path: str | os.PathLike, name: str = COMPLETE_MARKER) -> dict[str, Any] | None:
    """The JSON of ``path/name`` (the completion marker by default), or None when absent/unreadable."""
    try:
        return json.loads((Path(path) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _writer_state(tmp: Path) -> str:
    """``"live"``, ``"dead"`` or ``"unknown"`` (another host) for the writer of temporary ``tmp``."""
    info = read_marker(tmp, WRITING_MARKER)
    if info is None:  # no marker (yet, or torn): judge by the pid in the name, this host assumed
        try:
            pid = int(tmp.name.rsplit(_TMP, 1)[1].split("-")[0])
        except (IndexError, ValueError):
            return "dead"
        return "live" if _pid_alive(pid) else "dead"
    if info.get("host") != socket.gethostname():
        return "unknown"
    return "live" if _pid_alive(int(info.get("pid", -1))) else "dead"


def _siblings(target: Path, kind: str) -> list[Path]:
    parent = target.parent
    if not parent.is_dir():
        return []
    prefix = target.name + kind
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def check_loadable(path: str | os.PathLike) -> None:
    """Raise :class:`IncompleteOutputError` when ``path`` must not be loaded (see the module
    docstring): it is an in-progress directory, or a sibling ``<name>.tmp-*`` is being written.
    A stale sibling of a dead writer only gets a warning (the target itself is intact)."""
    d = Path(path)
    info = read_marker(d, WRITING_MARKER) if d.is_dir() else None
    if info is not None or (d.is_dir() and (d / WRITING_MARKER).exists()):
        who = f" by {info.get('writer', '?')} (pid {info.get('pid')} on {info.get('host')})" if info else ""
        raise IncompleteOutputError(
            f"{d} is an incomplete output directory, still being written or left by an interrupted "
            f"write{who}; load the complete directory it was meant to replace, or write it again"
        )
    for tmp in _siblings(d, _TMP):
        state = _writer_state(tmp)
        if state == "dead":
            logger.warning("ignoring %s, left by an interrupted write of %s (remove it)", tmp, d)
            continue
        where = "a running process" if state == "live" else "a process on another host"
        raise IncompleteOutputError(
            f"{d} is being replaced: {tmp} is being written by {where}; load it once the write has "
            f"finished (if no writer is running any more, remove {tmp})"
        )


def check_replaceable(path: str | os.PathLike) -> Path:
    """The absolute ``path`` where :func:`atomic_directory` may put a directory: nothing there yet,
    an empty directory, or a previous cmpt output (it carries ``.cmpt-complete.json``). A file, a
    non-empty directory cmpt did not write, and the working directory (or one holding it) raise
    :class:`FileExistsError` naming the path and the fix."""
    target = Path(os.path.abspath(path))
    if not target.exists():
        return target
    fix = "choose a new output directory, or delete it yourself first if it may go"
    if not target.is_dir():
        raise FileExistsError(
            f"{os.fspath(path)} is a file, not a directory cmpt wrote: not replacing it; {fix}"
        )
    cwd = Path.cwd()
    if target.resolve() in (cwd, *cwd.parents):
        raise FileExistsError(
            f"{os.fspath(path)} is the current directory or holds it: not replacing it; choose a new "
            "output directory"
        )
    if not (target / COMPLETE_MARKER).is_file() and any(target.iterdir()):
        raise FileExistsError(
            f"{os.fspath(path)} is a non-empty directory that cmpt did not write (no {COMPLETE_MARKER}): "
            f"not replacing it, its files would be deleted; {fix}"
        )
    return target


def check_not_overlapping(out: str | os.PathLike, source: str | os.PathLike) -> None:
    """Raise :class:`ValueError` when output directory ``out`` is ``source``, holds it (replacing
    ``out`` would delete the source) or lies inside it (the source would change, and replacing it
    later would delete ``out``)."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or o in s.parents:
        what = "is the source" if o == s else "holds the source"
        raise ValueError(
            f"output {os.fspath(out)} {what} {os.fspath(source)}: writing it would delete the source; "
            "choose a new output directory outside it"
        )
    if s in o.parents:
        raise ValueError(
            f"output {os.fspath(out)} lies inside the source {os.fspath(source)}: choose a new output "
            "directory outside it"
        )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """The temporary file to write ``path``'s new content to: ``.<name>.<host>.<pid>.tmp`` beside it
    (hidden, so no reader's glob takes it; this process's, so concurrent writers do not meet).
    When the block ends it replaces ``path`` (after an fsync when ``durable``); when the block raises
    it is removed and ``path`` is left as it was. The parent directory is created; temporaries of
    ``path`` that killed writers on this host left behind are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}.*.tmp"):
        pid = stale.name[len(f".{path.name}.{host}.") : -len(".tmp")]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{host}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with contextlib.suppress(OSError):
            fd = os.open(dirpath, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95, 18):  # EINVAL, ENOSYS, EOPNOTSUPP, EXDEV: fall back
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _recover(target: Path) -> None:
    """Clean up after writers of ``target`` that died: stale temporaries and ``.old`` leftovers."""
    for tmp in _siblings(target, _TMP):
        if _writer_state(tmp) == "dead":
            logger.warning("removing %s, left by an interrupted write of %s", tmp, target)
            shutil.rmtree(tmp, ignore_errors=True)
    for old in _siblings(target, _OLD):
        if not target.exists():  # died between the two renames of the fallback: restore
            logger.warning("restoring %s from %s (a replacement was interrupted)", target, old)
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _install(tmp: Path, target: Path) -> None:
    if not target.exists() and not target.is_symlink():
        os.replace(tmp, target)
    elif target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
        shutil.rmtree(tmp)  # now holds the old content
    else:
        old = target.with_name(f"{target.name}{_OLD}{os.getpid()}-{secrets.token_hex(3)}")
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, writer: str = "cmpt", **info: Any) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` (a directory, created or replaced as a
    whole: files of an older ``path`` do not survive) once the block succeeds; removed on failure.
    An existing ``path`` that cmpt may not discard is refused first (:func:`check_replaceable`).

    ``writer`` (e.g. ``"VisionLanguageModel.save_pretrained"``) and ``info`` (JSON-able) go into
    the completion marker ``.cmpt-complete.json``. See the module docstring for the protocol.
    """
    own = read_marker(path, WRITING_MARKER) if Path(path).is_dir() else None
    if own is not None and own.get("pid") == os.getpid() and own.get("host") == socket.gethostname():
        yield Path(path)  # nested: the target is this process's own in-progress directory
        return
    target = check_replaceable(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = target.with_name(f"{target.name}{_TMP}{os.getpid()}-{secrets.token_hex(3)}")
    tmp.mkdir()
    started = {"writer": writer, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    (tmp / WRITING_MARKER).write_text(json.dumps(started, indent=1), encoding="utf-8")
    try:
        yield tmp
        marker = {**started, "complete": True, "finished": _now(), "cmpt_version": _version(), **info}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1, default=str), encoding="utf-8")
        (tmp / WRITING_MARKER).unlink()
        _fsync_tree(tmp)
        _install(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
