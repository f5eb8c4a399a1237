"""2D RoPE (docs/method.md §1): pure rotation, relative-offset property, Qwen2-VL layout on
hand-computed cases."""

from __future__ import annotations

import math

import torch

from cmpt.vision.rope import apply_rope, patch_positions, rope_cos_sin, rope_inv_freq


def complex_reference(x: torch.Tensor, row: float, col: float, theta: float = 10000.0) -> torch.Tensor:
    """Independent formulation: pair (x_j, x_{j+d/2}) as a complex number, multiply by e^{i·angle_j}."""
    d = x.shape[-1]
    inv = [theta ** (-2 * i / (d / 2)) for i in range(d // 4)]
    angles = torch.tensor([row * f for f in inv] + [col * f for f in inv], dtype=torch.float64)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.exp(1j * angles)
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_inv_freq_layout():
    torch.testing.assert_close(rope_inv_freq(8), torch.tensor([1.0, 0.01]))
    assert rope_inv_freq(64).shape == (16,)


def test_hand_computed_angles():
    cos, sin = rope_cos_sin(torch.tensor([[3, 5]]), head_dim=8)
    expected = torch.tensor([3.0, 0.03, 5.0, 0.05, 3.0, 0.03, 5.0, 0.05])
    torch.testing.assert_close(cos[0], expected.cos())
    torch.testing.assert_close(sin[0], expected.sin())
    x = torch.zeros(1, 1, 8)
    x[0, 0, 0] = 1.0  # e_0 rotates into the plane (0, 4) by the row angle
    y = apply_rope(x, cos, sin)[0, 0]
    torch.testing.assert_close(y[0], torch.tensor(math.cos(3.0)))
    torch.testing.assert_close(y[4], torch.tensor(math.sin(3.0)))
    assert y[[1, 2, 3, 5, 6, 7]].abs().max() < 1e-7


def test_matches_complex_reference():
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 0], [1, 7], [12, 3], [40, 41]])
    x = torch.randn(4, 2, 32, generator=g)
    cos, sin = rope_cos_sin(pos, 32)
    out = apply_rope(x, cos, sin)
    for i, (r, c) in enumerate(pos.tolist()):
        torch.testing.assert_close(out[i], complex_reference(x[i], r, c), atol=1e-5, rtol=1e-5)


def test_pure_rotation_keeps_norms():
    pos = torch.randint(0, 100, (50, 2))
    x = torch.randn(50, 3, 64)
    out = apply_rope(x, *rope_cos_sin(pos, 64))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


def test_dot_product_depends_only_on_relative_offset():
    q, k = torch.randn(1, 1, 32), torch.randn(1, 1, 32)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 32)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    base = score((2, 3), (5, 1))
    for shift in [(0, 0), (7, 0), (0, 11), (13, 29)]:
        shifted = score((2 + shift[0], 3 + shift[1]), (5 + shift[0], 1 + shift[1]))
        assert abs(shifted - base) < 1e-4
    assert abs(score((2, 3), (6, 1)) - base) > 1e-3


def test_identity_rows_and_window_positions():
    cos, sin = rope_cos_sin(torch.tensor([[5, 5], [1, 2]]), 16, identity=torch.tensor([True, False]))
    assert torch.equal(cos[0], torch.ones(16)) and torch.equal(sin[0], torch.zeros(16))
    pos = patch_positions([(2, 4)], merge_size=2).tolist()
    assert pos == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert patch_positions([(2, 3)], merge_size=1).tolist() == [
        [0, 0],
        [0, 1],
        [0, 2],
        [1, 0],
        [1, 1],
        [1, 2],
    ]
