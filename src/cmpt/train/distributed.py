"""Process groups, collectives and model wrapping: ``torchrun`` + DDP / FSDP2 (docs/architecture.md:
PyTorch-native; docs/method.md §6 "Distributed training").

Single-process runs need no process group: every helper here degrades to the local value. Under
``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) :func:`init_distributed` starts gloo on CPU or NCCL
(plus gloo for CPU tensors) on CUDA. FSDP2 models are built on the meta device and get rank 0's
weights once (:func:`shard_fsdp`); ranks > 0 never read them (:func:`loads_weights`). Activation
checkpointing (:func:`apply_activation_checkpointing`) is full or selective.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import random
import time
from collections.abc import Collection, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

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
__all__ += ["barrier", "destroy", "init_distributed", "is_dist", "is_main", "loads_weights"]
__all__ += ["mixed_precision", "seed_all"]
__all__ += ["SAVED_OPS", "PlacedBatch", "shard_fsdp", "to_device", "world_info", "wrap_ddp"]


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


def loads_weights(dist_mode: str) -> bool:
    """Whether this process reads the model's weights when a recipe builds it (docs/method.md §6
    "Distributed training"): False on ranks > 0 of an FSDP2 run (``train.dist == "fsdp"`` under
    ``torchrun`` with ``WORLD_SIZE`` > 1), which build the model's skeleton on the meta device from
    its configs alone; :func:`shard_fsdp` then gives them rank 0's weights. Read from ``torchrun``'s
    environment, so it holds before the process group starts."""
    info = world_info()
    return not (dist_mode == "fsdp" and info.world_size > 1 and info.rank > 0)


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
    """Tear the process group down, after a barrier unless ``wait=False`` (error paths). First the
    dropped wrappers' references to the group are collected and gloo's run loop gets a moment to free
    finished work (it needs the GIL, and the group's destructor waits for it holding the GIL: a
    deadlock, or an abort at exit — "terminate called without an active exception")."""
    if is_dist():
        if wait:
            dist.barrier()
        gc.collect()
        time.sleep(0.2)
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(values: Sequence[float] | torch.Tensor, dtype: torch.dtype = torch.float64) -> list[float]:
    """Element-wise sum over ranks of a short list of numbers (one collective; exact for ints < 2^53)."""
    t = values.detach().to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if is_dist():
        # the group's backend may be "cuda:nccl,cpu:gloo" (init_distributed): NCCL for CUDA tensors
        device = world_info().device if "nccl" in dist.get_backend() else torch.device("cpu")
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
    return _GatherRows.apply(x), dist.get_rank() * x.shape[0]


class _GatherRows(torch.autograd.Function):
    """All-gather along rows; backward: the sum over ranks of the gathered gradient, this rank's rows
    (what ``torch.distributed.nn.functional.all_gather`` did before its deprecation; public
    collectives only)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over the trainable parameters (frozen ones are simply not synced)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def bf16_capable(device: torch.device) -> bool:
    """Whether ``train.precision: auto`` trains in bf16 on ``device``: a GPU with native bf16
    (Ampere and later; not e.g. a V100 or T4, which train in fp32)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def trains_in_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``train.precision`` (``auto`` | ``bf16`` | ``fp32``) trains under bf16 autocast on
    ``device`` (:func:`bf16_capable` decides ``auto``; docs/method.md §6)."""
    return precision == "bf16" or (precision == "auto" and bf16_capable(device))


def mixed_precision(bf16: bool) -> object | None:
    """FSDP2's policy under bf16 training: parameters all-gathered in bf16 for compute, gradients
    reduced in fp32 (the sharded parameters and the optimizer stay fp32); ``None`` (fp32) otherwise.
    Inputs are not cast (the trainer's bf16 autocast decides each op's dtype; the recipes' inputs
    hold dataclasses that FSDP's input casting cannot rebuild)."""
    if not bf16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


@contextlib.contextmanager
def _swap_on_conversion():
    """Module conversions (``to``, ``to_empty``) swap tensors in place: tied parameters stay tied."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def shard_fsdp(
    model: nn.Module, units: Iterable[nn.Module], device: torch.device, mp_policy: object | None = None
) -> nn.Module:
    """FSDP2 with rank 0's weights loaded once (collective; the module is changed in place and
    returned; docs/method.md §6 "Distributed training").

    Rank 0 keeps its full state dict on the CPU and its computed buffers (non-persistent ones such
    as RoPE's ``inv_freq``); every rank moves the module to the meta device (any weights it built
    are freed there; the recipes build it there on ranks > 0, :func:`loads_weights`), calls
    ``fully_shard`` on each unit and then on the root with ``mp_policy`` (:func:`mixed_precision`)
    and allocates only its own shards on ``device`` (``to_empty``). Rank 0's state is then
    scattered shard by shard (``set_model_state_dict`` with ``broadcast_from_rank0``) and its
    computed buffers are broadcast, so no rank ever holds the full model on ``device`` and the
    result equals the eager build bit for bit.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    main = dist.get_rank() == 0
    persistent = model.state_dict()
    full = {k: v.detach() for k, v in persistent.items()} if main else {}
    computed = {n: b.detach() for n, b in model.named_buffers() if n not in persistent}
    with _swap_on_conversion():
        model.to("meta")
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    with _swap_on_conversion():
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in computed:
                if main:
                    buf.copy_(computed[name])
                dist.broadcast(buf, src=0)
    return model


def apply_activation_checkpointing(units: Iterable[nn.Module], mode: str = "full", every: int = 1) -> None:
    """Non-reentrant activation checkpointing of every ``every``-th unit's ``forward`` (the 1st,
    (1+every)-th, ...; parameter names unchanged; docs/method.md §6 "Activation memory").

    ``mode="full"`` keeps only the unit's inputs and recomputes the rest in backward;
    ``"selective"`` also keeps the outputs of matrix products and attention kernels
    (:data:`SAVED_OPS`) and recomputes only the cheap, memory-heavy ops between them (norms,
    activations, element-wise ops, RoPE). Gradients equal those without checkpointing.
    """
    from torch.utils.checkpoint import checkpoint

    if mode not in ("full", "selective") or every < 1:
        raise ValueError(f"checkpointing mode must be full | selective, every >= 1 (got {mode!r}, {every})")
    context = _selective_contexts if mode == "selective" else None
    for i, unit in enumerate(units):
        if i % every:
            continue
        forward = unit.forward
        extra = {"context_fn": context} if context else {}

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, _extra=extra, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **_extra, **kwargs)

        unit.forward = checkpointed


#: the ops whose outputs selective activation checkpointing keeps (the rest is recomputed), by
#: name: matrix products, and attention kernels — PyTorch's, the varlen operators of torch and
#: flash-attn, and cmpt's own (``cmpt.vision.varlen_op``), whichever of them are loaded
SAVED_OPS = frozenset(
    f"aten::{n}"
    for n in (
        "mm", "addmm", "bmm", "baddbmm", "_scaled_mm",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward",
    )
) | {
    "cmpt::varlen_sdpa", "torch_attn::_varlen_attn",
    "flash_attn::_flash_attn_varlen_forward", "flash_attn::_flash_attn_forward",
}  # fmt: skip


def _selective_policy(ctx: object, op: Any, *args: object, **kwargs: object) -> object:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op.name() in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


def average_grads(params: Iterable[torch.Tensor], world_size: int) -> None:
    """All-reduce and average ``.grad`` by hand (DDP accumulation whose forwards all ran unsynced)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


class PlacedBatch(MutableMapping[str, Any]):
    """A micro-batch whose tensors the trainer has placed: on the device, or on the host for the
    task's ``host_keys`` (docs/method.md §7). A mapping but not a ``dict``: DDP (with
    ``device_ids``) and FSDP2's root move every tensor of the dicts, lists and tuples their forward
    receives to the device, with a blocking copy, and would undo the placement."""

    def __init__(self, items: dict[str, Any]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._items[key] = value

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def to_device(batch: object, device: torch.device, keep: Collection[str] = ()) -> object:
    """``batch`` with every tensor (in nested dicts / lists / tuples) moved to ``device``; a dict
    batch comes back as a :class:`PlacedBatch` whose top-level keys in ``keep`` stay on the host."""
    if isinstance(batch, dict):
        return PlacedBatch({k: v if k in keep else _moved(v, device) for k, v in batch.items()})
    return _moved(batch, device)


def _moved(batch: object, device: torch.device) -> object:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _moved(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_moved(v, device) for v in batch)
    return batch


def seed_all(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
