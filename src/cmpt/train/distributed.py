"""Process groups, collectives and model wrapping: ``torchrun`` + DDP / FSDP2 (DESIGN: PyTorch-native).

Single-process runs need no process group: every helper here degrades to the local value. Under
``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) :func:`init_distributed` starts gloo on CPU or NCCL
(plus gloo for CPU tensors) on CUDA.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "WorldInfo",
    "all_gather_object",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "average_grads",
]
__all__ += ["barrier", "broadcast_module", "destroy", "init_distributed", "is_dist", "is_main", "seed_all"]
__all__ += ["shard_fsdp", "to_device", "world_info", "wrap_ddp"]


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the job, and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_info() -> WorldInfo:
    """Rank, local rank, world size (from the process group, else ``torchrun``'s env, else 1) and device."""
    if is_dist():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local % torch.cuda.device_count()) if torch.cuda.is_available() else None
    return WorldInfo(rank, local, world, device or torch.device("cpu"))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return world_info().rank == 0


def init_distributed() -> tuple[WorldInfo, bool]:
    """Start the process group when launched by ``torchrun``; returns (info, whether it was started here)."""
    if is_dist() or not _launched():
        return world_info(), False
    info = world_info()
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
        dist.init_process_group(backend="cuda:nccl,cpu:gloo", device_id=info.device)
    else:
        dist.init_process_group(backend="gloo")
    return world_info(), True


def destroy(wait: bool = True) -> None:
    """Tear the process group down, after a barrier unless ``wait=False`` (error paths)."""
    if is_dist():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(values: Sequence[float] | torch.Tensor, dtype: torch.dtype = torch.float64) -> list[float]:
    """Element-wise sum over ranks of a short list of numbers (one collective; exact for ints < 2^53)."""
    t = values.detach().to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if is_dist():
        device = world_info().device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (a list of one element in a single process)."""
    if not is_dist():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` (same shape on every rank) over ranks, gradients flowing back to every
    rank's own rows (autograd-aware all-gather); returns ``(gathered, offset of this rank's rows)``.
    A single process returns ``(x, 0)``."""
    if not is_dist() or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (FSDP2 shards whatever each rank holds)."""
    if not is_dist():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over the trainable parameters (frozen ones are simply not synced)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_fsdp(model: nn.Module, units: Iterable[nn.Module], device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` each unit, then the root (the module is changed in place and returned)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_activation_checkpointing(units: Iterable[nn.Module]) -> None:
    """Non-reentrant activation checkpointing of each unit's ``forward`` (parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for unit in units:
        forward = unit.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        unit.forward = checkpointed


def average_grads(params: Iterable[torch.Tensor], world_size: int) -> None:
    """All-reduce and average ``.grad`` by hand (DDP accumulation whose forwards all ran unsynced)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def to_device(batch: object, device: torch.device) -> object:
    """``batch`` with every tensor (in nested dicts / lists / tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def seed_all(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
