"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DESIGN: sharded DCP checkpoints).

Layout of ``<run.dir>/checkpoints/step_000123/``:

* DCP files (``.metadata``, ``__*.distcp``): ``{"model": ..., "optim": ...}`` from
  ``get_state_dict`` — sharded under FSDP2, deduplicated under DDP, loadable at another world
  size. Frozen parameters are left out (they come from the task's initialisation again).
* ``trainer_state.json`` (rank 0): step, scheduler counters, run counters, world size.
* ``rank_00000.pt`` … (one per rank): RNG states (torch, CUDA, ``random``, numpy) and the
  rank's loader state; read back with ``torch.load(weights_only=True)``.
* ``COMPLETE``: written last. Everything is first written to ``step_000123.tmp/`` and renamed
  by rank 0 after a barrier, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..config import config_hash, to_dict
from .distributed import WorldInfo, barrier, is_dist

__all__ = ["MARKER", "CheckpointManager", "full_state_dict", "get_rng_state", "set_rng_state"]
__all__ += ["plain_config", "save_final_weights", "write_run_config", "write_safetensors"]

logger = logging.getLogger("cmpt.train")
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


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


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every single-process call; that is the intended use here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class CheckpointManager:
    """Save, find, load and prune the checkpoints of one run (all ranks call every method)."""

    def __init__(self, root: str | Path, world: WorldInfo, keep_last: int = 2) -> None:
        self.root, self.world, self.keep_last = Path(root), world, keep_last

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:06d}"

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / MARKER).is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def clean_incomplete(self) -> None:
        """Rank 0 removes leftover ``.tmp`` directories and directories without the marker."""
        if self.world.is_main and self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if p.is_dir() and (p.name.endswith(".tmp") or not (p / MARKER).is_file()):
                    logger.warning("removing incomplete checkpoint %s (interrupted while saving)", p)
                    shutil.rmtree(p, ignore_errors=True)
        barrier()

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
    ) -> Path:
        """Write checkpoint ``step`` atomically (collective) and prune old ones; returns its path."""
        final = self.root / self.step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
        with _quiet_dcp():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        torch.save(rank_state, tmp / f"rank_{self.world.rank:05d}.pt")
        if self.world.is_main:
            state = {**trainer_state, "world_size": self.world.world_size}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        barrier()
        if self.world.is_main:
            (tmp / MARKER).write_text(f"{step}\n", encoding="utf-8")
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        barrier()
        return final

    def load(
        self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model + optimizer in place; returns (trainer state, this rank's state)."""
        trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        saved_world = trainer_state.get("world_size", 1)
        rank_file = path / f"rank_{self.world.rank:05d}.pt"
        if saved_world != self.world.world_size or not rank_file.is_file():
            raise RuntimeError(
                f"checkpoint {path} was written by {saved_world} ranks, this job has "
                f"{self.world.world_size}: the per-rank loader and RNG states cannot be mapped; "
                "resume with the same number of processes (or start a new run.dir)"
            )
        msd, osd = get_state_dict(model, optimizer, options=_OPTIONS)
        state = {"model": msd, "optim": osd}
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=str(path))
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
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return trainer_state, rank_state

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, p in self.complete()[: -self.keep_last]:
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


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered on rank 0 (other ranks get ``{}``; collective)."""
    if is_dist():
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state_dict`` as safetensors (tied tensors are stored once per name), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def write_run_config(run_dir: Path, config: dict, resuming: bool) -> str:
    """Write ``run_dir/config.yaml`` (rank 0); on resume, warn when its hash differs. Returns the hash."""
    path, new_hash = run_dir / "config.yaml", config_hash(config)
    if resuming and path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if config_hash(old) != new_hash:
            logger.warning(
                "resuming %s with a different config (hash %s, was %s); %s now holds the new one",
                run_dir,
                new_hash,
                config_hash(old),
                path,
            )
    tmp = path.with_name(".config.yaml.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
    return new_hash


def plain_config(full_config: Any, **sections: Any) -> dict:
    """The run's config as plain YAML-able data: ``full_config`` (a dict or a dataclass) or, when it is
    None, the given generic sections (``run=..., optim=..., train=...``)."""
    cfg = full_config
    if cfg is None:
        cfg = {k: to_dict(v) for k, v in sections.items()}
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = to_dict(cfg)
    return json.loads(json.dumps(cfg, default=str))


def save_final_weights(task: Any, module: nn.Module, out_dir: Path, is_main: bool) -> Path:
    """Final weights (collective): ``task.save_final`` on rank 0 if the task has it, else
    ``out_dir/model.safetensors`` with the full (FSDP-gathered) state dict."""
    state = full_state_dict(module)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_final = getattr(task, "save_final", None)
        if save_final is None:
            write_safetensors(state, out_dir / "model.safetensors")
        elif _accepts(save_final, "state_dict"):
            save_final(module, out_dir, state_dict=state)
        else:
            save_final(module, out_dir)
    barrier()
    return out_dir


def _accepts(fn: Any, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
