"""Atomic, verified, resumable checkpoints with ``torch.distributed.checkpoint`` (docs/architecture.md:
sharded DCP checkpoints; docs/method.md §4 "Verified checkpoints").

Layout of ``<run.dir>/checkpoints/step_000123/``:

* DCP files (``.metadata``, ``__*.distcp``): ``{"model": ..., "optim": ...}`` from
  ``get_state_dict`` — sharded under FSDP2, deduplicated under DDP, loadable at another world
  size. Frozen parameters are left out (they come from the task's initialisation again).
* ``trainer_state.json`` (rank 0): step, scheduler counters, run counters, world size.
* ``rank_00000.pt`` … (one per rank): RNG states (torch, CUDA, ``random``, numpy) and the
  rank's loader state; read back with ``torch.load(weights_only=True)`` and mapped onto the new
  ranks when the run resumes at another world size (:mod:`cmpt.train.reshard`).
* ``COMPLETE``: written last, the manifest (size and CRC-32 of every file, :mod:`cmpt.train.verify`).
  Everything is first written to ``step_000123.tmp/`` and renamed by rank 0 after all ranks
  reported success, so a crash never leaves a directory that looks complete.

Resuming takes the newest checkpoint that verifies (:meth:`CheckpointManager.latest`); damaged
ones are quarantined as ``step_000123.damaged``. At start, only the names above are touched
(:meth:`CheckpointManager.clean_incomplete`); anything else under ``checkpoints/`` is the user's.
Loading never unpickles anything but checkpoint data (:mod:`cmpt.train.safe_load`); full disks
and the run.dir lock are handled by :mod:`cmpt.train.disk`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from ..config import to_dict
from . import distributed as D
from .disk import SpaceGuard, describe_failure, on_main
from .distributed import WorldInfo, barrier
from .final_weights import full_state_dict, save_final_weights, write_safetensors
from .reshard import load_rank_state
from .safe_load import quiet_dcp, safe_dcp_load
from .verify import (
    DAMAGED_SUFFIX,
    MARKER,
    CheckpointError,
    CheckpointSaveError,
    Verdict,
    checksum_files,
    quarantine,
    step_dirs,
    verify_checkpoint,
    write_manifest,
)

__all__ = ["MARKER", "CheckpointError", "CheckpointManager", "CheckpointSaveError", "full_state_dict"]
__all__ += ["get_rng_state", "set_rng_state"]
__all__ += ["plain_config", "save_final_weights", "write_safetensors"]

logger = logging.getLogger("cmpt.train")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_STEP = re.compile(r"^step_\d+$")  # CheckpointManager.step_dir_name
_TMP = re.compile(r"^step_\d+\.tmp$")  # where CheckpointManager.save writes it first
_SET_ASIDE = re.compile(rf"^step_\d+{re.escape(DAMAGED_SUFFIX)}\d*$")  # verify.quarantine's names


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors / ints (safe for ``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Save, find, verify, load and prune the checkpoints of one run (all ranks call every method;
    docs/method.md §4 "Verified checkpoints").

    Decisions that touch the file system (which checkpoint to resume, whether there is room, what
    to do after a failed write) are taken by rank 0 and shared with every rank, so all ranks act
    alike and an error is raised on every rank (none is left waiting in a collective).
    """

    def __init__(self, root: str | Path, world: WorldInfo, keep_last: int = 2) -> None:
        self.root, self.world, self.keep_last = Path(root), world, keep_last
        self.space = SpaceGuard(self.root, keep_last, self.complete)
        self._trusted: set[Path] = set()  # written or verified by this manager (rank 0)

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:06d}"

    def complete(self) -> list[tuple[int, Path]]:
        """Checkpoints with a marker (not yet verified), oldest first."""
        return [(s, p) for s, p in step_dirs(self.root) if (p / MARKER).is_file()]

    def latest(self) -> Path | None:
        """The newest checkpoint that passes :func:`~cmpt.train.verify.verify_checkpoint` (collective).

        A damaged one is logged as an error with its path and reason, renamed to
        ``step_NNNNNN.damaged`` (kept for inspection, never loaded) and the next newest is tried.
        A legacy checkpoint (no manifest) is accepted with a warning. ``None`` when the run has no
        checkpoint; :class:`CheckpointError` on every rank when it has some but none is usable.
        """
        path = self._on_main(self._choose)
        return None if path is None else Path(path)

    def clean_incomplete(self) -> None:
        """Rank 0 tidies ``checkpoints/`` at start, while it holds the run.dir lock (no save is in
        progress; docs/method.md §4): it removes the ``step_NNNNNN.tmp`` directories of interrupted
        saves and sets a ``step_NNNNNN`` directory without its marker aside like a damaged one, as
        ``step_NNNNNN.damaged`` (a save writes the marker before that rename: its marker was
        removed, or cmpt did not write it). Any other directory is left alone, with an INFO line."""
        if self.world.is_main and self.root.is_dir():
            for p in sorted(q for q in self.root.iterdir() if q.is_dir()):
                if _TMP.match(p.name):
                    logger.warning("removing incomplete checkpoint %s (interrupted while saving)", p)
                    shutil.rmtree(p, ignore_errors=True)
                elif _STEP.match(p.name) and not (p / MARKER).is_file():
                    moved = quarantine(p)
                    logger.warning(
                        "checkpoint %s has no %s marker (removed, or not written by cmpt): never loaded; "
                        "set aside as %s for inspection",
                        p,
                        MARKER,
                        moved.name if moved else "(could not be moved; left in place)",
                    )
                elif not (_STEP.match(p.name) or _SET_ASIDE.match(p.name)):
                    logger.info("leaving %s alone: not a checkpoint name cmpt writes", p)
        barrier()

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
    ) -> Path:
        """Write checkpoint ``step`` atomically with its manifest (collective), prune old ones.

        Every rank checksums the files it wrote itself (still in the page cache), rank 0 writes
        the manifest into the marker. Free space is checked first (:class:`~cmpt.train.disk.SpaceGuard`:
        the checkpoints this save would prune may be deleted early to make room). A write that
        fails on any rank (``OSError``, PyTorch's ``inline_container`` ``RuntimeError``, DCP's
        ``CheckpointException``) removes ``step_N.tmp/``; out of space with checkpoints left to
        prune, they are deleted and the save is retried once; otherwise
        :class:`~cmpt.train.verify.CheckpointSaveError` (path, bytes needed and free) is raised on
        every rank. The previous checkpoint is never touched.
        """
        final = self.root / self.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": msd, "optim": osd}
        needed = self._on_main(lambda: self.space.needed(state))
        self._forget(self._on_main(lambda: self.space.make_room(final, needed)))
        for attempt in (1, 2):
            self._on_main(lambda: self.space.fresh_tmp(final, tmp, needed))
            failure, files = self._write(tmp, state, trainer_state, rank_state)
            if failure is None:
                break
            recover = functools.partial(self.space.recover, final, tmp, needed, failure, attempt)
            self._forget(self._on_main(recover))
        self._on_main(lambda: self._publish(step, final, tmp, files, needed))
        return final

    def load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model + optimizer in place; returns (trainer state, this rank's state). A
        checkpoint this manager has not verified yet is verified first (collective; damage raises
        :class:`CheckpointError` naming it). Nothing but checkpoint data is unpickled
        (:mod:`cmpt.train.safe_load`)."""
        path = Path(path)
        self._on_main(lambda: self._check(path))
        state_file = path / "trainer_state.json"
        try:
            trainer_state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {path}: {state_file.name} is unreadable ({e})") from None
        if not isinstance(trainer_state, dict):
            raise CheckpointError(f"checkpoint {path}: {state_file.name} does not hold a JSON object")
        rank_state = load_rank_state(path, self.world, trainer_state.get("world_size", 1))
        msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": msd, "optim": osd}
        safe_dcp_load(path, state)
        result = set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        missing = [k for k in getattr(result, "missing_keys", []) if k not in frozen]
        unexpected = list(getattr(result, "unexpected_keys", []))
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not fit the model: missing {missing}, extra {unexpected}"
            )
        return trainer_state, rank_state

    # ------------------------------------------------------------------ internals
    def _on_main(self, fn: Callable[[], Any]) -> Any:
        return on_main(self.world.is_main, fn)

    def _forget(self, deleted: list[Path]) -> None:
        self._trusted.difference_update(deleted)

    def _verify(self, path: Path) -> Verdict:
        """Rank 0: verify ``path`` unless this manager wrote or verified it already."""
        if path in self._trusted:
            return Verdict(path, True, "verified before")
        verdict = verify_checkpoint(path)
        if verdict.ok:
            if verdict.legacy:
                logger.warning(
                    "checkpoint %s has no manifest (written before cmpt verified checkpoints): its "
                    "files cannot be checked, only its structure; accepting it",
                    path,
                )
            self._trusted.add(path)
            self.space.last_nbytes = verdict.nbytes or self.space.last_nbytes
        return verdict

    def _check(self, path: Path) -> None:
        verdict = self._verify(path)
        if not verdict.ok:
            raise CheckpointError(f"checkpoint {path} is damaged and will not be loaded: {verdict.reason}")

    def _choose(self) -> str | None:
        damaged: list[str] = []
        for _, path in reversed(self.complete()):
            verdict = self._verify(path)
            if verdict.ok:
                if damaged:
                    logger.warning("falling back to checkpoint %s (older than the damaged one)", path)
                return str(path)
            moved = quarantine(path)
            logger.error(
                "checkpoint %s is DAMAGED and will not be loaded: %s; moved to %s for inspection",
                path,
                verdict.reason,
                moved.name if moved else "(could not be moved; left in place)",
            )
            damaged.append(f"{path.name}: {verdict.reason}")
        earlier = sorted(p.name for p in self.root.glob("*" + DAMAGED_SUFFIX)) if self.root.is_dir() else []
        if damaged or earlier:
            what = "; ".join(damaged) if damaged else "only quarantined ones: " + ", ".join(earlier)
            raise CheckpointError(
                f"no usable checkpoint in {self.root} ({what}); nothing was loaded. Check them with "
                f"`cmpt ckpt verify {self.root.parent}`; to train from scratch, move them (or run.dir) away"
            )
        return None

    def _write(
        self, tmp: Path, state: dict, trainer_state: dict[str, Any], rank_state: dict[str, Any]
    ) -> tuple[dict | None, dict[str, list]]:
        """Every rank writes and checksums its own files; returns (the first failure of any rank or
        None, the merged manifest entries), the same on every rank."""
        failure, files = None, {}
        try:
            with quiet_dcp():
                dcp.save(state, checkpoint_id=str(tmp))
            torch.save(rank_state, tmp / f"rank_{self.world.rank:05d}.pt")
            if self.world.is_main:
                state_json = {**trainer_state, "world_size": self.world.world_size}
                (tmp / "trainer_state.json").write_text(json.dumps(state_json, indent=1), encoding="utf-8")
            files = checksum_files(tmp, self._own_files(tmp))
        except (OSError, RuntimeError, CheckpointException) as e:
            failure = describe_failure(e, self.world.rank)
        except Exception as e:  # not the disk (e.g. an unpicklable loader state): no retry
            failure, bug = {**describe_failure(e, self.world.rank), "bug": True}, e
        everyone = D.all_gather_object((failure, files))
        failures = [f for f, _ in everyone if f is not None]
        if any(f.get("bug") for f in failures):  # every rank stops; the failing one with its traceback
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None and failure.get("bug"):
                raise bug
            first = next(f for f in failures if f.get("bug"))
            raise RuntimeError(f"saving {tmp.name} failed on rank {first['rank']}: {first['error']}")
        return (failures[0] if failures else None), {k: v for _, f in everyone for k, v in f.items()}

    def _own_files(self, tmp: Path) -> list[str]:
        """This rank's DCP data files and rank file (rank 0: also the shared ones); files no rank
        claims are checksummed by rank 0 in :meth:`_publish`."""
        r = self.world.rank
        mine = re.compile(rf"^__{r}_\d+\.distcp$|^rank_{r:05d}\.pt$")
        shared = {".metadata", "trainer_state.json"} if self.world.is_main else set()
        return [n for n in os.listdir(tmp) if mine.match(n) or n in shared]

    def _publish(self, step: int, final: Path, tmp: Path, files: dict[str, list], needed: int) -> None:
        """Rank 0: checksum unclaimed files, write the manifest marker, rename, prune."""
        try:
            rest = set(os.listdir(tmp)) - set(files) - {MARKER}
            files = {**files, **checksum_files(tmp, rest)}
            nbytes = write_manifest(tmp, step, self.world.world_size, files)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except OSError as e:
            raise self.space.failed_publish(final, tmp, needed, e) from None
        self._trusted.add(final)
        self.space.last_nbytes = nbytes
        self._prune()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, p in self.complete()[: -self.keep_last]:
            self._trusted.discard(p)
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def plain_config(full_config: Any, **sections: Any) -> dict:
    """The run's config as plain YAML-able data: ``full_config`` (a dict or a dataclass) or, when it is
    None, the given generic sections (``run=..., optim=..., train=...``)."""
    cfg = full_config
    if cfg is None:
        cfg = {k: to_dict(v) for k, v in sections.items()}
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = to_dict(cfg)
    return json.loads(json.dumps(cfg, default=str))
