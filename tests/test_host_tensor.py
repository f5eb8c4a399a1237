"""``host_tensor``: host metadata on the device without waiting for it (docs/method.md §7 "Layout
metadata on the device")."""

from __future__ import annotations

import pytest
import torch

from cmpt.host_tensor import host_tensor, to_device_async


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
