"""The meta device as a stand-in GPU for synchronisation checks on the CPU (docs/method.md §7).

A training step should never make the host wait for the GPU before the step's end. On a CPU-only
machine, put the model and the device-side tensors on ``meta`` and the host-side ones on the CPU:

- a read-back of device values (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``, a
  boolean-mask gather, ``repeat_interleave`` without ``output_size``) raises, meta tensors have
  no values;
- a host→device copy (``t.to(device)``, or a host tensor handed to a device op, e.g. as an index)
  is recorded by :class:`HostCopies`, unless :mod:`cmpt.host_tensor` makes it (pinned memory and a
  non-blocking copy on CUDA); a ``torch.tensor(values, device=...)`` or a Python list used as an
  index is invisible here (its copy happens below the dispatcher).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _frames() -> list[traceback.FrameSummary]:
    return traceback.extract_stack()[:-3]


class HostCopies(TorchDispatchMode):
    """Records ``"file:line op"`` (the innermost cmpt frame) of each host→meta copy not made by
    :mod:`cmpt.host_tensor`, in :attr:`found`."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        to_meta = kwargs.get("device") == torch.device("meta") or any(t.is_meta for t in tensors)
        copy = func in COPIES
        host = [t for t in tensors if t.device.type == "cpu" and (copy or t.dim() > 0)]
        if to_meta and host:
            frames = _frames()
            if not any(f.filename.endswith("cmpt/host_tensor.py") for f in frames):
                ours = [f for f in frames if "/cmpt/" in f.filename.replace("\\", "/")]
                where = ours[-1] if ours else frames[-1]
                self.found.append(f"{where.filename.split('/cmpt/')[-1]}:{where.lineno} {func}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_autocast(monkeypatch) -> Iterator[None]:
    """``torch.autocast`` / ``torch.is_autocast_enabled`` accept ``"meta"`` (autocast off there)."""
    autocast, enabled = torch.autocast, torch.is_autocast_enabled

    def _autocast(device_type: str, *args, **kwargs):
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    def _enabled(*args) -> bool:
        return False if args and args[0] == "meta" else enabled(*args)

    with monkeypatch.context() as m:
        m.setattr(torch, "autocast", _autocast)
        m.setattr(torch, "is_autocast_enabled", _enabled)
        yield
