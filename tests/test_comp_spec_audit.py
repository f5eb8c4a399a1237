"""CoMP against independent, hand-written references of the spec (docs/method.md §1, §1.4, §2, §5).

Each reference below is written from the formula alone (plain loops, no cmpt helpers), so these tests
catch a change of layout, order or normalization that the module's own tests could share.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from cmpt.eval.metrics import anls, vqa_accuracy
from cmpt.losses.alignment import alignment_loss, prior_from_counts, sinkhorn_targets
from cmpt.vision.processor import ImageProcessor, smart_resize
from cmpt.vision.rope import apply_rope, patch_positions, rope_cos_sin


def _plain_official_sinkhorn(ct: torch.Tensor, pi: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """docs/method.md §2 step 6, literally: Q = exp(c_t/ε)ᵀ (V×B); repeat Q⊙π, /colsum, /B; ×B."""
    q = torch.exp(ct / eps).T.clone()
    b = q.shape[1]
    for _ in range(iters):
        for k in range(q.shape[0]):
            q[k] = q[k] * pi[k]
        for j in range(b):
            q[:, j] = q[:, j] / q[:, j].sum()
        q = q / b
    return (q * b).T


def test_official_sinkhorn_and_prior_match_plain_loops():
    torch.manual_seed(0)
    counts = torch.randint(0, 40, (30,)).double()
    counts[:4] = 0
    pi = torch.softmax((counts.clamp(min=1) / counts.sum()) / 0.05, 0)  # Σ over the unclamped counts
    assert torch.allclose(prior_from_counts(counts).double(), pi, atol=1e-7)
    ct = torch.randn(4, 30, dtype=torch.float64) * 0.1  # c_t/ε stays where exp is finite
    got = sinkhorn_targets(ct, 0.005, pi, 3, "official")
    assert torch.allclose(got, _plain_official_sinkhorn(ct, pi, 0.005, 3), atol=1e-12)


def test_alignment_loss_matches_direct_formula():
    torch.manual_seed(1)
    b, v, d = 3, 40, 8
    fv, ft, w = torch.randn(b, d), torch.randn(b, d), torch.randn(v, d)
    counts = torch.randint(0, 20, (v,)).float()
    got = alignment_loss(fv, ft, w, counts)
    wn = F.normalize(w.double(), dim=1)
    ct = F.normalize(ft.double(), dim=1) @ wn.T
    cv = F.normalize(fv.double(), dim=1) @ wn.T
    pi = torch.softmax((counts.double().clamp(min=1) / counts.double().sum()) / 0.05, 0)
    z = ct / 0.005  # the column normalization makes a per-sample shift harmless
    q = _plain_official_sinkhorn(z - z.max(1, keepdim=True).values, pi, 1.0, 3)
    ref = -(q * torch.log_softmax(cv / 0.005, 1)).sum(1).mean()
    assert abs(got.item() - ref.item()) < 1e-4 * abs(ref.item())


def test_2d_rope_and_window_order_match_hand_written_qwen2vl_layout():
    d, theta, h, w, m = 8, 10000.0, 4, 6, 2
    order = [
        (wr * m + r, wc * m + c)
        for wr in range(h // m)
        for wc in range(w // m)
        for r in range(m)
        for c in range(m)
    ]
    pos = patch_positions([(h, w)], m)
    assert [tuple(p) for p in pos.tolist()] == order
    x = torch.randn(len(order), 1, d, generator=torch.Generator().manual_seed(2))
    y = apply_rope(x, *rope_cos_sin(pos, d, theta))
    inv = [theta ** (-2 * i / (d / 2)) for i in range(d // 4)]
    for t, (row, col) in enumerate(order):
        ang = [row * f for f in inv] + [col * f for f in inv]
        ang = ang + ang
        for j in range(d):
            partner = -x[t, 0, j + d // 2] if j < d // 2 else x[t, 0, j - d // 2]
            ref = x[t, 0, j] * math.cos(ang[j]) + partner * math.sin(ang[j])
            assert abs(y[t, 0, j].item() - ref.item()) < 1e-5


def _qwen2vl_smart_resize(h: int, w: int, f: int, lo: int, hi: int) -> tuple[int, int]:
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return hb, wb


def test_smart_resize_and_stage_policies():
    rng = random.Random(0)
    cap = 14 * 14 * 4 * 3000
    for _ in range(2000):
        h, w = rng.randint(10, 9000), rng.randint(10, 9000)
        if max(h, w) / min(h, w) <= 200:
            assert smart_resize(h, w, 28, 3136, cap) == _qwen2vl_smart_resize(h, w, 28, 3136, cap)
    fixed = {s: ImageProcessor(14, 2, policy="fixed", fixed_size=s, max_pixels=cap) for s in (384, 1024)}
    assert fixed[384].grid_size(480, 640) == (28, 28)  # 392² → 196 merged tokens
    assert fixed[1024].grid_size(480, 640) == (74, 74)  # 1036² → 1369 merged tokens
    gh, gw = ImageProcessor(14, 2, max_pixels=cap).grid_size(8000, 6000)
    assert gh * gw // 4 <= 3000


def test_vqa_accuracy_and_anls_match_direct_definitions():
    golds = ["two"] * 3 + ["3"] * 7
    # leave-one-out: 3 of the 10 subsets lose a match (2/3), 7 keep all three (1)
    assert vqa_accuracy("2", golds) == (3 * (2 / 3) + 7 * 1.0) / 10
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 1.0
    # canonical ANLS: NL on normalized strings, 1 − NL below 0.5, else 0; max over gold answers
    assert anls("  Invoice  NO", ["invoice no"]) == 1.0
    assert abs(anls("abcd", ["abce", "zzzz"]) - 0.75) < 1e-12
    assert anls("ab", ["abcd"]) == 0.0  # NL = 0.5 is not < 0.5
