"""The run's final weights, gathered without rebuilding the model (docs/method.md §6 "Distributed
training").

Under FSDP2 every rank holds shards. :func:`full_state_dict` gathers the full state dict onto rank
0's CPU (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, collective);
:func:`load_full_weights` then puts those tensors into rank 0's own module in place of its shards,
so the recipe's ``save_final`` writes ``final/`` from the trained module itself: no second model
is built or read from disk, and rank 0 holds one full copy of the weights (the gathered one).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..io_atomic import atomic_file
from .distributed import barrier, is_dist

__all__ = ["full_state_dict", "is_sharded", "load_full_weights", "save_final_weights", "write_safetensors"]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered on rank 0 (other ranks get ``{}``; collective)."""
    if is_dist():
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 shards (DTensor parameters)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def load_full_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Replace every sharded parameter of ``model`` by its full tensor from ``state`` (a
    :func:`full_state_dict` on rank 0), in place and without copying; tied parameters stay tied.
    For writing the trained module at the end of a run: the module no longer trains afterwards
    (its FSDP2 state still refers to the shards)."""
    owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        prefix, _, leaf = fqn.rpartition(".")
        owners.setdefault(id(p), []).append((model.get_submodule(prefix), leaf, fqn))
    for places in owners.values():
        module, leaf, _ = places[0]
        old = module._parameters[leaf]
        if type(old).__name__ != "DTensor":
            continue
        fqn = next((f for _, _, f in places if f in state), None)
        if fqn is None:
            raise KeyError(f"the gathered state dict has no entry for parameter {places[0][2]}")
        full = nn.Parameter(state[fqn], requires_grad=old.requires_grad)
        for owner, name, _ in places:
            owner._parameters[name] = full
    return model


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state_dict`` as safetensors (tied tensors are stored once per name), atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return Path(path)


def save_final_weights(task: Any, module: nn.Module, out_dir: Path, is_main: bool) -> Path:
    """Final weights (collective): the full state dict is gathered on rank 0; a sharded module gets
    it in place of its shards (:func:`load_full_weights`); then rank 0 runs ``task.save_final`` if
    the task has it, else writes ``out_dir/model.safetensors``."""
    state = full_state_dict(module)
    if is_main:
        if is_sharded(module):
            load_full_weights(module, state)
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
