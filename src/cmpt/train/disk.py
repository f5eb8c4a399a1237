"""Disk space and write failures of checkpoint saves (docs/method.md §4 "Verified checkpoints").

Rank 0 of :class:`~cmpt.train.checkpoint.CheckpointManager` takes its decisions through
:func:`on_main` (shared with every rank, errors raised everywhere) and asks a :class:`SpaceGuard`
before and after writing: is there room for the next checkpoint (the last one's size + 2 %, or
the state dict's size the first time), may the checkpoints that ``train.keep_last`` will prune
after this save be deleted first to make room (never the newest one), and what to tell the user
when a write fails — the path, the bytes needed and free, and that the previous checkpoint is
intact.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException

from . import distributed as D
from .verify import CheckpointError, CheckpointSaveError, dir_nbytes, read_manifest

__all__ = ["SpaceGuard", "describe_failure", "fmt_bytes", "free_bytes", "on_main", "out_of_space"]
__all__ += ["tensor_nbytes"]

logger = logging.getLogger("cmpt.train")
_MARGIN, _SLACK = 1.02, 64 << 10


def on_main(is_main: bool, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank (collective). Its exception is raised on every
    rank — rank 0: the original; the others: the same checkpoint error class with the same
    message — so no rank is left waiting in a collective for one that failed."""
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
            raise CheckpointSaveError(
                f"could not create {tmp} for checkpoint {final.name} ({e}); ~{fmt_bytes(needed)} needed, "
                f"{fmt_bytes(free_bytes(self.root))} free. " + self.advice()
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
            f"could not write checkpoint {final} ({state}): {where}. It needs ~{fmt_bytes(needed)}, "
            f"{fmt_bytes(free)} were free on {self.root}; the partial files in {tmp.name} were removed. "
            + self.advice()
        )

    def failed_publish(self, final: Path, tmp: Path, needed: int, e: OSError) -> CheckpointSaveError:
        """The error for a failure while writing the marker or renaming (``tmp`` is removed)."""
        free = free_bytes(self.root)
        shutil.rmtree(tmp, ignore_errors=True)
        return CheckpointSaveError(
            f"could not finish checkpoint {final} ({e}); ~{fmt_bytes(needed)} needed, {fmt_bytes(free)} "
            f"free on {self.root}; the partial files were removed. " + self.advice()
        )

    def advice(self) -> str:
        found = self.listing()
        prev = f"The previous checkpoint {found[-1][1].name} is intact" if found else "No checkpoint yet"
        return f"{prev}. Free disk space (or lower train.keep_last, or move run.dir), then run it again."

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

    return {c.__name__: c for c in (CheckpointError, CheckpointSaveError, UnsafeCheckpointError)}


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
