"""``torchrun`` worker for tests/test_cuda_train.py: one process, its process group started as the
trainer starts it (:func:`cmpt.train.distributed.init_distributed`: NCCL + gloo on CUDA, gloo on
the CPU), then

* each run of ``SPEC["runs"]``: ``cmpt train tiny/comp_stage2`` with its ``--set``s (the trainer
  reuses the group);
* the FSDP2 check: the tiny CoMP stage-II model sharded as the trainer shards it under
  ``train.dist=fsdp`` (:func:`~cmpt.train.distributed.shard_fsdp` with the bf16
  ``MixedPrecisionPolicy``), and the same model unsharded, each stepped ``SPEC["fsdp2"]["steps"]``
  times by the trainer's :class:`~cmpt.train.step.StepRunner` under bf16 autocast on the same
  micro-batches. A single process never shards in the trainer itself (one process runs unwrapped).

Usage: ``python -m torch.distributed.run --nproc_per_node=1 tests/cuda_train_worker.py SPEC OUT``;
``SPEC`` is a JSON file ``{"runs": [{"name": ..., "sets": [...]}], "fsdp2": {"sets": [...],
"steps": n}}``. ``OUT`` (JSON): the process group's backend config, each run's summary and, per
mode (``fsdp`` / ``none``), the step losses, the dtypes of a decoder weight during the forward and
the type and dtype of the trained parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cmpt.recipes import load_recipe, run_recipe
from cmpt.train import distributed as D
from cmpt.train.optim import build_optimizer, group_names, resolve_groups
from cmpt.train.step import StepRunner

RECIPE = "tiny/comp_stage2"


def step_losses(sets: list[str], mode: str, steps: int, device: torch.device) -> dict:
    """``steps`` optimizer steps of the recipe's model, sharded (``mode="fsdp"``) or not (``"none"``)."""
    cfg, task_cls = load_recipe(RECIPE, sets)
    torch.manual_seed(cfg.run.seed)
    task = task_cls(cfg)
    model = task.model
    named = group_names(model, task.param_groups())
    if mode == "fsdp":
        D.shard_fsdp(model, task.fsdp_units(), device, D.mixed_precision(True))
    else:
        model.to(device)
    optimizer = build_optimizer(resolve_groups(model, named, cfg.optim), cfg.optim)
    runner = StepRunner(
        task, model, optimizer, mode=mode, device=device, world_size=1, grad_accum=1,
        clip_grad=cfg.optim.clip_grad, amp=lambda: torch.autocast(device.type, dtype=torch.bfloat16),
    )  # fmt: skip
    seen: set[str] = set()
    layer = task.vlm.body.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda m, i, o: seen.add(str(m.weight.dtype)))
    batches = iter(task.build_loader(0, 1))
    losses = [runner.run([next(batches)], 0, 0, lambda: False).loss for _ in range(steps)]
    params = sorted({f"{type(p).__name__}:{p.dtype}" for p in model.parameters() if p.requires_grad})
    return {"losses": losses, "forward_dtypes": sorted(seen), "params": params}


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    world, started = D.init_distributed()
    assert started, "not launched by torchrun"
    report: dict = {"backend": dist.get_backend_config(), "device": str(world.device)}
    for run in spec["runs"]:
        report[run["name"]] = run_recipe(RECIPE, run["sets"])
    check = spec["fsdp2"]
    report["fsdp2"] = {
        m: step_losses(check["sets"], m, check["steps"], world.device) for m in ("fsdp", "none")
    }
    out.write_text(json.dumps(report, default=str))
    D.destroy()


if __name__ == "__main__":
    main()
