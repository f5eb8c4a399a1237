"""Tests of the CoMP alignment loss (docs/method.md §2) against independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmpt.losses import (
    alignment_loss,
    masked_mean,
    prior_from_counts,
    segment_mean,
    sinkhorn_targets,
)

B, D, V = 6, 16, 50


def _inputs(seed: int = 0, b: int = B, d: int = D, v: int = V):
    g = torch.Generator().manual_seed(seed)
    fv = torch.randn(b, d, generator=g) * 3.0
    ft = torch.randn(b, d, generator=g) * 0.5
    w = torch.randn(v, d, generator=g) * 2.0
    counts = torch.randint(0, 200, (v,), generator=g)
    counts[:5] = 0  # exercises clamp(n, min=1)
    counts[7] = 5000  # a very frequent token
    return fv, ft, w, counts


# ----------------------------------------------------------------------------- references
def _np_prior(counts, temp: float) -> np.ndarray:
    """Official prior: clamped counts over the sum of the *unclamped* counts, then softmax(p / T)."""
    raw = np.asarray(counts, dtype=np.float64)
    p = np.maximum(raw, 1.0) / raw.sum()
    e = np.exp(p / temp)
    return e / e.sum()


def _np_cos(a: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    a = a.detach().double().numpy()
    w = w.detach().double().numpy()
    a = a / np.sqrt((a * a).sum(1, keepdims=True))
    w = w / np.sqrt((w * w).sum(1, keepdims=True))
    return a @ w.T


def _plain_q(ct: np.ndarray, eps: float, pi: np.ndarray, iters: int, variant: str) -> np.ndarray:
    """The method.md §2 formula with plain exp, in the V×B layout, float64; returns V×B."""
    q = np.exp(ct / eps).T.copy()
    b = q.shape[1]
    if variant == "official":
        for _ in range(iters):
            q = np.diag(pi) @ q
            q = q @ np.diag(1.0 / q.sum(axis=0))
            q = q / b
    else:
        q = q / q.sum()
        for _ in range(iters):
            q = np.diag(pi / q.sum(axis=1)) @ q
            q = q @ np.diag(1.0 / (b * q.sum(axis=0)))
    return q * b


def _potential_q(ct: np.ndarray, eps: float, pi: np.ndarray, iters: int, variant: str) -> np.ndarray:
    """Overflow-free float64 reference written with Sinkhorn potentials (u, v); returns V×B."""
    k = torch.from_numpy(ct.T / eps)  # V×B log-kernel
    log_pi = torch.from_numpy(np.log(pi))
    b = k.shape[1]
    if variant == "official":  # closed form: iters prior factors, then a per-sample softmax
        return torch.softmax(k + iters * log_pi[:, None], dim=0).numpy()
    k = k - torch.logsumexp(k.reshape(-1), 0)
    f = torch.zeros(k.shape[0], dtype=torch.float64)
    g = torch.zeros(b, dtype=torch.float64)
    for _ in range(iters):
        f = log_pi - torch.logsumexp(k + g[None, :], dim=1)
        g = -math.log(b) - torch.logsumexp(k + f[:, None], dim=0)
    return torch.exp(k + f[:, None] + g[None, :]).numpy() * b


def _ref_loss(fv, ft, w, counts, *, tau, eps, prior_temp, iters, variant, qfun=_plain_q) -> float:
    pi = np.full(w.shape[0], 1.0 / w.shape[0]) if counts is None else _np_prior(counts, prior_temp)
    q = qfun(_np_cos(ft, w), eps, pi, iters, variant)  # V×B
    z = torch.from_numpy(_np_cos(fv, w) / tau)
    log_p = (z - torch.logsumexp(z, dim=1, keepdim=True)).numpy()  # B×V
    per_sample = [-(q[:, i] * log_p[i]).sum() for i in range(q.shape[1])]
    return float(np.mean(per_sample))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", ["official", "balanced"])
@pytest.mark.parametrize("use_counts", [False, True])
def test_matches_plain_formula(variant: str, use_counts: bool) -> None:
    for seed in range(3):
        fv, ft, w, counts = _inputs(seed)
        c = counts if use_counts else None
        got = alignment_loss(fv, ft, w, c, variant=variant)
        ref = _ref_loss(fv, ft, w, c, tau=0.005, eps=0.005, prior_temp=0.05, iters=3, variant=variant)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == pytest.approx(ref, rel=2e-5, abs=1e-5)


@pytest.mark.parametrize("variant", ["official", "balanced"])
def test_sinkhorn_targets_float64_exact(variant: str) -> None:
    _fv, ft, w, counts = _inputs(1)
    ct = _np_cos(ft, w)
    pi = _np_prior(counts, 0.05)
    q = sinkhorn_targets(torch.from_numpy(ct), 0.005, torch.from_numpy(pi), 3, variant)
    assert q.dtype == torch.float64 and q.shape == (B, V)
    np.testing.assert_allclose(q.numpy(), _plain_q(ct, 0.005, pi, 3, variant).T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(B, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["official", "balanced"])
def test_no_overflow_when_scores_over_eps_are_huge(variant: str) -> None:
    fv, ft, w, counts = _inputs(2)
    eps = tau = 1e-4  # c/ε up to 1e4: exp() overflows even float64
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        assert not np.isfinite(_plain_q(_np_cos(ft, w), eps, _np_prior(counts, 0.05), 3, variant)).all()
    fv = fv.clone().requires_grad_(True)
    loss = alignment_loss(fv, ft, w, counts, vision_temp=tau, sinkhorn_eps=eps, variant=variant)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fv.grad).all()
    ref = _ref_loss(
        fv, ft, w, counts, tau=tau, eps=eps, prior_temp=0.05, iters=3, variant=variant, qfun=_potential_q
    )
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    ct = _np_cos(ft, w)
    q = sinkhorn_targets(torch.from_numpy(ct), eps, prior_from_counts(counts).double(), 3, variant)
    ref_q = _potential_q(ct, eps, prior_from_counts(counts).double().numpy(), 3, variant).T
    np.testing.assert_allclose(q.numpy(), ref_q, rtol=1e-6, atol=1e-9)


def test_potential_reference_agrees_with_plain_reference() -> None:
    _fv, ft, w, counts = _inputs(3)
    ct, pi = _np_cos(ft, w), _np_prior(counts, 0.05)
    for variant in ("official", "balanced"):
        np.testing.assert_allclose(_potential_q(ct, 0.01, pi, 3, variant), _plain_q(ct, 0.01, pi, 3, variant))


def test_gradients_only_reach_vision_features() -> None:
    fv, ft, w, counts = _inputs(4)
    fv = fv.clone().requires_grad_(True)
    ft = ft.clone().requires_grad_(True)
    w = torch.nn.Parameter(w.clone())
    for variant in ("official", "balanced"):
        loss = alignment_loss(fv, ft, w, counts, variant=variant)
        loss.backward()
    assert ft.grad is None or not ft.grad.any()
    assert w.grad is None or not w.grad.any()
    assert fv.grad is not None and fv.grad.abs().sum() > 0 and torch.isfinite(fv.grad).all()


def test_target_rows_sum_to_one_and_variants_differ() -> None:
    _, ft, w, counts = _inputs(5)
    ct = torch.from_numpy(_np_cos(ft, w)).float()
    pi = prior_from_counts(counts)
    q_off = sinkhorn_targets(ct, 0.05, pi, 3, "official")
    q_bal = sinkhorn_targets(ct, 0.05, pi, 3, "balanced")
    for q in (q_off, q_bal):
        assert (q >= 0).all()
        torch.testing.assert_close(q.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0)
    assert not torch.allclose(q_off, q_bal, atol=1e-3)


def test_balanced_token_marginals_converge_to_prior() -> None:
    _, ft, w, counts = _inputs(6, b=64, v=8)
    ct = torch.from_numpy(_np_cos(ft, w))
    pi = prior_from_counts(counts, prior_temp=0.5).double()
    q = sinkhorn_targets(ct, 0.5, pi, 300, "balanced")
    torch.testing.assert_close(q.sum(dim=0) / q.shape[0], pi, atol=1e-6, rtol=1e-5)


def test_uniform_prior_when_counts_missing() -> None:
    fv, ft, w, _ = _inputs(7)
    # "uniform prior" = π_k = 1/V, which is also what prior_from_counts gives for constant counts.
    torch.testing.assert_close(prior_from_counts(torch.full((V,), 3)), torch.full((V,), 1.0 / V))
    for variant in ("official", "balanced"):
        a = alignment_loss(fv, ft, w, None, variant=variant)
        b = alignment_loss(fv, ft, w, torch.ones(V, dtype=torch.long), variant=variant)
        torch.testing.assert_close(a, b)
    # Official variant with a uniform prior: Q is just the per-sample softmax of c_t / ε.
    ct = torch.from_numpy(_np_cos(ft, w))
    q = sinkhorn_targets(ct, 0.005, None, 3, "official")
    torch.testing.assert_close(q, torch.softmax(ct / 0.005, dim=1))


def test_prior_matches_formula_and_handles_sharp_temperatures() -> None:
    _, _, _, counts = _inputs(8)
    np.testing.assert_allclose(prior_from_counts(counts, 0.05).numpy(), _np_prior(counts, 0.05), rtol=1e-6)
    fv, ft, w, _ = _inputs(8)
    loss = alignment_loss(fv, ft, w, counts, prior_temp=1e-5)  # π would underflow outside log space
    assert torch.isfinite(loss)


def test_prior_divides_by_unclamped_sum() -> None:
    # 3 unseen tokens and counts 2, 6: p = [1, 1, 1, 2, 6] / 8 (not / 11), π = softmax(p / 0.05)
    counts = torch.tensor([0, 0, 0, 2, 6])
    p = [1 / 8, 1 / 8, 1 / 8, 2 / 8, 6 / 8]
    z = sum(math.exp(x / 0.05) for x in p)
    expected = torch.tensor([math.exp(x / 0.05) / z for x in p])
    torch.testing.assert_close(prior_from_counts(counts, 0.05), expected, rtol=1e-6, atol=0)
    wrong = torch.softmax(torch.tensor([1, 1, 1, 2, 6]) / 11 / 0.5, 0)  # Σ of the clamped counts
    assert not torch.allclose(prior_from_counts(counts, 0.5), wrong, atol=1e-3)


def test_all_zero_counts_give_uniform_prior_with_warning() -> None:
    fv, ft, w, _ = _inputs(13)
    with pytest.warns(UserWarning, match="all zero"):
        pi = prior_from_counts(torch.zeros(V, dtype=torch.long))
    torch.testing.assert_close(pi, torch.full((V,), 1.0 / V))
    with pytest.warns(UserWarning, match="all zero"):
        loss = alignment_loss(fv, ft, w, torch.zeros(V, dtype=torch.long))
    torch.testing.assert_close(loss, alignment_loss(fv, ft, w, None))


def test_loss_decreases_under_sgd() -> None:
    fv, ft, w, counts = _inputs(9)
    fv = torch.nn.Parameter(fv.clone())
    opt = torch.optim.SGD([fv], lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = alignment_loss(fv, ft, w, counts)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_logits_stay_float32_under_autocast() -> None:
    fv, ft, w, counts = _inputs(12)
    ref = alignment_loss(fv, ft, w, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = alignment_loss(fv, ft, w, counts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


def test_validation_errors() -> None:
    fv, ft, w, counts = _inputs(10)
    with pytest.raises(ValueError, match="variant"):
        alignment_loss(fv, ft, w, variant="swav")
    with pytest.raises(ValueError, match="text_feats shape"):
        alignment_loss(fv, ft[:-1], w)
    with pytest.raises(ValueError, match="prototypes"):
        alignment_loss(fv, ft, w[:, :-1])
    with pytest.raises(ValueError, match="vocab_counts"):
        alignment_loss(fv, ft, w, counts[:-1])
    with pytest.raises(ValueError, match="vision_feats"):
        alignment_loss(fv[0], ft[0], w)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn_targets(fv @ w.t(), iters=0)
    with pytest.raises(ValueError, match="positive"):
        sinkhorn_targets(fv @ w.t(), prior=torch.zeros(V))


def test_empty_batch_is_connected_zero() -> None:
    _, _, w, _ = _inputs(11)
    fv = torch.zeros(0, D, requires_grad=True)
    loss = alignment_loss(fv, torch.zeros(0, D), w)
    loss.backward()
    assert loss.item() == 0.0 and fv.grad is not None


def test_masked_mean_and_segment_mean() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    out = masked_mean(h, mask)
    torch.testing.assert_close(out[0], h[0, :3].mean(0))
    torch.testing.assert_close(out[1], h[1].mean(0))
    torch.testing.assert_close(out[2], torch.zeros(4))
    assert masked_mean(h.bfloat16(), mask.bool()).dtype == torch.float32

    tok = torch.randn(9, 4, generator=g, requires_grad=True)
    for lengths in ([2, 0, 4, 3], torch.tensor([2, 0, 4, 3])):
        seg = segment_mean(tok, lengths)
        ref = torch.stack([tok[:2].mean(0), torch.zeros(4), tok[2:6].mean(0), tok[6:].mean(0)])
        torch.testing.assert_close(seg, ref)
    seg.sum().backward()
    torch.testing.assert_close(tok.grad[:2], torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="sum\\(lengths\\)"):
        segment_mean(tok, [2, 2])


def test_log_prior_given_once_equals_the_counts_every_time() -> None:
    """A loop that computes ``log π`` once (``log_prior_from_counts``) gets the loss of the counts."""
    from cmpt.losses import log_prior_from_counts

    g = torch.Generator().manual_seed(0)
    fv, ft = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    w = torch.randn(30, 8, generator=g)
    counts = torch.randint(0, 40, (30,), generator=g)
    want = alignment_loss(fv, ft, w, counts, prior_temp=0.1)
    got = alignment_loss(fv, ft, w, log_prior=log_prior_from_counts(counts, 0.1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="either vocab_counts or log_prior"):
        alignment_loss(fv, ft, w, counts, log_prior=log_prior_from_counts(counts))
    with pytest.raises(ValueError, match=r"log_prior must have shape \(30,\)"):
        alignment_loss(fv, ft, w, log_prior=log_prior_from_counts(counts[:29]))
