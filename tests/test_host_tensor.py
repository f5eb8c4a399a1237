"""``host_tensor``: host metadata on the device without waiting for it (docs/method.md §7 "Layout
metadata on the device"), and inference outputs read back a window of batches at a time."""

from __future__ import annotations

import pytest
import torch

from cmpt.host_tensor import (
    READBACK_WINDOW,
    host_tensor,
    read_back_in_windows,
    readback_window,
    to_device_async,
)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_cpu_and_meta_equal_torch_tensor(dtype):
    values = [0, 3, 7, 7, 12]
    out = host_tensor(values, "cpu", dtype)
    assert out.dtype == dtype and torch.equal(out, torch.tensor(values, dtype=dtype))
    assert host_tensor(values, None).device.type == "cpu"
    meta = host_tensor(values, torch.device("meta"), dtype)
    assert meta.device.type == "meta" and meta.shape == (5,) and meta.dtype == dtype
    assert host_tensor([], "cpu").shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_does_not_synchronise():
    """``set_sync_debug_mode("error")`` raises at a synchronising copy (``torch.tensor(values,
    device="cuda")`` is one); the values arrive intact, also when the pinned block is reused."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [host_tensor(list(range(k, k + 1000)), "cuda") for k in range(20)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, out in enumerate(outs):
        assert out.device.type == "cuda" and torch.equal(out.cpu(), torch.arange(k, k + 1000))


def test_to_device_async_on_the_cpu_and_meta():
    t = torch.arange(5)
    assert to_device_async(t, "cpu") is t and to_device_async(t, None) is t  # already there: no copy
    meta = to_device_async(t, torch.device("meta"))
    assert meta.is_meta and meta.shape == (5,) and meta.dtype == t.dtype
    assert to_device_async(meta, "meta") is meta


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_async_does_not_synchronise():
    """A pageable host tensor is pinned on the host, then copied without waiting for the device;
    the values arrive intact; a CUDA tensor stays where it is."""
    hosts = [torch.arange(k, k + 1000) for k in range(20)]
    pinned = torch.arange(7).pin_memory()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [to_device_async(h, "cuda") for h in hosts]
        out7 = to_device_async(pinned, torch.device("cuda"))
        assert to_device_async(out7, "cuda") is out7
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for h, out in zip(hosts, outs):
        assert out.device.type == "cuda" and torch.equal(out.cpu(), h)
    assert torch.equal(out7.cpu(), torch.arange(7))


def _batches(n: int) -> list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """``n`` batches of uneven sizes: bf16 rows of width 3 and int rows of width 2."""
    gen = torch.Generator().manual_seed(n)
    sizes = [1 + (7 * i) % 5 for i in range(n)]
    return [
        (i, (torch.randn(k, 3, generator=gen).bfloat16(), torch.randint(0, 9, (k, 2), generator=gen)))
        for i, k in enumerate(sizes)
    ]


@pytest.mark.parametrize("window", [1, 2, 3, 7, 50])
def test_read_back_in_windows_equals_reading_each_batch(window):
    batches = _batches(7)
    out = list(read_back_in_windows(iter(batches), window))
    assert [key for key, _ in out] == list(range(7))
    for (_, got), (_, want) in zip(out, batches, strict=True):
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32 and g.device.type == "cpu"
            assert torch.equal(g, w.float())
    assert list(read_back_in_windows(iter([]), window)) == []


def test_read_back_in_windows_reads_back_once_per_window_and_consumes_lazily():
    """A window's forwards are all pulled before its one read-back per tensor position; the next
    window's are not pulled before the consumer asks for them."""
    pulled, reads = [], []

    class CountReads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.cpu:
                reads.append(len(pulled))
            return func(*args, **(kwargs or {}))

    def outputs():
        for key, tensors in _batches(7):
            pulled.append(key)
            yield key, tensors

    with CountReads():
        it = read_back_in_windows(outputs(), 3)
        first = [next(it) for _ in range(3)]
        assert pulled == [0, 1, 2] and reads == [3, 3]
        rest = list(it)
    assert [k for k, _ in first + rest] == list(range(7)) and reads == [3, 3, 6, 6, 7, 7]
    with pytest.raises(ValueError, match="window must be >= 1"):
        next(read_back_in_windows(outputs(), 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_read_back_in_windows_from_cuda():
    batches = _batches(5)
    on_device = ((k, tuple(t.cuda() for t in ts)) for k, ts in batches)
    out = list(read_back_in_windows(on_device, 2))
    for (_, got), (_, want) in zip(out, batches, strict=True):
        assert all(g.device.type == "cpu" and torch.equal(g, w.float()) for g, w in zip(got, want))


def test_readback_window_is_one_batch_on_the_cpu_and_outputs_are_not_copied():
    """From the CPU the outputs already are on the host: one batch per window, and a float32
    output comes back as a view of the batch's own tensor (no concatenated copy)."""
    assert readback_window("cpu") == 1 and readback_window(torch.device("cpu")) == 1
    assert readback_window(torch.device("meta")) == readback_window("cuda") == READBACK_WINDOW > 1
    rows = torch.randn(5, 4)
    [(_, (back,))] = read_back_in_windows(iter([(0, (rows,))]), readback_window("cpu"))
    assert back.data_ptr() == rows.data_ptr() and torch.equal(back, rows)
