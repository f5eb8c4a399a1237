"""Resuming at another world size (docs/method.md §6 "Distributed training").

**Model and optimizer**: DCP reshards on load (:meth:`cmpt.train.checkpoint.CheckpointManager.load`),
so DDP and FSDP2 checkpoints of any world size load into any other.

**Per-rank state** (``rank_NNNNN.pt``): when the world size changed, :func:`load_rank_state` maps
the saved ranks onto the new ones:

* the loader state of saved rank 0 goes to every rank: the map-style loaders index one global
  stream of micro-batches (:mod:`cmpt.data.batching`), so every rank's state holds the same
  global position after a step. Loaders whose state is per rank (tar-shard streams) refuse it
  with their own error. The per-rank counters in it (:data:`PER_RANK_COUNTERS`, also those of
  the bad-data guard) are summed over the saved ranks onto new rank 0 and are 0 elsewhere, so the
  run's totals are kept;
* RNG: rank ``r`` continues saved rank ``r``'s generators; a rank the old run did not have keeps
  its fresh seed (``run.seed + r``). Dropout masks of an N-rank run depend on N anyway.

**The global batch** is ``world_size · train.grad_accum`` micro-batches per step — or, for a task
whose data stream is cut into global batches of ``world_size · <key>`` items, that key's
(``Task.world_batch_key``: MoCa's contrastive stage uses ``stage.batch_size``, pairs per rank,
since its in-batch negatives span all ranks). The resume rules (:mod:`cmpt.train.resume`) compare
the world size as the pseudo-key ``train.world_size`` (:func:`world_size_change`): a change that
keeps the global batch (the key adjusted: 2 ranks × 1 → 1 rank × 2) is accepted with a note, and so
is the key's change; one that changes the global batch is refused unless ``--allow-change
train.world_size`` (and the key when it changed too) is given. A loader whose stream depends on the
global batch (:class:`cmpt.data.task_sampler.TaskBatchSampler`) then refuses its saved state, and
the trainer stops with the fix (:func:`loader_refused`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from .distributed import WorldInfo
from .verify import CheckpointError

__all__ = ["DEFAULT_BATCH_KEY", "PER_RANK_COUNTERS", "load_rank_state", "loader_refused", "world_size_change"]

#: the config key that, times the world size, makes the global batch (unless the task names another)
DEFAULT_BATCH_KEY = "train.grad_accum"

#: counters of a loader or of the bad-data guard that count this rank's own samples
PER_RANK_COUNTERS = ("samples_seen", "bad_seen", "local_bad", "local_seen")


def _read(path: Path, rank: int, saved_world: int) -> dict[str, Any]:
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(
            f"checkpoint {path} is damaged: {rank_file.name} is missing (written by {saved_world} ranks)"
        )
    try:
        return torch.load(rank_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path}: {rank_file.name} is unreadable ({e})") from None


def _summed(states: list[dict[str, Any]], key: str, main: bool) -> dict[str, Any]:
    """Saved rank 0's ``states[i][key]`` with its per-rank counters summed over the saved ranks
    (``main``) or zeroed."""
    out = dict(states[0].get(key) or {})
    for c in PER_RANK_COUNTERS:
        if c in out:
            out[c] = sum(int((s.get(key) or {}).get(c, 0)) for s in states) if main else 0
    return out


def load_rank_state(path: Path, world: WorldInfo, saved_world: int) -> dict[str, Any]:
    """This rank's state from checkpoint ``path`` written by ``saved_world`` ranks (the module
    docstring says how ranks are mapped when the world size changed)."""
    if saved_world == world.world_size:
        return _read(path, world.rank, saved_world)
    from .checkpoint import get_rng_state

    states = [_read(path, r, saved_world) for r in range(saved_world)]
    rng = states[world.rank]["rng"] if world.rank < saved_world else get_rng_state()
    state = {k: v for k, v in states[0].items() if k != "rng"}
    state["rng"] = rng
    for key in ("loader", "bad_data"):
        if key in state:
            state[key] = _summed(states, key, world.is_main)
    return state


def world_size_change(
    ckpt: Path, old_config: dict | None, config: dict, world_size: int, batch_key: str = DEFAULT_BATCH_KEY
) -> tuple[dict[str, list[Any]], tuple[str, ...], list[str]]:
    """Resuming ``ckpt`` with ``world_size`` processes: ``(changes, keys accepted without
    --allow-change, notes)``. ``changes`` holds the pseudo-key ``train.world_size`` (old → new, with
    the global batch each gives) when the world size differs from the checkpoint's; ``batch_key``:
    the config key whose value times the world size is the global batch (the module docstring)."""
    from .config_diff import flatten

    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    saved = int(state.get("world_size", 1))
    if saved == world_size:
        return {}, (), []
    old_n = int(flatten(old_config or {}).get(batch_key, 1))
    new_n = int(flatten(config).get(batch_key, 1))
    name = batch_key.rsplit(".", 1)[-1]
    unit = "micro-batches per step" if batch_key == DEFAULT_BATCH_KEY else "per global batch"

    def describe(world: int, n: int) -> str:
        return f"{world} rank(s) x {name} {n} = {world * n} {unit}"

    changes = {"train.world_size": [describe(saved, old_n), describe(world_size, new_n)]}
    if saved * old_n != world_size * new_n:
        if saved * old_n % world_size == 0:  # the setting that would keep it
            changes["train.world_size"][1] += f" (--set {batch_key}={saved * old_n // world_size} keeps it)"
        return changes, (), []
    note = (
        f"resuming {ckpt} at world size {world_size} (saved by {saved}) with {batch_key} "
        f"{old_n} → {new_n}: the global batch ({saved * old_n} {unit}) is "
        "unchanged; model and optimizer are resharded, the data stream continues where it stopped"
    )
    return changes, ("train.world_size", batch_key), [note]


def loader_refused(
    ckpt: str | Path, error: Exception, saved_world: int, world_size: int, batch_key: str
) -> str:
    """The message for a loader that refused the state saved in ``ckpt`` (``error``), with the fix."""
    what = f"cannot resume from {ckpt}: the data loader cannot continue the saved stream ({error})"
    if saved_world == world_size:
        return (
            f"{what}; its data or settings changed since the checkpoint: restore them, or use a new run.dir"
        )
    return (
        f"{what}. It was saved at world size {saved_world}, this run has {world_size}: keep the global "
        f"batch ({saved_world} × the saved {batch_key}) by setting {batch_key} so that {world_size} × it "
        f"equals that (--set {batch_key}=...), or choose a new run.dir"
    )
