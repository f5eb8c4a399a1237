"""``torchrun`` worker for tests/test_cuda_train.py: one process, its process group started as the
trainer starts it (:func:`cmpt.train.distributed.init_distributed`: NCCL + gloo on CUDA, gloo on
the CPU), then

* each run of ``SPEC["runs"]``: ``cmpt train tiny/comp_stage2`` with its ``--set``s (the trainer
  reuses the group);
* the FSDP2 check: the tiny CoMP stage-II model sharded as the trainer shards it under
  ``train.dist=fsdp`` (:func:`~cmpt.train.distributed.shard_fsdp` with the bf16
  ``MixedPrecisionPolicy``), and the same model unsharded, each stepped ``SPEC["fsdp2"]["steps"]``
  times by the trainer's :class:`~cmpt.train.step.StepRunner` under bf16 autocast on the same
  micro-batches. A single process never shards in the trainer itself (one process runs unwrapped);
* the sharded checkpoint round trip, after the FSDP2 steps: the trainer's
  :class:`~cmpt.train.checkpoint.CheckpointManager` saves the sharded model + optimizer (DCP of the
  DTensors, verified manifest) into ``<run.dir>/checkpoints`` as the trainer does; a second manager
  (as on resume) finds, verifies and loads it into a fresh sharded model + optimizer built the same
  way; then the full tensors of both models and both optimizers' states are compared and one more
  step runs on each (the continued original, the restored one) on the same micro-batch.

Usage: ``python -m torch.distributed.run --nproc_per_node=1 tests/cuda_train_worker.py SPEC OUT``;
``SPEC`` is a JSON file ``{"runs": [{"name": ..., "sets": [...]}], "fsdp2": {"sets": [...],
"steps": n}}``. ``OUT`` (JSON): the process group's backend config, each run's summary and, per
mode (``fsdp`` / ``none``), the step losses, the dtypes of a decoder weight during the forward and
the type and dtype of the trained parameters; under ``fsdp2.fsdp.checkpoint`` the round trip's
findings (:func:`checkpoint_round_trip`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cmpt.recipes import load_recipe, run_recipe
from cmpt.train import distributed as D
from cmpt.train.checkpoint import MARKER, CheckpointManager, get_rng_state, set_rng_state
from cmpt.train.optim import build_optimizer, group_names, resolve_groups
from cmpt.train.step import StepRunner

RECIPE = "tiny/comp_stage2"


@dataclasses.dataclass
class Built:
    cfg: Any
    task: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    runner: StepRunner


def build(sets: list[str], mode: str, device: torch.device) -> Built:
    """The model, optimizer and step runner as the trainer builds them for ``mode`` (``"fsdp"``:
    sharded by :func:`~cmpt.train.distributed.shard_fsdp`), from the run's seed."""
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
    return Built(cfg, task, model, optimizer, runner)


def step_losses(sets: list[str], mode: str, steps: int, world: D.WorldInfo) -> dict:
    """``steps`` optimizer steps of the recipe's model, sharded (``mode="fsdp"``, then the
    checkpoint round trip) or not (``"none"``)."""
    b = build(sets, mode, world.device)
    task, model, runner = b.task, b.model, b.runner
    seen: set[str] = set()
    layer = task.vlm.body.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, i, o: seen.add(str(m.weight.dtype)))
    loader = task.build_loader(0, 1)
    batches = iter(loader)
    losses = [runner.run([next(batches)], 0, 0, lambda: False).loss for _ in range(steps)]
    hook.remove()
    params = sorted({f"{type(p).__name__}:{p.dtype}" for p in model.parameters() if p.requires_grad})
    report = {"losses": losses, "forward_dtypes": sorted(seen), "params": params}
    if mode == "fsdp":
        report["checkpoint"] = checkpoint_round_trip(sets, steps, world, b, loader, batches)
    return report


def _full(value: Any) -> Any:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _same(a: Any, b: Any) -> bool:
    a, b = _full(a), _full(b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{type(value).__name__}:{value.device.type}:{value.dtype}"
    return type(value).__name__


def _diff_model(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """The names whose full tensors (state dict: parameters, persistent buffers) differ."""
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(set(sa) ^ set(sb)) + [k for k in sa if k in sb and not _same(sa[k], sb[k])]


def _optim_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """The optimizer's per-parameter state by parameter name."""
    return {n: optimizer.state[p] for n, p in model.named_parameters() if p in optimizer.state}


def checkpoint_round_trip(
    sets: list[str], steps: int, world: D.WorldInfo, trained: Built, loader: Any, batches: Any
) -> dict:
    """Save the ``trained`` sharded model + optimizer (``steps`` steps on ``loader``'s first
    micro-batches) with the trainer's manager (the arguments of ``Trainer._save``), load it through a
    second manager (``latest`` + ``load``, as on resume) into a fresh model + optimizer built the same
    way, compare, and step both once more on the next micro-batch of ``batches``."""
    cfg, model, optimizer, start = trained.cfg, trained.model, trained.optimizer, time.perf_counter()
    root = Path(cfg.run.dir) / "checkpoints"
    keep = cfg.train.keep_last
    trainer_state = {"counters": {"step": steps}}  # Trainer._save's, less what only resume plans read
    rank_state = {"rng": get_rng_state(), "loader": loader.state_dict()}
    saver = CheckpointManager(root, world, keep_last=keep)
    saver.clean_incomplete()
    saved = saver.save(steps, model, optimizer, trainer_state, rank_state)

    restored = build(sets, "fsdp", world.device)
    fresh, fresh_optim = restored.model, restored.optimizer
    differed = len(_diff_model(model, fresh))  # the fresh one holds the initial weights
    resumer = CheckpointManager(root, world, keep_last=keep)  # as a resumed run: not yet verified
    resumer.clean_incomplete()
    found = resumer.latest()
    tstate, rstate = resumer.load(found, fresh, fresh_optim)

    model_diff = _diff_model(model, fresh)
    old, new = _optim_state(model, optimizer), _optim_state(fresh, fresh_optim)
    optim_diff = sorted(set(old) ^ set(new))
    for n in sorted(set(old) & set(new)):
        a, b = old[n], new[n]
        optim_diff += [f"{n}.{k}" for k in sorted({*a, *b}) if not _same(a.get(k), b.get(k))]
    keys = sorted({k for s in old.values() for k in s})
    kinds = sorted({f"{k}={_kind(v)}" for s in new.values() for k, v in s.items()})
    groups = ("lr", "betas", "eps", "weight_decay")
    same_groups = [{k: g.get(k) for k in groups} for g in optimizer.param_groups] == [
        {k: g.get(k) for k in groups} for g in fresh_optim.param_groups
    ]

    batch = next(batches)  # the next micro-batch, for both
    set_rng_state(rank_state["rng"])
    loss = trained.runner.run([batch], 0, 0, lambda: False).loss
    set_rng_state(rstate["rng"])
    loss_restored = restored.runner.run([batch], 0, 0, lambda: False).loss
    return {
        "saved": str(saved),
        "found": str(found),
        "manifest": (saved / MARKER).is_file(),
        "step": tstate.get("counters", {}).get("step"),
        "world_size": tstate.get("world_size"),
        "loader_state": rstate["loader"] == rank_state["loader"],
        "tensors": len(fresh.state_dict()),
        "model_kinds": sorted({_kind(v) for v in fresh.state_dict().values()}),
        "trainable": sum(p.requires_grad for p in fresh.parameters()),
        "differed_before_load": differed,
        "model_diff": model_diff,
        "optim_params": len(new),
        "optim_keys": keys,
        "optim_kinds": kinds,
        "optim_diff": optim_diff,
        "same_groups": same_groups,
        "continued_loss": loss,
        "restored_loss": loss_restored,
        "rel_diff": abs(loss_restored - loss) / max(abs(loss), 1e-30),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    world, started = D.init_distributed()
    assert started, "not launched by torchrun"
    report: dict = {"backend": dist.get_backend_config(), "device": str(world.device)}
    for run in spec["runs"]:
        report[run["name"]] = run_recipe(RECIPE, run["sets"])
    check = spec["fsdp2"]
    report["fsdp2"] = {m: step_losses(check["sets"], m, check["steps"], world) for m in ("fsdp", "none")}
    out.write_text(json.dumps(report, default=str))
    D.destroy()


if __name__ == "__main__":
    main()
