"""Tests of the chunked next-token loss (docs/method.md §2 L_dec, §6 LM-head memory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmpt.losses import lm as lm_module
from cmpt.losses import next_token_loss

H, V = 8, 23


def _setup(shape: tuple[int, ...], seed: int = 0, p_ignore: float = 0.4, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < p_ignore] = -100
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True) if bias else None
    return hidden, labels, weight, b


def _reference(hidden, labels, weight, bias, shift: bool = True):
    logits = F.linear(hidden, weight, bias)
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("shape", [(3, 11), (17,)])
@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("shift", [True, False])
def test_matches_full_logits_cross_entropy(shape, checkpoint: bool, shift: bool) -> None:
    hidden, labels, weight, bias = _setup(shape)
    ref, ref_count = _reference(hidden, labels, weight, bias, shift=shift)
    assert ref_count > 4  # several chunks of 3 rows below
    loss, count = next_token_loss(
        hidden, labels, weight, bias, chunk_size=3, shift=shift, checkpoint=checkpoint
    )
    assert count == ref_count and loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for got, exp in zip(_grads(loss, (hidden, weight, bias)), _grads(ref, (hidden, weight, bias))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def test_float32_and_bfloat16_logits_are_float32() -> None:
    hidden, labels, weight, bias = _setup((2, 10), seed=5)
    ref, _ = _reference(hidden, labels, weight, bias)
    loss, _ = next_token_loss(hidden.float(), labels, weight.float(), bias.float(), chunk_size=4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
    loss_bf16, _ = next_token_loss(hidden.bfloat16(), labels, weight.bfloat16(), bias.bfloat16())
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, ref.float(), rtol=5e-2, atol=0.5)


def test_mean_reduction_and_no_bias() -> None:
    hidden, labels, weight, _ = _setup((2, 9), seed=1, bias=False)
    ref, n = _reference(hidden, labels, weight, None)
    loss, count = next_token_loss(hidden, labels, weight, chunk_size=4, reduction="mean")
    assert count == n
    torch.testing.assert_close(loss, ref / n)


def test_zero_supervised_tokens_is_connected_zero() -> None:
    hidden, labels, weight, bias = _setup((2, 6), seed=2)
    labels[:, 1:] = -100  # position 0 is never a target after the shift
    for reduction in ("sum", "mean"):
        loss, count = next_token_loss(hidden, labels, weight, bias, reduction=reduction)
        assert count == 0 and loss.item() == 0.0 and loss.requires_grad
        grads = _grads(loss, (hidden, weight, bias))
        assert all(g is not None and not g.any() for g in grads)


def test_never_builds_logits_for_unsupervised_rows(monkeypatch) -> None:
    hidden, labels, weight, bias = _setup((4, 50), seed=3, p_ignore=0.8)
    rows: list[int] = []
    real_linear = F.linear

    def spy(x, w, b=None):
        rows.append(x.shape[0] if x.dim() == 2 else -1)
        return real_linear(x, w, b)

    monkeypatch.setattr(lm_module.F, "linear", spy)
    _, n = _reference(hidden.detach(), labels, weight.detach(), bias.detach())
    rows.clear()
    loss, count = next_token_loss(hidden, labels, weight, bias, chunk_size=7)
    assert count == n and n < 4 * 49 // 2
    assert all(0 < r <= 7 for r in rows) and sum(rows) == n  # forward: only supervised rows, chunked
    loss.backward()
    assert all(0 < r <= 7 for r in rows) and sum(rows) == 2 * n  # backward recomputes chunk by chunk


def test_validation_errors() -> None:
    hidden, labels, weight, _bias = _setup((2, 5), seed=4)
    with pytest.raises(ValueError, match="labels shape"):
        next_token_loss(hidden, labels[:, :-1], weight)
    with pytest.raises(ValueError, match="lm_head_weight"):
        next_token_loss(hidden, labels, weight[:, :-1])
    with pytest.raises(ValueError, match="reduction"):
        next_token_loss(hidden, labels, weight, reduction="none")
    bad = labels.clone()
    bad[0, 2] = V
    with pytest.raises(ValueError, match="outside the vocabulary"):
        next_token_loss(hidden, bad, weight)


def test_shift_labels_masks_the_last_position_of_every_sequence():
    """Position t predicts label t+1 of its own sequence; a sequence's last position predicts
    nothing (the next sequence's first label is not its target)."""
    out = lm_module.shift_labels(torch.tensor([1, 2, 3, 4, 5]), [2, 3])
    assert out.tolist() == [2, -100, 4, 5, -100]


def test_bfloat16_logits_take_a_float32_softmax():
    """bf16 hidden states and head: the loss equals cross-entropy of the float32 logits to float32
    precision (a softmax in bf16 would be off by ~1e-2 relative)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g).bfloat16()
    w = torch.randn(50, 16, generator=g).bfloat16()
    y = torch.randint(0, 50, (64,), generator=g)
    loss, _ = next_token_loss(h, y, w, shift=False, chunk_size=16)
    ref = F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
