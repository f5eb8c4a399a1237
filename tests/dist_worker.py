"""``torchrun`` worker for tests/test_trainer_dist.py: several toy trainings in one launch (gloo, CPU).

Usage: ``python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py OUT STEPS ACCUM``.
The process group is started here, so each :class:`~cmpt.train.Trainer` reuses it (and leaves it
up); one launch then runs, each in ``OUT/<name>``:

* ``ddp_stream`` / ``ddp_defer`` / ``fsdp_stream`` / ``fsdp_defer``: DDP or FSDP2, with the
  task's ``loss_counts`` (streaming accumulation) or without (deferred backwards);
* ``fsdp_stop``: FSDP2 stopped by a SIGTERM that one rank sends itself mid-run, then resumed by
  a second ``fit`` on the same directory (it must end bitwise equal to ``fsdp_defer``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cmpt.train import OptimConfig, RunConfig, TrainConfig, Trainer
from cmpt.train.distributed import destroy
from toy_task import ToyTask, ToyTaskPrecount


def train(out: Path, name: str, dist_mode: str, steps: int, accum: int, precount: bool, **task_kw) -> dict:
    task = (ToyTaskPrecount if precount else ToyTask)(**task_kw)
    run = RunConfig(dir=str(out / name), seed=0, name=name)
    optim = OptimConfig(lr=3e-3, weight_decay=0.01, warmup_steps=2, schedule="cosine")
    cfg = TrainConfig(
        steps=steps,
        grad_accum=accum,
        dist=dist_mode,
        log_every=1,
        save_every=0,
        progress=False,
        tensorboard=False,
    )
    return Trainer(run, optim, cfg, task).fit()


def main() -> None:
    out, steps, accum = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    for mode in ("ddp", "fsdp"):
        for precount in (True, False):
            train(out, f"{mode}_{'stream' if precount else 'defer'}", mode, steps, accum, precount)
    stop_at = world * accum * (steps // 2) + 1  # a micro-batch of rank 1, half-way through
    first = train(out, "fsdp_stop", "fsdp", steps, accum, False, signal_at=stop_at)
    assert first["stopped"] and first["step"] < steps, first
    second = train(out, "fsdp_stop", "fsdp", steps, accum, False)
    assert not second["stopped"] and second["resumed_from"] == first["step"], second
    destroy()  # after a barrier, letting gloo free its finished work first


if __name__ == "__main__":
    main()
