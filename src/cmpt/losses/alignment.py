"""CoMP alignment loss ``L_align`` (docs/method.md §2, CoMP paper §3.2).

The loss pulls the pooled vision feature of a sample towards a *distribution over the
vocabulary* computed from the sample's caption: both features are scored against the word
prototypes (the L2-normalized rows of the LM head), the text scores are turned into a target
``Q`` by a few Sinkhorn-style iterations with a token-frequency prior, and the vision scores are
trained with a cross-entropy against that target.

Everything on the target side is computed in log space (``logsumexp``), so scores divided by a
tiny ``ε`` (hundreds or thousands) never overflow; wherever the plain ``exp`` formula is finite
the two agree.

Layout convention: docs/method.md §2 writes ``Q`` as a ``V×B`` matrix whose columns are samples; the
functions here return its transpose, a ``(B, V)`` tensor whose *rows* (one per sample) sum to 1.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "SINKHORN_VARIANTS",
    "alignment_loss",
    "log_prior_from_counts",
    "prior_from_counts",
    "sinkhorn_targets",
]

#: ``official``: the released CoMP-MM iteration (prior multiplication + column normalization).
#: ``balanced``: textbook Sinkhorn-Knopp (SwAV) with rows normalized to the prior.
SINKHORN_VARIANTS = ("official", "balanced")


def log_prior_from_counts(vocab_counts: torch.Tensor, prior_temp: float = 0.05) -> torch.Tensor:
    """``log π`` of :func:`prior_from_counts` in float64 (``log_softmax``, so never ``-inf`` even for
    a very sharp prior): what :func:`alignment_loss` takes as ``log_prior``, so a training loop
    computes it once rather than from the counts every micro-batch."""
    if vocab_counts.dim() != 1 or vocab_counts.numel() == 0:
        raise ValueError(
            f"vocab_counts must be a non-empty 1-D tensor, got shape {tuple(vocab_counts.shape)}"
        )
    if prior_temp <= 0:
        raise ValueError(f"prior_temp must be > 0, got {prior_temp}")
    n = vocab_counts.detach().to(torch.float64)
    if bool((n < 0).any()) or not bool(torch.isfinite(n).all()):
        raise ValueError("vocab_counts must be finite and non-negative")
    total = n.sum()  # the release divides by the sum of the *unclamped* counts
    if total <= 0:  # no counts at all: p would be 1/0; no information, so the uniform prior
        warnings.warn(
            "vocab_counts are all zero: using the uniform prior (as with vocab_counts=None); "
            "recount them with `cmpt data vocab-prior` using the model's tokenizer",
            stacklevel=3,
        )
        return torch.full_like(n, -math.log(n.numel()))
    return torch.log_softmax((n.clamp(min=1.0) / total) / prior_temp, dim=0)


def prior_from_counts(vocab_counts: torch.Tensor, prior_temp: float = 0.05) -> torch.Tensor:
    """Token-frequency prior ``π`` of docs/method.md §2 (official ``alignment_loss``).

    ``p = clamp(n, min=1) / Σ n`` and ``π = softmax(p / prior_temp)``: as in the release, the
    clamped counts are divided by the sum of the *unclamped* counts (so ``Σ p`` exceeds 1 when some
    tokens were never seen). All-zero counts (``Σ n = 0``, where ``p`` is undefined) give the
    uniform prior with a warning. Computed in float64 and returned as float32, shape ``(V,)``, on
    the device of ``vocab_counts``. Constant counts (or ``None`` in :func:`alignment_loss`) give
    ``π_k = 1/V``.
    """
    return log_prior_from_counts(vocab_counts, prior_temp).exp().to(torch.float32)


def _log_prior(
    prior: torch.Tensor | None, log_prior: torch.Tensor | None, vocab_size: int, like: torch.Tensor
) -> torch.Tensor:
    """``log π`` normalized to sum 1, in the dtype/device of ``like``; uniform when no prior is given."""
    if prior is not None and log_prior is not None:
        raise ValueError("pass either prior or log_prior, not both")
    if log_prior is not None:
        if log_prior.shape != (vocab_size,):
            raise ValueError(f"log_prior must have shape ({vocab_size},), got {tuple(log_prior.shape)}")
        lp = log_prior.detach().to(device=like.device, dtype=torch.float64)
        if not bool(torch.isfinite(lp).all()):
            raise ValueError("log_prior must be finite")
        return (lp - torch.logsumexp(lp, dim=0)).to(like.dtype)
    if prior is None:
        return torch.full((vocab_size,), -math.log(vocab_size), dtype=like.dtype, device=like.device)
    if prior.shape != (vocab_size,):
        raise ValueError(
            f"prior must have shape ({vocab_size},) to match the logits, got {tuple(prior.shape)}"
        )
    prior = prior.detach().to(device=like.device, dtype=torch.float64)
    if not bool(torch.isfinite(prior).all()) or bool((prior <= 0).any()):
        raise ValueError("prior must be finite and strictly positive")
    return (prior.log() - prior.sum().log()).to(like.dtype)


@torch.no_grad()
def sinkhorn_targets(
    text_logits: torch.Tensor,
    eps: float = 0.005,
    prior: torch.Tensor | None = None,
    iters: int = 3,
    variant: str = "official",
    *,
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft targets ``Q_t`` from text-to-prototype scores (docs/method.md §2), computed in log space.

    Args:
        text_logits: ``(B, V)`` scores ``c_t = F_t Wᵀ``.
        eps: Sinkhorn temperature ``ε``; the starting point is ``Q = exp(c_t / ε)ᵀ`` (``V×B``).
        prior: ``(V,)`` strictly positive prior ``π`` (renormalized to sum 1), e.g. from
            :func:`prior_from_counts`. ``None`` means the uniform prior ``π_k = 1/V`` — which
            is also exactly what :func:`prior_from_counts` gives for constant counts.
            Alternatively ``log_prior`` (finite, renormalized) for priors whose tiny entries
            would underflow.
        iters: number of iterations (≥ 1).
        variant: ``"official"`` — repeat ``Q ← Q ⊙ π`` (row-wise), ``Q ← Q / colsum(Q)``,
            ``Q ← Q / B``; ``"balanced"`` — SwAV Sinkhorn-Knopp: ``Q ← Q / ΣQ`` once, then repeat
            rows normalized to sum ``π_k`` and columns to ``1/B``. Both end with ``Q ← Q·B``.

    Returns:
        ``(B, V)`` tensor (``Qᵀ``), each row summing to 1, in the dtype of ``text_logits``
        promoted to at least float32. No gradient.
    """
    if variant not in SINKHORN_VARIANTS:
        raise ValueError(f"unknown sinkhorn variant {variant!r}; expected one of {SINKHORN_VARIANTS}")
    if text_logits.dim() != 2 or text_logits.shape[0] == 0 or text_logits.shape[1] == 0:
        raise ValueError(f"text_logits must have shape (B, V) with B, V ≥ 1, got {tuple(text_logits.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if int(iters) != iters or iters < 1:
        raise ValueError(f"iters must be an integer ≥ 1, got {iters}")
    dtype = torch.promote_types(text_logits.dtype, torch.float32)
    # Work on the (B, V) transpose: method.md's columns (samples) are our rows, its rows (tokens) our columns.
    log_q = text_logits.detach().to(dtype) / eps
    batch, vocab = log_q.shape
    log_pi = _log_prior(prior, log_prior, vocab, log_q)
    log_b = math.log(batch)
    if variant == "official":
        for _ in range(int(iters)):
            log_q = log_q + log_pi  # Q ⊙ π, one factor per token
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # per-sample sum → 1
            log_q = log_q - log_b  # ... → 1/B
    else:
        log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)  # Q / ΣQ
        for _ in range(int(iters)):
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_pi  # token sums → π_k
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b  # sample sums → 1/B
    return torch.exp(log_q + log_b)


def _prototypes(prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached float32 prototypes and the reciprocals of their row norms, made once per loss
    (the LM head may be a 151k-row bf16 tensor: one float32 copy, one pass for the norms)."""
    with torch.no_grad(), torch.autocast(device_type=prototypes.device.type, enabled=False):
        w = prototypes.detach().to(torch.float32)
        return w, w.norm(dim=1).clamp(min=1e-12).reciprocal()


def _prototype_logits(feats: torch.Tensor, w: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """``normalize(feats) @ normalize(prototypes)ᵀ`` in float32 (:func:`_prototypes` gives ``w`` and
    ``inv_norm``). The row norms are applied to the logits' columns instead of building a normalized
    ``V×D`` copy of the LM head."""
    with torch.autocast(device_type=feats.device.type, enabled=False):  # float32 even under autocast
        f = F.normalize(feats.to(torch.float32), dim=-1)
        return (f @ w.t()) * inv_norm


def alignment_loss(
    vision_feats: torch.Tensor,
    text_feats: torch.Tensor,
    prototypes: torch.Tensor,
    vocab_counts: torch.Tensor | None = None,
    *,
    vision_temp: float = 0.005,
    sinkhorn_eps: float = 0.005,
    prior_temp: float = 0.05,
    iters: int = 3,
    variant: str = "official",
    log_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L_align = −mean_b Σ_k Q_t[b,k] log softmax(c_v/τ)[b,k]`` (docs/method.md §2, paper §3.2).

    Args:
        vision_feats: ``(B, D)`` raw pooled vision features ``F_v`` (normalized here); the only
            input that receives gradient.
        text_feats: ``(B, D)`` raw pooled caption features ``F_t`` (normalized here, detached).
        prototypes: ``(V, D)`` word prototypes ``W`` (the LM head weight; rows normalized, detached).
        vocab_counts: ``(V,)`` token counts ``n`` for the prior (:func:`prior_from_counts`);
            ``None`` uses the uniform prior ``π_k = 1/V`` (for the official variant this makes
            ``Q_t`` simply ``softmax(c_t/ε)`` per sample).
        vision_temp: ``τ`` of ``P_v``. sinkhorn_eps: ``ε``. prior_temp: temperature of ``π``.
        iters: Sinkhorn iterations. variant: ``"official"`` or ``"balanced"`` (see
            :func:`sinkhorn_targets`).
        log_prior: ``(V,)`` ``log π`` already computed (:func:`log_prior_from_counts`), in place of
            ``vocab_counts``: a training loop computes it once instead of every micro-batch.

    Returns:
        Scalar float32 loss. With ``B = 0`` a zero that is still connected to ``vision_feats``.
    """
    if variant not in SINKHORN_VARIANTS:
        raise ValueError(f"unknown sinkhorn variant {variant!r}; expected one of {SINKHORN_VARIANTS}")
    if vision_feats.dim() != 2:
        raise ValueError(f"vision_feats must be (B, D), got shape {tuple(vision_feats.shape)}")
    if text_feats.shape != vision_feats.shape:
        raise ValueError(
            f"text_feats shape {tuple(text_feats.shape)} must equal "
            f"vision_feats shape {tuple(vision_feats.shape)}"
        )
    if prototypes.dim() != 2 or prototypes.shape[1] != vision_feats.shape[1]:
        raise ValueError(
            f"prototypes must be (V, D={vision_feats.shape[1]}), got shape {tuple(prototypes.shape)}"
        )
    if vision_temp <= 0:
        raise ValueError(f"vision_temp must be > 0, got {vision_temp}")
    vocab = prototypes.shape[0]
    for name, t in (("vocab_counts", vocab_counts), ("log_prior", log_prior)):
        if t is not None and t.shape != (vocab,):
            raise ValueError(f"{name} must have shape ({vocab},) like the prototypes, got {tuple(t.shape)}")
    if vocab_counts is not None and log_prior is not None:
        raise ValueError("pass either vocab_counts or log_prior, not both")
    if vision_feats.shape[0] == 0:
        return vision_feats.sum().to(torch.float32) * 0.0

    if vocab_counts is not None:
        log_prior = log_prior_from_counts(vocab_counts.to(prototypes.device), prior_temp)
    w, inv_norm = _prototypes(prototypes)
    with torch.no_grad():
        text_logits = _prototype_logits(text_feats.detach(), w, inv_norm)
        targets = sinkhorn_targets(text_logits, sinkhorn_eps, None, iters, variant, log_prior=log_prior)
    vision_logits = _prototype_logits(vision_feats, w, inv_norm)
    log_p = torch.log_softmax(vision_logits / vision_temp, dim=-1)
    return -(targets * log_p).sum(dim=-1).mean()
