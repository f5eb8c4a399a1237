"""Attention backends agree with a dense block-diagonal reference (docs/architecture.md)."""

from __future__ import annotations

import pytest
import torch

from cmpt.vision.attention import build_plan, flash_available, torch_varlen_available, varlen_attention


def dense_reference(q, k, v, lengths):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(q.device)
    mask = doc[:, None] == doc[None, :]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


CASES = [[16], [16, 24, 16, 8, 24, 24], [1, 5, 7], [64, 3]]


def _inputs(lengths, requires_grad=False):
    g = torch.Generator().manual_seed(sum(lengths))
    n = sum(lengths)
    return [torch.randn(n, 4, 16, generator=g, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("lengths", CASES)
def test_sdpa_matches_reference(lengths):
    q, k, v = _inputs(lengths)
    plan = build_plan(lengths, "sdpa", q.device, q.dtype)
    torch.testing.assert_close(
        varlen_attention(q, k, v, plan), dense_reference(q, k, v, lengths), atol=1e-5, rtol=1e-5
    )


def test_sdpa_gradients_match_reference():
    lengths = CASES[1]
    q, k, v = _inputs(lengths, requires_grad=True)
    plan = build_plan(lengths, "sdpa", q.device, q.dtype)
    grads = torch.autograd.grad(varlen_attention(q, k, v, plan).square().sum(), (q, k, v))
    refs = torch.autograd.grad(dense_reference(q, k, v, lengths).square().sum(), (q, k, v))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_auto_is_sdpa_on_cpu_and_bad_names_fail():
    assert build_plan([4], "auto", torch.device("cpu"), torch.float32).backend == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_plan([4], "xformers", torch.device("cpu"), torch.float32)
    if not flash_available():
        with pytest.raises(RuntimeError, match="flash-attn"):
            build_plan([4], "flash", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="'varlen' needs"):
        build_plan([4], "varlen", torch.device("cpu"), torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("lengths", CASES[1:])
def test_flex_matches_reference(lengths):
    q, k, v = _inputs(lengths)
    plan = build_plan(lengths, "flex", q.device, q.dtype)
    torch.testing.assert_close(
        varlen_attention(q, k, v, plan), dense_reference(q, k, v, lengths), atol=1e-4, rtol=1e-4
    )


GPU_BACKENDS = [
    pytest.param("flash", marks=pytest.mark.skipif(not flash_available(), reason="needs flash-attn")),
    pytest.param("varlen", marks=pytest.mark.skipif(not torch_varlen_available(), reason="torch<2.10")),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_reference_with_gradients(backend):
    lengths = CASES[1]
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in _inputs(lengths))
    plan = build_plan(lengths, backend, q.device, q.dtype)
    assert plan.backend == backend
    out = varlen_attention(q, k, v, plan)
    ref = dense_reference(q.float(), k.float(), v.float(), lengths)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    refs = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, refs):
        assert (a.float() - b.float()).norm() / b.float().norm() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_follows_autocast_on_cuda():
    dev = torch.device("cuda")
    assert build_plan([4], "auto", dev, torch.float32).backend == "sdpa"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chosen = build_plan([4], "auto", dev, torch.float32).backend
    assert chosen == ("flash" if flash_available() else "varlen" if torch_varlen_available() else "sdpa")
