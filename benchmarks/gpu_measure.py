"""How the GPU step benchmarks measure (``gpu_harness.py`` runs them; docs/benchmarks.md "How to run
the GPU step benchmarks"): the bf16 matmul peak that MFU divides by, timing with the device
synchronised around a loop, and the model-FLOP count by ``torch.utils.flop_counter``'s formulas in
a minimal dispatch mode, grouped key/value heads counted as the query's on any torch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def failure(e: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Rate of a large square matmul in ``dtype`` (the MFU denominator), measured now: ≥ 3 warm-up
    products and ~0.3 s more of them (the clocks ramp up), then the mean of ≥ 50 over ≥ 1 s (on
    the CPU, a smoke run's, a few small ones)."""
    cuda = device.type == "cuda"
    n, ramp_s, time_s, min_repeats = (8192, 0.3, 1.0, 50) if cuda else (512, 0.02, 0.05, 3)
    ab = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]

    def product() -> None:
        ab[0] @ ab[1]

    first = timed(product, 3, device)
    ramped = timed(product, math.ceil(ramp_s / first), device)
    seconds = timed(product, max(min_repeats, math.ceil(time_s / ramped)), device)
    ab.clear()
    if cuda:
        torch.cuda.empty_cache()
    return 2 * n**3 / seconds / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Mean seconds per call after one warm-up, synchronising the device around the loop."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


aten = torch.ops.aten
#: attention ops with a FLOP formula → (index of the query among the arguments, axis of the heads;
#: key and value follow the query). torch < 2.13's formulas reject fewer key/value heads than query
#: heads (grouped-query attention, ``enable_gqa``), which flash attention takes as they are.
_ATTENTION_ARGS = {
    getattr(aten, name): where
    for name, where in {
        "_scaled_dot_product_flash_attention": (0, -3),
        "_scaled_dot_product_efficient_attention": (0, -3),
        "_scaled_dot_product_cudnn_attention": (0, -3),
        "_scaled_dot_product_flash_attention_backward": (1, -3),
        "_scaled_dot_product_efficient_attention_backward": (1, -3),
        "_scaled_dot_product_cudnn_attention_backward": (1, -3),
        "_flash_attention_forward": (0, -2),
        "_efficient_attention_forward": (0, -2),
        "_flash_attention_backward": (1, -2),
        "_efficient_attention_backward": (1, -2),
    }.items()
    if hasattr(aten, name)
}


def kv_heads_as_query(packet: Any, args: tuple) -> tuple:
    """``args`` of an attention op with key and value widened to the query's head count (shape-only
    stand-ins on the meta device): the work of grouped-query attention, whose kernels reuse each
    key/value head for a group of query heads, is that of attention with the heads repeated."""
    where = _ATTENTION_ARGS.get(packet)
    if where is None:
        return args
    at, axis = where
    q, k, v = args[at : at + 3]
    heads, kv = q.shape[axis], k.shape[axis]
    if heads == kv or kv == 0 or heads % kv:
        return args

    def widened(t: torch.Tensor) -> torch.Tensor:
        shape = (*t.shape[:axis], heads, *t.shape[axis:][1:])
        return torch.empty(shape, dtype=t.dtype, device="meta")

    return (*args[: at + 1], widened(k), widened(v), *args[at + 3 :])


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run under it, by ``torch.utils.flop_counter``'s formulas (matmuls,
    convolutions, attention), grouped key/value heads counted as repeated
    (:func:`kv_heads_as_query`). A formula's error does not stop the ops: it is kept in ``errors``
    (the total is then incomplete). ``FlopCounterMode`` itself is not used: its module tracker keeps
    checkpointed activations alive (docs/benchmarks.md), which ran a GPU out of memory."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.errors: dict[str, str] = {}  # op → its formula's first error

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = flop_registry.get(packet)
        if formula is not None:
            try:
                self.total += formula(*kv_heads_as_query(packet, args), **kwargs, out_val=out)
            except Exception as e:  # a count must never stop the step
                self.errors.setdefault(str(packet), failure(e))
        return out
