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

**The global batch** is ``world_size · train.grad_accum`` micro-batches per step. The resume rules
(:mod:`cmpt.train.resume`) compare the world size as the pseudo-key ``train.world_size``
(:func:`world_size_change`): a change that keeps the global batch (``train.grad_accum`` adjusted:
2 ranks × 1 → 1 rank × 2) is accepted with a note, and so is its ``train.grad_accum`` change; one
that changes the global batch is refused unless ``--allow-change train.world_size`` (and
``train.grad_accum`` when it changed too) is given. The data stream then continues at the same
global position either way; only the batch per step differs.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from .distributed import WorldInfo
from .verify import CheckpointError

__all__ = ["PER_RANK_COUNTERS", "load_rank_state", "world_size_change"]

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
    ckpt: Path, old_config: dict | None, config: dict, world_size: int
) -> tuple[dict[str, list[Any]], tuple[str, ...], list[str]]:
    """Resuming ``ckpt`` with ``world_size`` processes: ``(changes, keys accepted without
    --allow-change, notes)``. ``changes`` holds the pseudo-key ``train.world_size`` (old → new, with
    the global batch each gives) when the world size differs from the checkpoint's."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    saved = int(state.get("world_size", 1))
    if saved == world_size:
        return {}, (), []
    old_accum = int(((old_config or {}).get("train") or {}).get("grad_accum", 1))
    new_accum = int((config.get("train") or {}).get("grad_accum", 1))

    def describe(world: int, accum: int) -> str:
        return f"{world} rank(s) x grad_accum {accum} = {world * accum} micro-batches per step"

    changes = {"train.world_size": [describe(saved, old_accum), describe(world_size, new_accum)]}
    if saved * old_accum != world_size * new_accum:
        return changes, (), []
    note = (
        f"resuming {ckpt} at world size {world_size} (saved by {saved}) with train.grad_accum "
        f"{old_accum} → {new_accum}: the global batch ({saved * old_accum} micro-batches per step) is "
        "unchanged; model and optimizer are resharded, the data stream continues where it stopped"
    )
    return changes, ("train.world_size", "train.grad_accum"), [note]
