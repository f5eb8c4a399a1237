"""``torchrun`` worker of tests/faults/test_ckpt_faults_dist.py (2 ranks, gloo, CPU).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/faults/fault_dist_worker.py OUT``.
Every rank writes ``OUT/report_<rank>.json`` with what it saw in three scenarios:

* ``fallback``: FSDP2, 6 steps, checkpoints 2/4/6; rank 0 flips a byte of rank 1's shard file in
  ``step_000006`` and removes ``final/``; the rerun must resume from step 4 on both ranks and end
  bitwise equal to the first run (saved as ``OUT/reference.safetensors``);
* ``enospc``: DDP; rank 1's rank file of ``step_000004`` cannot be written (SIMULATED ENOSPC):
  both ranks must stop with the same ``CheckpointSaveError`` (no hang), ``step_000002`` intact;
* ``all_damaged``: that run's only checkpoint damaged too: both ranks raise ``CheckpointError``;
* ``bug``: rank 1's rank file raises ``TypeError`` (not a disk error): rank 1 raises it, rank 0 a
  ``RuntimeError`` naming rank 1 — nobody waits.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_helpers import OPTIM, ToyTask, flip_byte

from cmpt.train import RunConfig, TrainConfig, Trainer
from cmpt.train.distributed import destroy
from cmpt.train.verify import CheckpointError


def train(run: Path, mode: str) -> dict:
    kw = {"log_every": 2, "progress": False, "tensorboard": False}
    cfg = TrainConfig(steps=6, save_every=2, keep_last=0, dist=mode, **kw)
    return Trainer(RunConfig(dir=str(run), seed=0), OPTIM, cfg, ToyTask(dropout=0.1)).fit()


def attempt(run: Path, mode: str) -> dict:
    try:
        s = train(run, mode)
        return {"ok": True, "resumed_from": s["resumed_from"], "step": s["step"]}
    except (CheckpointError, TypeError, RuntimeError) as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e)}


def failing_save(rank: int, at: str, error: Exception):
    real = torch.save

    def save(obj, f, *args, **kwargs):  # rank 1 only
        if rank == 1 and isinstance(f, (str, os.PathLike)) and Path(f).parent.name == at:
            raise error
        return real(obj, f, *args, **kwargs)

    return save


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, report = dist.get_rank(), {}

    run = out / "fallback"
    train(run, "fsdp")
    if rank == 0:
        shutil.copy(run / "final" / "model.safetensors", out / "reference.safetensors")
        flip_byte(run / "checkpoints" / "step_000006" / "__1_0.distcp")
        shutil.rmtree(run / "final")
    dist.barrier()
    report["fallback"] = attempt(run, "fsdp")

    run, real = out / "enospc", torch.save
    enospc = OSError(errno.ENOSPC, "No space left on device (simulated)")  # SIMULATED full disk
    torch.save = failing_save(rank, "step_000004.tmp", enospc)
    try:
        report["enospc"] = attempt(run, "ddp")
    finally:
        torch.save = real
    dist.barrier()
    if rank == 0:
        flip_byte(run / "checkpoints" / "step_000002" / "__0_0.distcp")
    dist.barrier()
    report["all_damaged"] = attempt(run, "ddp")
    torch.save = failing_save(rank, "step_000002.tmp", TypeError("cannot pickle the loader state"))
    try:
        report["bug"] = attempt(out / "bug", "ddp")
    finally:
        torch.save = real
    (out / f"report_{rank}.json").write_text(json.dumps(report, indent=1))
    destroy()  # after a barrier, letting gloo free its finished work first


if __name__ == "__main__":
    main()
