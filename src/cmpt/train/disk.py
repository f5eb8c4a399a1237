"""The run directory on disk: who owns it, disk space and write failures of checkpoint saves
(docs/method.md §4 "Verified checkpoints").

One process owns a run: before anything reads or writes ``run.dir``, rank 0 creates it and takes its
:class:`RunDirLock` (:func:`claim_run_dir`), so no second ``cmpt train`` writes, prunes or cleans up
its checkpoints; a ``run.dir`` that is not a directory, or is in use, stops every rank at once.

Rank 0 of :class:`~cmpt.train.checkpoint.CheckpointManager` takes its decisions through
:func:`on_main` (shared with every rank, errors raised everywhere) and asks a :class:`SpaceGuard`
before and after writing: is there room for the next checkpoint (the last one's size + 2 %, or
the state dict's size the first time), may the checkpoints that ``train.keep_last`` will prune
after this save be deleted first to make room (never the newest one), and what to tell the user
when a write fails — the path, the error, that the previous checkpoint is intact, and the bytes
needed and free when the disk is full (``ENOSPC`` / ``EDQUOT``; any other error is named as it is).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException

from ..io_atomic import check_replaceable
from . import distributed as D
from .resume import ResumeError
from .verify import CheckpointError, CheckpointSaveError, dir_nbytes, read_manifest

__all__ = ["LOCK_NAME", "RunDirLock", "SpaceGuard", "check_run_dir", "claim_run_dir", "describe_failure"]
__all__ += ["fmt_bytes", "free_bytes", "on_main", "out_of_space", "tensor_nbytes"]

logger = logging.getLogger("cmpt.train")
_MARGIN, _SLACK = 1.02, 64 << 10
_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errors that mean "out of space"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)  # a file system without flock
LOCK_NAME = ".lock"  # in run.dir
_held: set[int] = set()  # this process's run.dir lock descriptors


def _close_in_child() -> None:
    """After a fork: the child (a data-loader worker) drops its copies of the lock descriptors
    without unlocking, so a child that outlives the trainer does not keep the run locked."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLock:
    """The exclusive lock of one run directory: ``fcntl.flock`` on ``run.dir/.lock``, which records
    the holder's pid, host and start time (docs/method.md §4 "Verified checkpoints").

    The kernel releases it when its process ends, however it ends, so the lock of a dead process
    never blocks (the file stays; its contents only name the last holder). A second open of the
    file conflicts even within one process. On a shared file system (NFS) the lock holds across
    nodes; where the file system has no locks, :meth:`acquire` warns and the run goes unguarded.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock: None when taken (or when locks are unsupported: a warning), else who holds
        it (``pid P on host H since T``). ``OSError`` when the lock file cannot be opened."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            return holder
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise
            logger.warning(
                "%s: the file system has no file locks (%s): nothing keeps a second cmpt train off run.dir",
                self.path,
                e,
            )
            return None
        now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now}
        with contextlib.suppress(OSError):  # who holds it is for the message only; the lock is taken
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _held.add(fd)
        return None

    def release(self) -> None:
        """Unlock (closing the file); a no-op when not held."""
        if self._fd is not None:
            _held.discard(self._fd)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # just taken: not recorded yet
        return "another process (not recorded yet)"


def check_run_dir(run_dir: Path) -> None:
    """:class:`~cmpt.train.resume.ResumeError` when ``run_dir`` cannot be a run directory: it, or its
    nearest existing parent, is not a directory. Local and cheap: checked before anything is built."""
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return
    where = (
        "is not a directory" if existing == run_dir else f"cannot be created ({existing} is not a directory)"
    )
    raise ResumeError(
        f"run.dir {run_dir} {where}: run.dir holds the run's checkpoints, logs and final weights; "
        "choose another path (--set run.dir=...)"
    )


def claim_run_dir(run_dir: Path, world: D.WorldInfo) -> RunDirLock | None:
    """Collective, first thing of a run: rank 0 creates ``run_dir`` and takes its :class:`RunDirLock`
    (returned there, to release at exit; None on the other ranks). Not a directory, not creatable,
    or in use by another process: :class:`~cmpt.train.resume.ResumeError` (exit 2) on every rank."""
    lock = RunDirLock(run_dir)

    def claim() -> None:
        check_run_dir(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            holder = lock.acquire()
        except OSError as e:
            raise ResumeError(f"run.dir {run_dir} cannot be used: {e}") from None
        if holder is not None:
            raise ResumeError(f"run.dir {run_dir} is in use by {holder}: wait for it, or use another run.dir")
        try:  # the run ends by replacing final/: refuse a user's folder there now, not after training
            check_replaceable(run_dir / "final")
        except FileExistsError as e:
            lock.release()
            raise ResumeError(str(e)) from None

    on_main(world.is_main, claim)
    return lock if world.is_main else None


def on_main(is_main: bool, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank (collective). Its exception is raised on every
    rank — rank 0: the original; the others: the same checkpoint (or run.dir) error class with the
    same message — so no rank is left waiting in a collective for one that failed."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    desc = None if error is None else (type(error).__name__, str(error))
    result, desc = D.all_gather_object((result, desc))[0]
    if error is not None:
        raise error
    if desc is not None:
        kind = _errors().get(desc[0])
        raise kind(desc[1]) if kind else RuntimeError(f"rank 0 failed: {desc[0]}: {desc[1]}")
    return result


class SpaceGuard:
    """Free-space checks and failure messages for the checkpoints under ``root`` (rank 0 only).

    ``listing()`` gives the complete checkpoints, oldest first; ``keep_last`` as in ``train``.
    """

    def __init__(self, root: Path, keep_last: int, listing: Callable[[], list[tuple[int, Path]]]) -> None:
        self.root, self.keep_last, self.listing = root, keep_last, listing
        self.last_nbytes: int | None = None  # the newest checkpoint's size, once known

    def needed(self, state: dict[str, Any]) -> int:
        """Bytes the next checkpoint is expected to take."""
        base = self.last_nbytes or tensor_nbytes(state)
        return int(base * _MARGIN) + _SLACK

    def prunable(self, final: Path) -> list[Path]:
        """Checkpoints that pruning after saving ``final`` will delete anyway (never the newest)."""
        if self.keep_last <= 0:
            return []
        old = [p for _, p in self.listing() if p != final]
        return old[: max(0, len(old) - max(self.keep_last - 1, 1))]

    def make_room(self, final: Path, needed: int) -> list[Path]:
        """Before a save: nothing when there is room; else delete :meth:`prunable` checkpoints if
        that makes room (returns them); else raise :class:`CheckpointSaveError`."""
        free = free_bytes(self.root)
        if free >= needed:
            return []
        doomed = self.prunable(final)
        gain = sum(checkpoint_nbytes(p) for p in doomed)
        if doomed and free + gain >= needed:
            return self._delete(doomed, free, needed)
        extra = f"; deleting {len(doomed)} older checkpoint(s) would free only {fmt_bytes(gain)}"
        extra = extra if doomed else ""
        raise CheckpointSaveError(
            f"not enough free space to write checkpoint {final}: it needs ~{fmt_bytes(needed)}, "
            f"{fmt_bytes(free)} are free on {self.root}{extra}. Nothing was written. " + self.advice()
        )

    def fresh_tmp(self, final: Path, tmp: Path, needed: int) -> None:
        """An empty ``tmp`` directory (raises :class:`CheckpointSaveError` when it cannot be made)."""
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            full = e.errno in _FULL
            raise CheckpointSaveError(
                f"could not create {tmp} for checkpoint {final.name} ({e}). "
                + self._space(needed, free_bytes(self.root), full)
                + self.advice(full)
            ) from None

    def recover(
        self, final: Path, tmp: Path, needed: int, failure: dict[str, Any], attempt: int
    ) -> list[Path]:
        """After a failed write: remove ``tmp``; when out of space on the first attempt and there
        are prunable checkpoints, delete them (returned: the caller retries); else raise."""
        free = free_bytes(self.root)
        shutil.rmtree(tmp, ignore_errors=True)
        full = out_of_space(failure, free, needed)
        doomed = self.prunable(final) if full and attempt == 1 else []
        where = f"{failure['error']} (rank {failure['rank']})"
        if doomed:
            logger.warning("writing checkpoint %s failed, the disk is full: %s; retrying once", final, where)
            return self._delete(doomed, free, needed)
        state = "the disk is full" if full else "write error"
        raise CheckpointSaveError(
            f"could not write checkpoint {final} ({state}): {where}; the partial files in {tmp.name} were "
            "removed. " + self._space(needed, free, full) + self.advice(full)
        )

    def failed_publish(self, final: Path, tmp: Path, needed: int, e: OSError) -> CheckpointSaveError:
        """The error for a failure while writing the marker or renaming (``tmp`` is removed)."""
        free = free_bytes(self.root)
        shutil.rmtree(tmp, ignore_errors=True)
        full = e.errno in _FULL
        return CheckpointSaveError(
            f"could not finish checkpoint {final} ({e}); the partial files were removed. "
            + self._space(needed, free, full)
            + self.advice(full)
        )

    def advice(self, full: bool = True) -> str:
        """What is intact and what to do: make room when the disk is ``full``, else fix the named error."""
        found = self.listing()
        prev = f"The previous checkpoint {found[-1][1].name} is intact" if found else "No checkpoint yet"
        if not full:
            return f"{prev}. The disk is not full: fix the error above, then run it again."
        return f"{prev}. Free disk space (or lower train.keep_last, or move run.dir), then run it again."

    def _space(self, needed: int, free: int, full: bool) -> str:
        """The bytes needed and free, for an out-of-space error only."""
        return f"It needs ~{fmt_bytes(needed)}, {fmt_bytes(free)} were free on {self.root}. " if full else ""

    def _delete(self, doomed: list[Path], free: int, needed: int) -> list[Path]:
        for p in doomed:
            logger.warning(
                "low disk space (%s free, ~%s needed): deleting %s now (train.keep_last prunes it "
                "after this save)",
                fmt_bytes(free),
                fmt_bytes(needed),
                p,
            )
            shutil.rmtree(p, ignore_errors=True)
        return doomed


def _errors() -> dict[str, type[Exception]]:
    from .safe_load import UnsafeCheckpointError

    return {c.__name__: c for c in (CheckpointError, CheckpointSaveError, ResumeError, UnsafeCheckpointError)}


def checkpoint_nbytes(path: Path) -> int:
    """A checkpoint's size: from its manifest, else by listing it."""
    try:
        manifest = read_manifest(path)
    except Exception:  # a damaged marker: count what is there
        manifest = None
    if manifest is None:
        return dir_nbytes(path)
    return sum(int(v[0]) for v in manifest["files"].values())


def tensor_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict; a DTensor counts with its global size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_nbytes(v) for v in obj)
    return 0


def free_bytes(root: Path) -> int:
    """Bytes free for unprivileged users on the file system of ``root`` (or its nearest parent)."""
    path = root
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def describe_failure(e: BaseException, rank: int) -> dict[str, Any]:
    """A picklable summary of a failed write: the innermost error, its errno if any, the rank."""
    inner: BaseException = e
    if isinstance(e, CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))[0]
    code = None
    for x in (inner, inner.__cause__, inner.__context__):
        if isinstance(x, OSError) and x.errno is not None:
            code = x.errno
            break
    return {"rank": rank, "error": f"{type(inner).__name__}: {inner}", "errno": code}


def out_of_space(failure: dict[str, Any], free: int, needed: int) -> bool:
    """Whether a failed write ran out of space. An ``OSError`` tells by its errno. PyTorch's zip
    writer (``inline_container.cc``, under ``torch.save`` and DCP) raises a plain ``RuntimeError``
    ("unexpected pos ...") without one; then the free space at the failure decides: less than the
    checkpoint needs (at most 64 MiB) left counts as full. No message text is inspected."""
    if failure.get("errno") is not None:
        return failure["errno"] in (errno.ENOSPC, errno.EDQUOT)
    return free < min(needed, 64 << 20)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n} bytes)"
    return f"{n} bytes"
